"""`cifarlab doctor`: measure where a step's time goes and which change helps (measure), the classifier,
thresholds and candidate changes (advice), and the verdicts and files it writes (outputs: DoctorResult,
doctor.json, doctor.md, the chart), how one configuration is timed within a time limit (timing). Layers
inside: measure -> outputs, timing -> advice."""

from cifarlab.doctor.advice import THRESHOLDS, Candidate, Diagnosis, Measurement, classify, from_epoch_record
from cifarlab.doctor.measure import diagnose, run_doctor
from cifarlab.doctor.outputs import DoctorResult

__all__ = ["THRESHOLDS", "Candidate", "Diagnosis", "DoctorResult", "Measurement", "classify", "diagnose",
           "from_epoch_record", "run_doctor"]

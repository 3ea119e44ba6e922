"""`cifarlab export` and `cifarlab infer-bench`: a trained run's model as deployable artifacts, each checked
against eager PyTorch (artifacts), and the inference latency/throughput benchmark over them (bench)."""

from cifarlab.export.artifacts import ExportMismatch, export_model, export_run
from cifarlab.export.bench import bench_path

__all__ = ["ExportMismatch", "bench_path", "export_model", "export_run"]

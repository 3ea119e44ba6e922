"""One training step and one evaluation forward as the device runs them (eager, or replayed as a captured
CUDA graph: capture, eval_forward), the warm-up that leaves no trace (warmup), and the types the training
loop, DDP and checkpoints share (state: EpochRecord, TrainState). Below both train and parallel, so that
neither imports the other for a type."""

from cifarlab.step.capture import STEP_EAGER, STEP_GRAPH, CapturedStep, StepRunner
from cifarlab.step.eval_forward import EvalForward
from cifarlab.step.state import EpochRecord, TrainState
from cifarlab.step.warmup import preserved_training_state

__all__ = ["STEP_EAGER", "STEP_GRAPH", "CapturedStep", "EpochRecord", "EvalForward", "StepRunner", "TrainState",
           "preserved_training_state"]

"""Training: the epoch loop and evaluation with their timings (engine; what each timing includes is in its
docstring) and the choice of step runner for a run (steps: captured CUDA graph or eager, and why not), and of its
precision (precision: --precision auto measured on a CPU with native bf16, cached per machine and config)."""

from cifarlab.train.engine import Hooks, build_state, evaluate, resolve_precision, train, train_epoch

__all__ = ["Hooks", "build_state", "evaluate", "resolve_precision", "train", "train_epoch"]

"""One training run end to end: prepare device and data, train, write the run folder (runner); the run
folder's files and naming (folder); checkpoints, resume and the live-run claim (checkpoint); the console
progress lines (console)."""

from cifarlab.core.folders import create_run_dir
from cifarlab.run.checkpoint import CHECKPOINT_NAME, load_checkpoint, resume_config
from cifarlab.run.console import ConsoleProgress
from cifarlab.run.folder import load_run
from cifarlab.run.runner import RunResult, prepare, run_training

__all__ = ["CHECKPOINT_NAME", "ConsoleProgress", "RunResult", "create_run_dir", "load_checkpoint", "load_run", "prepare",
           "resume_config", "run_training"]

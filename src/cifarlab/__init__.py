"""cifarlab: train ResNet-18 on CIFAR-10 and measure, correctly, where the training time goes.

The Python API (docs/api.md), for notebooks and scripts::

    from cifarlab import TrainConfig, train_model, inspect_model
    result = train_model(TrainConfig(dataset="synthetic", epochs=1, subset=64, device="cpu"))
    print(result.path, [r.train_loss for r in result.records])

The names below load on first access (PEP 562 module __getattr__, from cifarlab.api), so `import cifarlab`
and `cifarlab --help` never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "DataError", "DoctorResult", "LabConfig", "LabRun", "RunResult", "TrainConfig", "UsageError", "diagnose", "export_run",
    "inspect_model", "load_run", "run_lab", "train_model",
]

if TYPE_CHECKING:
    from cifarlab.api import (
        DataError,
        DoctorResult,
        LabConfig,
        LabRun,
        RunResult,
        TrainConfig,
        UsageError,
        diagnose,
        export_run,
        inspect_model,
        load_run,
        run_lab,
        train_model,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("cifarlab.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

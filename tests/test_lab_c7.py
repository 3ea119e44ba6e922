"""C7 on a GPU: a no-BatchNorm run that diverges in bf16 is rerun in fp32, and the report says which one diverged."""

from __future__ import annotations

from typing import Any

from cifarlab.config import TrainConfig
from cifarlab.lab.items import c7_batchnorm as c7


class FakeContext:
    """Records what C7 asks to train; each run's outcome comes from `outcome(label, cfg)`."""

    def __init__(self, outcome: Any) -> None:
        self.base = TrainConfig()
        self.outcome = outcome
        self.trained: list[tuple[str, TrainConfig]] = []

    def fast(self, cfg: TrainConfig) -> TrainConfig:
        return cfg

    def train(self, key: str, label: str, cfg: TrainConfig) -> dict[str, Any]:
        self.trained.append((label, cfg))
        return self.outcome(label, cfg)


def run(label: str, status: str, precision: str, diverged_step: int | None = None) -> dict[str, Any]:
    records = [{"epoch": 1, "status": "ok", "diverged_step": None}]
    if status == "diverged":
        records.append({"epoch": 2, "status": "diverged", "diverged_step": diverged_step})
    return {"label": label, "status": status, "precision": precision, "records": records,
            "summary": {"epochs_completed": len(records) if status != "diverged" else 1,
                        "final_train_loss": 0.25, "final_train_acc": 0.91}}


def test_bf16_divergence_is_rerun_in_fp32() -> None:
    ctx = FakeContext(lambda label, cfg: run(label, "diverged" if cfg.norm == "none" else "completed",
                                             "bf16" if cfg.precision == "auto" else cfg.precision, 152))
    c7.c7_batchnorm(ctx)  # type: ignore[arg-type]
    labels = [label for label, _ in ctx.trained]
    assert labels == ["batchnorm", "no-batchnorm", c7.FP32_LABEL]
    last = ctx.trained[-1][1]
    assert (last.norm, last.precision) == ("none", "fp32")


def test_no_rerun_when_fp32_already_or_no_divergence() -> None:
    for status, precision in (("diverged", "fp32"), ("completed", "bf16")):
        ctx = FakeContext(lambda label, cfg, s=status, p=precision: run(label, s if cfg.norm == "none" else "completed", p))
        c7.c7_batchnorm(ctx)  # type: ignore[arg-type]
        assert [label for label, _ in ctx.trained] == ["batchnorm", "no-batchnorm"], (status, precision)


def test_verdict_names_the_cause() -> None:
    bf16 = run("no-batchnorm", "diverged", "bf16", 152)
    model = c7.divergence_verdict(bf16, run(c7.FP32_LABEL, "diverged", "fp32", 40))
    assert "epoch 2, step 153" in model and "epoch 2, step 41" in model and "not the precision" in model
    precision = c7.divergence_verdict(bf16, run(c7.FP32_LABEL, "completed", "fp32"))
    assert "the precision's, not the model's" in precision and "91.0%" in precision

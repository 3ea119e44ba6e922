"""Does a reloaded artifact compute what eager PyTorch does? A check that can fail.

Each logit is held to its own tolerance, `rtol * |eager logit| + atol` (torch.allclose's rule), so the bar does
not rise with the largest logit of the batch: one diverged logit of 3e5 no longer lets every other logit be off
by 300. On top, top-1 must agree on every *decisive* image (eager's top-2 margin exceeds the two logits'
tolerances; a near-tie may flip without anything being wrong). Eager logits that are non-finite or beyond
LOGIT_LIMIT (a diverged or untrained-in-eval-mode model) make the check "inconclusive": at that scale float32
rounding alone exceeds any tolerance worth stating, so such a model is never reported as matching.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

# rtol per device: CUDA allows more, its conv and matmul kernels may use TF32, and compiled kernels reorder sums.
RELATIVE_TOLERANCE = {"cpu": 1e-3, "cuda": 1e-2}
ABSOLUTE_FLOOR = {"cpu": 1e-3, "cuda": 1e-2}  # for logits near zero, where a relative bound means nothing
LOGIT_LIMIT = 1e4  # a CIFAR-10 classifier's logits are tens at most; beyond this the model is broken


def tolerances(device_type: str) -> tuple[float, float]:
    """(rtol, atol) for a device type."""
    return RELATIVE_TOLERANCE.get(device_type, 1e-3), ABSOLUTE_FLOOR.get(device_type, 1e-3)


def rule(device_type: str) -> str:
    rtol, atol = tolerances(device_type)
    return (f"per logit |logit - eager| <= {rtol:g} * |eager logit| + {atol:g}, at the example batch and at batch 1, "
            f"and the same top-1 on every image whose eager top-2 margin exceeds those two logits' tolerances; "
            f"eager logits that are non-finite or beyond +-{LOGIT_LIMIT:g} make the check inconclusive")


def _worst(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> tuple[float, float]:
    """(max |out - ref|, max of |out - ref| / allowed): the second is <= 1 when every logit passes."""
    if out.shape != ref.shape:
        return math.inf, math.inf
    diff = (out - ref).abs()
    ratio = diff / (rtol * ref.abs() + atol)
    if not torch.isfinite(diff).all():
        return math.inf, math.inf
    return float(diff.max()), float(ratio.max())


def compare(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reference: torch.Tensor,
            device_type: str = "cpu") -> dict[str, Any]:
    """Run fn on x and on x[:1] and compare with the eager logits `reference` (see the module docstring)."""
    rtol, atol = tolerances(device_type)
    with torch.no_grad():
        out = fn(x).float().cpu()
        out1 = fn(x[:1]).float().cpu()
    ref = reference.float().cpu()
    diff, ratio = _worst(out, ref, rtol, atol)
    diff1, ratio1 = _worst(out1, ref[:1], rtol, atol)
    top2 = ref.topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) > (rtol * top2.abs() + atol).sum(dim=1)
    agree = out.argmax(1) == ref.argmax(1) if out.shape == ref.shape else torch.zeros(len(ref), dtype=torch.bool)
    largest = float(ref.abs().max()) if torch.isfinite(ref).all() else math.inf
    if largest > LOGIT_LIMIT:
        status = "inconclusive"
    else:
        status = "ok" if ratio <= 1 and ratio1 <= 1 and bool(agree[decisive].all()) else "mismatch"
    return {"ok": status == "ok", "status": status, "max_abs_logit_diff": diff, "batch1_max_abs_logit_diff": diff1,
            "worst_diff_over_tolerance": max(ratio, ratio1), "batch1_ok": ratio1 <= 1, "max_abs_eager_logit": largest,
            "tolerance_relative": rtol, "tolerance_abs": atol,
            "top1_agree": int(agree.sum()), "images": len(ref), "decisive_images": int(decisive.sum()),
            "top1_agree_decisive": int(agree[decisive].sum())}


def verdict(check: dict[str, Any]) -> str:
    """ok / MISMATCH / INCONCLUSIVE for a console line or a table cell (checks written before 'status')."""
    return {"ok": "ok", "inconclusive": "INCONCLUSIVE"}.get(check.get("status", "ok" if check["ok"] else ""), "MISMATCH")

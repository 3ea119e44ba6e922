"""Utilization in the lab's tables (C1, C5, C8): achieved TFLOP/s and MFU cells, and the sentence that says
which peak each MFU is taken against (run.json "utilization", copied into the lab's run infos). Lab folders
written before runs recorded it have no MFU: their tables are rendered without the columns, as before."""

from __future__ import annotations

from typing import Any

from cifarlab.report.blocks import Block, Para, finite, ok_records


def has_mfu(runs: list[dict[str, Any] | None]) -> bool:
    return any(r is not None and any(x.get("mfu") is not None for x in ok_records(r)) for r in runs)


def tflops_cell(value: Any) -> str:
    return f"{value:.3g}" if finite(value) else "n/a"


def mfu_cell(value: Any) -> str:
    return f"{100 * value:.1f}%" if finite(value) else "n/a"


def mean_of(run: dict[str, Any] | None, key: str, first_epoch: int = 1) -> float | None:
    """Mean of a record field over the run's finished epochs from first_epoch on."""
    vals = [x[key] for x in ok_records(run) if x["epoch"] >= first_epoch and finite(x.get(key))] if run else []
    return sum(vals) / len(vals) if vals else None


def peaks_para(runs: list[dict[str, Any] | None]) -> list[Block]:
    """One sentence per distinct peak the runs' MFU is taken against."""
    seen: dict[str, list[str]] = {}
    flops = None
    for r in runs:
        util = (r or {}).get("utilization")
        if not util:
            continue
        flops = util["train_flops_per_image"]
        p = util["peak"]
        what = (f"the {p['precision']} peak of the {p['card']} ({p['tflops']:,.1f} TFLOP/s per device, published: "
                f"{p['source']})" if p["kind"] == "published peak" else
                f"a {p['precision']} measured peak ({p['tflops']:,.3g} TFLOP/s: {p['source']})")
        seen.setdefault(what, []).append(r["label"])
    if not seen:
        return []
    against = "; ".join(f"{', '.join(labels)}: {what}" for what, labels in seen.items())
    return [Para(f"Utilization: {flops / 1e9:.3f} GFLOP per training image (forward + backward, torch's flop counter); "
                 f"TFLOP/s = that x images / epoch s (whole epochs, data wait included); MFU = TFLOP/s / the peak of "
                 f"the precision used x devices. Against {against}.")]

"""Chrome traces laid out as Holistic Trace Analysis (HTA) and TensorBoard's profiler plugin read them.

HTA's TraceAnalysis(trace_dir=...) parses every JSON file in the folder it is given as one rank's trace, so a
run folder (config.json, run.json, records.json beside the trace) makes it fail. A profiled run therefore keeps
its trace alone in `<run folder>/traces/rank<N>.pt.trace.json` (one folder per profiled run: the ranks of one
job), and the trace records its rank in `distributedInfo` (torch's profiler writes that only when a process
group exists; a single process is rank 0 of 1).

HTA is an optional extra (`pip install 'cifarlab[hta]'`); `temporal_breakdown` runs it where it is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from cifarlab.core.fileio import write_text_atomic

TRACE_DIR = "traces"
HTA_INSTALL_HINT = "pip install 'cifarlab[hta]'"


def trace_path(run_dir: Path, rank: int = 0) -> Path:
    return run_dir / TRACE_DIR / f"rank{rank}.pt.trace.json"


def place_trace(exported: Path, run_dir: Path, rank: int = 0, world_size: int = 1, backend: str = "") -> Path:
    """Move a Chrome trace torch.profiler exported to `exported` into the run's trace folder, with its rank in
    distributedInfo (kept where the profiler already wrote one); returns where it now is."""
    doc = json.loads(exported.read_text(encoding="utf-8"))
    doc.setdefault("distributedInfo", {"backend": backend, "rank": rank, "world_size": world_size})
    target = trace_path(run_dir, int(doc["distributedInfo"].get("rank", rank)))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, json.dumps(doc))
    os.unlink(exported)
    return target


def hta_available() -> bool:
    return importlib.util.find_spec("hta") is not None


def temporal_breakdown(trace_dir: Path) -> list[dict[str, Any]] | None:
    """HTA's temporal breakdown of the GPU time (compute / non-compute / idle, per rank) of a trace folder, as
    rows; None when HTA is not installed. Only a trace with GPU kernels has one."""
    if not hta_available():
        return None
    from hta.trace_analysis import TraceAnalysis  # the optional extra: imported only when it is installed

    frame = TraceAnalysis(trace_dir=str(trace_dir)).get_temporal_breakdown(visualize=False)
    return [{str(k): (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in frame.to_dict("records")]

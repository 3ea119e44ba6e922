"""Check a run's TensorBoard events against its own files, and print its utilization (a GPU check).

    python benchmarks/tensorboard_check.py RUNS_DIR TB_DIR

For every run folder under RUNS_DIR that has one: reads TB_DIR/<run folder name> with TensorBoard's EventAccumulator and
compares every scalar with records.json (rounded to float32, as TensorBoard stores scalars); prints run.json's
utilization section and each epoch's TFLOP/s and MFU. Exit 1 on any mismatch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarlab.run.tensorboard_log import SCALARS, global_steps


def check(run_dir: Path, tb_dir: Path) -> bool:
    records = json.loads((run_dir / "records.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    print(f"{run_dir.name}: device {run['device']}, precision {run['precision']}")
    print("  utilization:", json.dumps(run.get("utilization", {}).get("peak")))
    for r in records:
        print(f"  epoch {r['epoch']}: {r['images_per_s']:,.0f} img/s, {r.get('tflops')} TFLOP/s, MFU {r.get('mfu')}")
    acc = EventAccumulator(str(tb_dir / run_dir.name), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    want: dict[str, list[tuple[int, float]]] = {}
    for step, r in global_steps(records):
        for tag, key in SCALARS:
            if r.get(key) is not None:
                want.setdefault(tag, []).append((step, float(np.float32(r[key]))))
    ok = got == want
    print(f"  tensorboard: {len(got)} scalars, {sum(map(len, got.values()))} points: "
          + ("every value equals records.json" if ok else f"MISMATCH\n    got  {got}\n    want {want}"))
    return ok


def main(argv: list[str]) -> int:
    runs, tb = Path(argv[0]), Path(argv[1])
    results = [check(d, tb) for d in sorted(runs.iterdir()) if (d / "run.json").is_file() and (tb / d.name).is_dir()]
    return 0 if results and all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

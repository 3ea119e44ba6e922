"""Side by side: the run folders under one folder (e.g. gpu_check.sh's captured and eager `cifarlab train`
runs, same seed): per epoch train loss, train/test top-1, epoch_s, and each run's setup_s, step mode, and
epoch 1 against the mean of the later epochs.

    python benchmarks/compare_runs.py RUNS_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(run_dir: Path) -> tuple[dict, list[dict]]:
    return json.loads((run_dir / "run.json").read_text()), json.loads((run_dir / "records.json").read_text())


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    runs = sorted(p for p in Path(argv[0]).iterdir() if (p / "records.json").is_file())
    table = {}
    for run in runs:
        status, records = load(run)
        ok = [r for r in records if r["status"] == "ok"]
        steady = [r["epoch_s"] for r in ok[1:]]
        first = ok[0]["epoch_s"] if ok else float("nan")
        steady_s = statistics.mean(steady) if steady else float("nan")
        print(f"{run.name}: status {status.get('status')}, step {ok[0].get('step_mode') if ok else '?'}, "
              f"setup_s {ok[0].get('setup_s') if ok else None}, epoch 1 {first:.2f} s, later epochs mean {steady_s:.2f} s "
              f"(epoch 1 / steady = {first / steady_s:.2f}x)")
        table[run.name] = ok
    names = list(table)
    print("\nepoch | " + " | ".join(f"{n}: loss, train top-1, test top-1, epoch_s" for n in names))
    for i in range(max((len(v) for v in table.values()), default=0)):
        cells = []
        for n in names:
            r = table[n][i] if i < len(table[n]) else None
            cells.append("-" if r is None else f"{r['train_loss']:.4f}, {100 * r['train_acc']:.1f}%, "
                         f"{100 * (r.get('test_acc') or 0):.1f}%, {r['epoch_s']:.2f}")
        print(f"{i + 1} | " + " | ".join(cells))
    if len(names) == 2:
        a, b = (table[n] for n in names)
        diffs = [abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a, b)]
        print(f"\nlargest per-epoch train-loss difference {names[0]} vs {names[1]}: {max(diffs, default=float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

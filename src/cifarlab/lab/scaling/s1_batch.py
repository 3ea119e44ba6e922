"""S1: batch-size scaling on one device until out of memory or the preset's cap."""

from __future__ import annotations

from typing import Any

from cifarlab.config import SCALING_PRESETS, LabPreset
from cifarlab.lab.context import Experiment, LabContext
from cifarlab.lab.scaling.common import is_cuda, point, run_train, spreset, timing_config
from cifarlab.lab.sections import measured_table, runs_para
from cifarlab.report.blocks import Para, fs
from cifarlab.report.plots import ReportContext


def single_device_ladder(ctx: LabContext, key: str) -> dict[str, Any]:
    sp = spreset(ctx)
    cfg = timing_config(ctx)
    n_train = sp.timing_images or len(ctx.data.train)  # what the child processes load
    points: list[dict[str, Any]] = []
    batch = sp.first_batch
    while True:
        info = run_train(ctx, key, f"batch-{batch}", cfg.replace(batch_size=batch))
        points.append(point(info, batch, 1))
        if info["status"] == "oom":
            stop = f"out of memory at per-device batch {batch} (caught by the run, recorded as status 'oom')"
            break
        if info["status"] != "completed":
            stop = f"the batch-{batch} run ended '{info['status']}'"
            break
        nxt = batch * sp.batch_factor
        if not is_cuda(ctx) and len(points) >= sp.max_points_cpu:
            stop = (f"CPU: no out-of-memory to stop the ladder, so the {ctx.preset.name} preset caps it at "
                    f"{sp.max_points_cpu} points")
            break
        if nxt > sp.max_batch:
            stop = f"the {ctx.preset.name} preset caps the per-device batch at {sp.max_batch}"
            break
        if nxt > n_train:
            stop = f"a per-device batch of {nxt} would exceed the {n_train} training images"
            break
        batch = nxt
    ok = [p for p in points if p["status"] == "completed"]
    result = {"points": points, "stop_reason": stop, "largest_batch": max((p["batch"] for p in ok), default=None),
              "device_kind": "GPU" if is_cuda(ctx) else "CPU core (1 thread)", "train_images": n_train}
    ctx.shared["scaling_s1"] = result
    return result


def s1_batch_scaling(ctx: LabContext) -> dict[str, Any]:
    return single_device_ladder(ctx, "s1")


def s1_points(ctx: LabContext, key: str) -> dict[str, Any]:
    return ctx.shared.get("scaling_s1") or single_device_ladder(ctx, key)


def _s1_rows(points: list[dict[str, Any]]) -> list[list[Any]]:
    return [[p["batch"], p["status"], p.get("images", ""), p.get("steps", ""), fs(p.get("epoch_s"), 3),
             fs(p.get("data_s"), 3), fs(p.get("no_data_s"), 3),
             f"{p['images_per_s_no_data']:.1f}" if p.get("images_per_s_no_data") else "n/a",
             (p.get("error") or "")[:80]] for p in points]


def render_s1(entry: dict[str, Any], rc: ReportContext) -> list[Any]:
    res = entry["result"]
    ok = [p for p in res["points"] if p["status"] == "completed"]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        ax.plot([p["batch"] for p in ok], [p["images_per_s_no_data"] or 0 for p in ok], marker="o")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="per-device batch", ylabel="images/s (2nd epoch, data wait excluded)",
               title=f"s1 one {res['device_kind']}")
        ax.grid(alpha=0.3)

    return [
        *measured_table(
            entry, rc,
            f"One {res['device_kind']}; per-device batch ×{SCALING_PRESETS.get(rc.preset.get('name'), SCALING_PRESETS['quick']).batch_factor} "
            f"per point; {res['train_images']} training images per run. Time of the **2nd epoch** (the 1st pays "
            f"one-off costs) **without the data wait**: `epoch_s - data_s` = host-to-device copy + forward + "
            f"backward + optimizer update (+ bookkeeping). Each point is a fresh process and model.",
            ["per-device batch", "status", "images", "steps", "epoch s", "data wait s", "epoch - data s",
             "images/s (excl. data)", "error"], _s1_rows(res["points"]), "s1_batch_scaling"),
        Para(f"Ladder stopped: {res['stop_reason']}. Largest per-device batch that trained: "
             f"**{res['largest_batch']}**."),
        rc.plot("s1_batch_scaling", "s1 throughput vs per-device batch", draw, size=(6, 3.6)),
        runs_para(entry),
    ]


def planned_epochs(p: LabPreset, cuda: bool) -> int:
    return 2 * (6 if cuda else SCALING_PRESETS.get(p.name, SCALING_PRESETS["quick"]).max_points_cpu)


ITEM = Experiment("s1", "S1 Batch-size scaling on one device", s1_batch_scaling, render_s1, planned_epochs)

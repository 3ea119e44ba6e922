"""results.json -> the lab report: the header, one section per item (its ITEM.render, or a generic
section for items that did not complete), written as report.md, report.html, csv/ and plots/.
`build_report(lab_dir)` is what both `cifarlab lab` and `cifarlab report LAB_DIR` call, so a rebuilt
report is the same report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cifarlab.core.errors import UsageError
from cifarlab.core.fileio import read_json
from cifarlab.core.text import one_line
from cifarlab.lab.plan import time_table_blocks
from cifarlab.lab.registry import EXPERIMENTS
from cifarlab.lab.sections import REF
from cifarlab.report.blocks import Block, Heading, Image, Note, Para, Table, fs, pct, runs_of
from cifarlab.report.document import write_report
from cifarlab.report.plots import ReportContext

SUPPORTED_SCHEMAS = ("cifarlab.lab/1",)


def generic_blocks(entry: dict[str, Any]) -> list[Block]:
    """Sections that did not complete (not run, interrupted, failed) or whose renderer is missing."""
    status = entry.get("status", "not run")
    blocks: list[Block] = []
    if status == "not run":
        blocks.append(Note("Not run: the lab stopped before this experiment (or it was not selected)."))
    elif status == "interrupted":
        # folders written before the signal was recorded say Ctrl-C, as they always did
        by = "Ctrl-C" if entry.get("stopped_by") in (None, "SIGINT") else entry["stopped_by"]
        blocks.append(Note(f"Interrupted ({by}): the runs that finished are listed; the rest did not run."))
    elif status == "failed":
        where = f" Traceback: `{entry['traceback_file']}`." if entry.get("traceback_file") else ""
        blocks.append(Note(f"Failed: {entry.get('error')}. The other experiments went on.{where}"))
    else:
        blocks.append(Note("No renderer is installed for this section; its results are in results.json."))
    rows = [[r["label"], r["status"], r["summary"].get("epochs_completed", 0), fs(r["summary"].get("mean_epoch_s"), 3),
             pct(r["summary"].get("final_train_acc"))] for r in runs_of(entry)]
    if rows:
        blocks.append(Table(["run", "status", "epochs", "mean epoch s", "final train top-1"], rows))
    return blocks


def _timing_sentence(doc: dict[str, Any]) -> str:
    """The header's note on what the timings are. Labs written before run_size was stored keep their sentence."""
    if "run_size" not in doc:
        return (f"Timings are seconds of wall-clock time, the device synchronized before each clock read; evaluation "
                f"is never inside an epoch. The '{REF}' column holds a seed report's figures for orientation only.")
    text = ("Timings are seconds of wall-clock time, read with the device synchronized (on the fast path only at "
            "epoch boundaries: its epoch and data wait are exact, its h2d and compute are not split); evaluation is "
            "never inside an epoch.")
    if doc.get("suite", "lab") == "lab":
        text += f" The '{REF}' column holds a seed report's figures for orientation only."
    return text


def header_blocks(doc: dict[str, Any]) -> list[Block]:
    m = doc.get("machine", {})
    p = doc.get("preset", {})
    blocks: list[Block] = [Heading(f"cifarlab {doc.get('suite', 'lab')} report", 1)]
    if doc.get("data", {}).get("source") == "synthetic":
        blocks.append(Note(f"**{doc['data']['banner']}**"))
    blocks += [
        Table(["", ""], [
            ["status", f"{doc.get('status')} (started {doc.get('started')}, finished {doc.get('finished')}, "
                       f"{fs(doc.get('elapsed_s'), 0)} s)"],
            ["preset", f"{p.get('name')}: {p.get('about')}"],
            ["runs", f"{p.get('epochs')} epoch(s), batch {p.get('batch_size')}, "
                     f"{doc.get('data', {}).get('train_images')} train / {doc.get('data', {}).get('test_images')} test images"
                     + (f", at most {p['max_steps']} steps per epoch" if p.get("max_steps") else "")],
            ["data", doc.get("data", {}).get("description", "?")],
            ["device", doc.get("device", "?")],
            ["CPU", f"{m.get('cpu_model')}; {m.get('usable_cpus', m.get('cpu_count_usable'))} usable of "
                    f"{m.get('cpu_count_host')} cores; {m.get('torch_threads')} torch threads"],
            ["GPU", f"{m.get('gpu_name')} (x{m.get('gpu_count')})" if m.get("gpu_name") else "none"],
            ["software", f"torch {m.get('torch')} (CUDA {m.get('cuda_version')}), torchvision {m.get('torchvision')}, "
                         f"Python {m.get('python')}, {m.get('platform')}"],
            ["fast path", "device-resident loader" if doc.get("fast_loader") == "device"
             else "not installed: classic loader used where the fast path was meant"],
        ]),
        Para(_timing_sentence(doc)),
    ]
    if doc.get("status") == "running":  # the lab records its end (completed / interrupted) before its report
        done = [k for k in doc.get("order", []) if doc.get("experiments", {}).get(k, {}).get("status") == "completed"]
        blocks.append(Note(f"**Unfinished lab**: results.json records no end, so either the lab is still running or its "
                           f"process ended without recording one (killed, or stopped while compiling). Completed items: "
                           f"{', '.join(done) or 'none'}; the sections below show what results.json held."))
    return blocks + time_table_blocks(doc)


@dataclass
class KeptPlots(ReportContext):
    """A report context that keeps the plots already in plots/ instead of drawing them again (the lab's
    last rewrite of its report, which only adds the time table to the header)."""

    def plot(self, name: str, alt: str, draw: Callable[[Any], None], size: tuple[float, float] = (8, 3.6)) -> Image:
        if (self.lab_dir / "plots" / f"{name}.png").is_file():
            self.plots.append(f"plots/{name}.png")
            return Image(f"plots/{name}.png", alt)
        return super().plot(name, alt, draw, size)


# What a renderer raises on results of the right schema but another shape (an edited or foreign results.json)
SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError)


def _shaped(lab_dir: Path, field: str, render: Callable[[], list[Block]]) -> list[Block]:
    """render(), or one UsageError line naming results.json and the field whose content did not fit."""
    try:
        return render()
    except SHAPE_ERRORS as e:
        raise UsageError(f"{str(Path(lab_dir) / 'results.json')!r}: field {field} does not have the shape this "
                         f"cifarlab renders ({type(e).__name__}: {one_line(e, 120)}); the file was edited or written by "
                         f"another program -- rerun the lab") from None


def build_blocks(lab_dir: Path, doc: dict[str, Any], reuse_plots: bool = False) -> tuple[list[Block], ReportContext]:
    rc = (KeptPlots if reuse_plots else ReportContext)(lab_dir=lab_dir, doc=doc)
    blocks = _shaped(lab_dir, "(the header: machine, preset, data, time_table)", lambda: header_blocks(doc))
    for key in doc.get("order", []):
        entry = doc["experiments"].get(key, {"status": "not run"})
        exp = EXPERIMENTS.get(key)
        blocks.append(Heading(entry.get("title", key.upper())))
        if exp is not None and entry.get("status") in ("completed", "skipped"):
            blocks += _shaped(lab_dir, f"experiments.{key}", lambda: exp.render(entry, rc))
        else:
            blocks += _shaped(lab_dir, f"experiments.{key}", lambda: generic_blocks(entry))
    return blocks, rc


def _check_shape(path: Path, doc: dict[str, Any]) -> None:
    """The fields every report reads, before any is used: one line naming the first that does not fit."""
    def bad(field: str, want: str) -> UsageError:
        return UsageError(f"{str(path)!r}: field {field} is not {want}; the file was edited or written by another "
                          f"program -- rerun the lab")
    order, experiments = doc.get("order", []), doc.get("experiments", {})
    if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
        raise bad("order", "a list of item names")
    if not isinstance(experiments, dict):
        raise bad("experiments", "an object")
    for key in order:
        entry = experiments.get(key, {})
        if not isinstance(entry, dict):
            raise bad(f"experiments.{key}", "an object")
        if not isinstance(entry.get("status", ""), str) or not isinstance(entry.get("title", ""), str):
            raise bad(f"experiments.{key}.status/title", "a string")
        if not isinstance(entry.get("runs", []), list):
            raise bad(f"experiments.{key}.runs", "a list")
    for field in ("machine", "preset", "data"):
        if not isinstance(doc.get(field, {}), dict):
            raise bad(field, "an object")


def load_results(lab_dir: Path) -> dict[str, Any]:
    path = Path(lab_dir) / "results.json"
    if not path.is_file():
        raise UsageError(f"{str(lab_dir)!r} is not a lab folder (no results.json); give a folder made by 'cifarlab lab'")
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read ({e}); the lab folder is damaged") from None
    if not isinstance(doc, dict) or doc.get("schema") not in SUPPORTED_SCHEMAS:
        raise UsageError(f"{path} has schema {doc.get('schema') if isinstance(doc, dict) else None!r}; "
                         f"this cifarlab reads {', '.join(SUPPORTED_SCHEMAS)}")
    _check_shape(path, doc)
    return doc


def build_report(lab_dir: Path, reuse_plots: bool = False) -> dict[str, Path]:
    """results.json -> report.md, report.html, csv/*.csv, plots/*.png. Returns the written paths.
    reuse_plots: keep plots/*.png that exist (they were drawn from the same results a moment ago)."""
    lab_dir = Path(lab_dir)
    doc = load_results(lab_dir)
    try:  # plots are written while the blocks are built
        blocks, _ = build_blocks(lab_dir, doc, reuse_plots)
        return write_report(lab_dir, blocks)
    except OSError as e:  # a read-only or full lab folder: the files already there are untouched
        raise UsageError(f"cannot write the report into {str(lab_dir)!r}: {e.strerror or e}; no report file is "
                         f"half-written -- free some space or make the folder writable, then run "
                         f"'cifarlab report' again") from None

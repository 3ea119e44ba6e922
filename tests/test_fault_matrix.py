"""Faults held to train's standard in export, infer-bench, doctor, report and the lab's E: a user's files are
never overwritten, a full disk is one line with no staging left (injected ENOSPC everywhere, plus a real
1 MiB tmpfs when the tests run as root), SIGINT/SIGTERM into real processes end with one line, exit 130/143
and nothing half-written, doctor keeps what it measured, a results.json of the right schema but the wrong
shape is one line, and the export check fails a model it cannot vouch for."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from tests.conftest import train_tiny_run

from cifarlab import cli
from cifarlab.core import fileio
from cifarlab.core.errors import UsageError, raise_if_interrupted
from cifarlab.core.text import one_line
from cifarlab.export import artifacts as ex
from cifarlab.export.check import compare
from cifarlab.model.resnet import resnet18
from cifarlab.run.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FORMAT = ["--format", "torchscript-trace", "--check-images", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = train_tiny_run(tmp_path_factory.mktemp("runs"))
    return run


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("cifarlab: ") and "Traceback" not in err, err
    return err


def _hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")] if folder.exists() else []


# --------------------------------------------------------------------------------- never overwrite


def test_export_refuses_an_out_folder_holding_the_users_files(run_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "resnet18.traced.pt").write_bytes(b"my own model")
    (out / "export.json").write_text('{"mine": true}')
    code = cli.main(["export", str(run_dir), "--out", str(out), *FORMAT])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "no cifarlab export wrote" in err and "nothing was overwritten" in err
    assert (out / "resnet18.traced.pt").read_bytes() == b"my own model"
    assert (out / "export.json").read_text() == '{"mine": true}'


def test_export_replaces_its_own_earlier_export_but_not_a_file_the_user_changed(run_dir, tmp_path, capsys):
    out = tmp_path / "exp"
    assert cli.main(["export", str(run_dir), "--out", str(out), *FORMAT]) == 0
    assert cli.main(["export", str(run_dir), "--out", str(out), *FORMAT]) == 0  # its own files: replaced
    (out / "resnet18.traced.pt").write_bytes(b"edited by the user")
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), "--out", str(out), *FORMAT]) == 2
    assert "'resnet18.traced.pt'" in _one_line(capsys.readouterr().err)
    assert (out / "resnet18.traced.pt").read_bytes() == b"edited by the user"


def test_infer_bench_refuses_an_out_folder_holding_the_users_files(run_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "inferbench.csv").write_text("my,own\n")
    code = cli.main(["infer-bench", str(run_dir), "--out", str(out), "--batch-sizes", "1", "--iters", "1"])
    assert code == 2 and "no cifarlab infer-bench wrote" in _one_line(capsys.readouterr().err)
    assert (out / "inferbench.csv").read_text() == "my,own\n"


# -------------------------------------------------------------------------------------- disk full


def _full_disk_after(monkeypatch, limit: int) -> None:
    """Every atomic write fails with ENOSPC once `limit` bytes went into it (at the real write call)."""
    real = fileio.write_atomic

    def write_atomic(path, write):
        def filling(f):
            class Full:
                written = 0

                def write(self, data):
                    if Full.written + len(data) > limit:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    Full.written += len(data)
                    return f.write(data)
            write(Full())
        return real(path, filling)
    monkeypatch.setattr(fileio, "write_atomic", write_atomic)


def test_export_on_a_full_disk_is_one_line_and_leaves_no_staging(run_dir, tmp_path, capsys, monkeypatch):
    _full_disk_after(monkeypatch, 1 << 20)
    out = tmp_path / "new"
    code = cli.main(["export", str(run_dir), "--out", str(out), *FORMAT])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "No space left on device" in err and str(out) in err
    assert not out.exists()  # the folder it created is gone again: no staging, no temp file


needs_mount = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at mnt for the block, unmounted after it; the test is skipped where this
    container cannot mount one."""
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this container cannot mount a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@needs_mount
def test_export_on_a_real_full_tmpfs(run_dir, tmp_path):
    with mounted_tmpfs(tmp_path / "small", "1m") as mnt:
        (mnt / "keep.txt").write_text("a user's file beside the export")
        proc = subprocess.run([sys.executable, "-m", "cifarlab", "export", str(run_dir), "--out", str(mnt / "exp"),
                               *FORMAT], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert proc.returncode == 2, proc.stderr  # not 134: torch's C++ writer never touches the full disk
        assert "No space left on device" in _one_line(proc.stderr)
        assert sorted(p.name for p in mnt.iterdir()) == ["keep.txt"]  # no staging, no export folder


def test_report_on_a_full_lab_folder_is_one_line(tmp_path, capsys, monkeypatch):
    lab = tmp_path / "lab"
    shutil.copytree(ROOT / "tests" / "fixtures" / "lab-v1-smoke", lab)
    before = (lab / "report.md").read_bytes()
    _full_disk_after(monkeypatch, 0)
    code = cli.main(["report", str(lab)])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "No space left on device" in err and str(lab) in err
    assert (lab / "report.md").read_bytes() == before and not _hidden(lab)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_report_on_a_read_only_lab_folder_is_one_line(tmp_path, capsys):
    lab = tmp_path / "lab"
    shutil.copytree(ROOT / "tests" / "fixtures" / "lab-v1-smoke", lab)
    for p in [lab, *lab.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        code = cli.main(["report", str(lab)])
    finally:
        for p in [lab, *lab.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert code == 2 and "cannot write the report" in _one_line(capsys.readouterr().err)


def test_infer_bench_on_a_full_disk_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "exp"), *FORMAT]) == 0
    capsys.readouterr()
    _full_disk_after(monkeypatch, 0)
    out = tmp_path / "bench"
    code = cli.main(["infer-bench", str(tmp_path / "exp"), "--out", str(out), "--batch-sizes", "1", "--iters", "1",
                     "--warmup", "1", "--device", "cpu"])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "No space left on device" in err and str(out) in err
    assert list(out.iterdir()) == []  # no result file, whole or half, and no temp file


def test_doctor_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    _full_disk_after(monkeypatch, 0)
    code = cli.main(["doctor", "--dataset", "synthetic", "--subset", "32", "--batch-size", "8", "--device", "cpu",
                     "--loader", "torch", "--workers", "0", "--budget", "1", "--out", str(tmp_path / "doc")])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "No space left on device" in err
    assert not [p for p in (tmp_path / "doc").rglob("*") if p.is_file()]


@needs_mount
def test_report_on_a_real_read_only_filesystem(tmp_path, capsys):
    with mounted_tmpfs(tmp_path / "ro", "8m") as mnt:
        shutil.copytree(ROOT / "tests" / "fixtures" / "lab-v1-smoke", mnt / "lab")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        code = cli.main(["report", str(mnt / "lab")])
        err = _one_line(capsys.readouterr().err)
        assert code == 2 and "cannot write the report" in err and "Read-only file system" in err


# ----------------------------------------------------------------------------- results.json shapes


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(order="c1"), "field order"),
    (lambda d: d.update(experiments=[]), "field experiments"),
    (lambda d: d["experiments"].update(c1=[1]), "field experiments.c1"),
    (lambda d: d["experiments"]["c1"].update(runs={"a": 1}), "field experiments.c1.runs"),
    (lambda d: d["experiments"]["c2"].update(runs=[5]), "field experiments.c2"),
    (lambda d: d["experiments"]["c2"].update(runs=[{"label": 1}]), "field experiments.c2"),
    (lambda d: d["experiments"]["c1"]["runs"][0].update(summary=7), "field experiments.c1"),
    (lambda d: d.update(machine="x"), "field machine"),
])
def test_report_on_results_of_the_right_schema_but_the_wrong_shape(tmp_path, capsys, change, field):
    lab = tmp_path / "lab"
    shutil.copytree(ROOT / "tests" / "fixtures" / "lab-v1-smoke", lab)
    doc = json.loads((lab / "results.json").read_text())
    change(doc)
    (lab / "results.json").write_text(json.dumps(doc))
    code = cli.main(["report", str(lab)])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and field in err and "results.json" in err


# ------------------------------------------------------------------------------------------ signals


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "cifarlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(condition, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_into_export_removes_staging(run_dir, tmp_path, sig, code):
    out = tmp_path / "exp"
    proc = _start(["export", str(run_dir), "--out", str(out), "--format", "torchscript-trace,torchscript-script,export",
                   "--check-images", "4"], tmp_path)
    _wait_for(lambda: out.exists() and any(p.name.startswith(".export-staging-") for p in out.iterdir()), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted" in _one_line(err) and "no staging folder is left" in err
    assert not out.exists()  # it created the folder, and left nothing in it


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_into_infer_bench_leaves_no_temporary_export(run_dir, tmp_path, sig, code):
    bare = tmp_path / "run"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("export", "inferbench"))
    proc = _start(["infer-bench", str(bare), "--batch-sizes", "1", "--iters", "100000", "--budget-s", "600",
                   "--device", "cpu"], tmp_path)
    _wait_for(lambda: any((tmp_path / "tmp").iterdir()), proc)  # the temporary export is being written
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted" in _one_line(err)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not list((bare / "inferbench").glob("*")) if (bare / "inferbench").exists() else True


def test_sigint_into_doctor_keeps_the_measurements(tmp_path):
    out = tmp_path / "doc"
    proc = _start(["doctor", "--dataset", "synthetic", "--subset", "64", "--batch-size", "8", "--device", "cpu",
                   "--loader", "torch", "--workers", "0", "--budget", "600", "--out", str(out)], tmp_path)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # the baseline is measured and the first candidate is running
        lines.append(line)
        if line.startswith("plan:"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "measurements taken so far" in _one_line(err) and "doctor.json" in err
    (folder,) = out.iterdir()
    doc = json.loads((folder / "doctor.json").read_text())
    assert doc["stopped_by"] == "SIGINT" and doc["baseline"]["measurements"]
    assert any(c["status"] == "not run" and "SIGINT" in c["reason"] for c in doc["candidates"])


def test_doctor_budget_beyond_a_week_is_refused(capsys):
    code = cli.main(["doctor", "--dataset", "synthetic", "--budget", "1e308"])
    assert code == 2 and "--budget 1e+308 seconds is more than a week" in _one_line(capsys.readouterr().err)


# -------------------------------------------------------------------------------------- the check


def test_the_check_fails_an_error_the_old_tolerance_let_through():
    model = resnet18(norm="none").eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    ref[0, 0] = 3000.0  # one large logit: the old bar was 1e-3 * 3000 = 3 for every logit
    assert compare(lambda t: ref[: len(t)] + 0.5, x, ref)["status"] == "mismatch"
    assert compare(lambda t: ref[: len(t)] * (1 + 1e-5), x, ref)["status"] == "ok"


@pytest.mark.parametrize("bad", [float("nan"), 3.2e5])
def test_a_broken_model_is_inconclusive_never_ok(bad):
    ref = torch.randn(4, 10)
    ref[1, 3] = bad
    check = compare(lambda t: ref[: len(t)].clone(), torch.zeros(4, 3, 32, 32), ref)
    assert check["status"] == "inconclusive" and not check["ok"]


def test_export_of_a_model_with_absurd_logits_writes_nothing(tmp_path):
    model = resnet18(norm="none").eval()
    with torch.no_grad():
        model.linear.weight.mul_(1e6) if hasattr(model, "linear") else model.fc.weight.mul_(1e6)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ex.ExportMismatch, match="inconclusive"):
        ex.export_model(model, tmp_path / "out", ["torchscript-trace"], x)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- messages


def test_a_refused_checkpoint_names_the_blocked_global_not_torchs_advice(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "cifarlab.run.checkpoint/1", "x": Evil()}, path)
    with pytest.raises(UsageError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert "weights_only refused it" in text and "system" in text
    assert "weights_only` set to `False`" not in text and "will likely succeed" not in text


def test_long_messages_are_cut_at_a_word():
    e = RuntimeError("alpha " * 100)
    text = one_line(e, 50)
    assert len(text) <= 50 and text.endswith(" ...") and text[:-4].split(" ")[-1] == "alpha"


# ------------------------------------------------------------------------- the lab and checkpoints


def test_lab_e_on_a_full_disk_is_recorded_failed_and_the_report_is_written(tmp_path, monkeypatch, capsys):
    from cifarlab.lab.items import e_export

    monkeypatch.setitem(e_export.SETTINGS, "smoke", e_export.ESettings(4, (1,), 1, 1, 0.1, ("torchscript-trace",)))

    def full(path, save):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ex, "write_serialized_atomic", full)  # the artifact's write, where the disk fills up
    code = cli.main(["lab", "--preset", "smoke", "--only", "e", "--out", str(tmp_path), "--data", str(tmp_path / "none")])
    capsys.readouterr()
    (lab,) = tmp_path.glob("*-lab-lab-smoke")
    doc = json.loads((lab / "results.json").read_text())
    assert code == 3 and doc["status"] == "partial" and doc["finished"]
    entry = doc["experiments"]["e"]
    assert entry["status"] == "failed" and "No space left on device" in entry["error"]
    assert "Failed: " in (lab / "report.md").read_text() and (lab / "report.html").is_file()
    assert not (lab / "e" / "export").exists() and not _hidden(lab / "e")  # no staging, no temp file


SLOW_WRITER = """
import sys, time, pathlib
import cifarlab.run.checkpoint as ck
real = ck.write_atomic
def slow(path, write):
    if not path.exists():
        return real(path, write)
    pathlib.Path(sys.argv[1]).touch()  # the second checkpoint is being written, slowly (a slow disk)
    class Slow:
        def __init__(self, f): self.f = f
        def write(self, b):
            time.sleep(0.2)
            return self.f.write(b)
        def flush(self): return self.f.flush()
    return real(path, lambda f: write(Slow(f)))
ck.write_atomic = slow
from cifarlab.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_signal_while_a_checkpoint_is_written_still_ends_interrupted(tmp_path):
    """The second signal lands inside torch's C++ zip writer (its Python write callback): torch turns the
    KeyboardInterrupt into a RuntimeError, which used to end the run as "failed" with two tracebacks."""
    marker, out = tmp_path / "writing", tmp_path / "runs"
    script = tmp_path / "slow_disk.py"
    script.write_text(SLOW_WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(marker), "train", "--dataset", "synthetic", "--subset",
                             "16", "--test-subset", "8", "--batch-size", "8", "--max-steps", "1", "--no-evaluate",
                             "--epochs", "50", "--loader", "torch", "--workers", "0", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGTERM)  # first: stop after this epoch
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # second: inside the checkpoint write
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in _one_line(err)
    (run,) = out.iterdir()
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1  # the previous checkpoint, intact
    assert not _hidden(run)  # the half-written temp file is gone


def test_a_signal_torch_wrapped_in_a_runtime_error_is_raised_again():
    class Interrupted(io.RawIOBase):
        calls = 0

        def writable(self):
            return True

        def write(self, data):
            Interrupted.calls += 1
            if Interrupted.calls == 3:
                raise KeyboardInterrupt("a signal inside torch's writer")
            return len(data)
    with pytest.raises(KeyboardInterrupt, match="inside torch's writer"):
        try:
            torch.save({"a": torch.zeros(1000), "b": torch.zeros(1000)}, Interrupted())
        except Exception as e:  # what every "report it and go on" handler does
            assert isinstance(e, RuntimeError)  # torch's wrapping: the reason this helper exists
            raise_if_interrupted(e)


def test_lab_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    _full_disk_after(monkeypatch, 0)  # results.json itself cannot be written
    code = cli.main(["lab", "--preset", "smoke", "--only", "q", "--out", str(tmp_path), "--data", str(tmp_path / "none")])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "No space left on device" in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no half-written results.json, no temp file

"""cifarlab export / infer-bench: every format available here is written, reloaded from disk and matches
eager within the stated tolerance; bad input is one line and exit 2 with nothing half-written; the latency
benchmark writes its table, CSV, JSON and plot. One tiny run is trained once for the whole module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import train_tiny_run

from cifarlab import cli
from cifarlab.export import artifacts as ex
from cifarlab.export import bench as ib
from cifarlab.model.resnet import resnet18

ROOT = Path(__file__).resolve().parents[1]

CI_FORMATS = [f for f in ("torchscript-trace", "torchscript-script", "export", "onnx") if f != "onnx" or not ex.onnx_missing()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = train_tiny_run(tmp_path_factory.mktemp("runs"), subset=32, test_subset=16, batch_size=16)
    return run


@pytest.fixture(scope="module")
def exported(run_dir) -> Path:
    code = cli.main(["export", str(run_dir), "--format", ",".join(CI_FORMATS), "--check-images", "8"])
    assert code == 0
    return run_dir / "export"


def test_every_format_reloads_and_matches_eager(exported, run_dir):
    info = json.loads((exported / "export.json").read_text())
    assert info["schema"] == "cifarlab.export/1" and info["status"] == "ok"
    assert info["formats"] == CI_FORMATS and info["source"]["run_dir"] == str(run_dir)
    assert info["torch"] == str(torch.__version__) and info["input"]["shape"] == ["batch", 3, 32, 32]
    tol, rtol = info["check"]["tolerance_abs"], info["check"]["tolerance_relative"]
    assert tol == 1e-3 and rtol == 1e-3 and "per logit |logit - eager|" in info["check"]["rule"]
    # Independently of the checks export.py made: reload each file and compare with the checkpoint's weights.
    model, _ = ex.load_run_model(run_dir)
    x, _ = ex.check_batch({"dataset": "synthetic", "seed": 0}, 8)
    with torch.no_grad():
        ref = model(x)
    for fmt in CI_FORMATS:
        a = info["artifacts"][fmt]
        path = exported / a["file"]
        assert path.stat().st_size == a["bytes"] and ex.sha256_file(path) == a["sha256"]
        assert a["check"]["ok"] and a["check"]["worst_diff_over_tolerance"] <= 1 and a["dynamic_batch"]
        fn = ex.load_artifact(fmt, path, torch.device("cpu"))
        with torch.no_grad():
            for batch in (x, x[:3]):  # the example batch size and another one
                out = fn(batch)
                assert ((out - ref[: len(batch)]).abs() <= rtol * ref[: len(batch)].abs() + tol).all(), fmt
                assert torch.equal(out.argmax(1), ref[: len(batch)].argmax(1)), fmt
    assert not [p for p in exported.iterdir() if p.name.startswith(".")]  # no staging or temp files left


def test_graph_files_show_the_difference_between_tracing_and_scripting(exported):
    info = json.loads((exported / "export.json").read_text())
    scripted = (exported / ex.GRAPH_FILES["torchscript-script"]).read_text()
    traced = (exported / ex.GRAPH_FILES["torchscript-trace"]).read_text()
    program = (exported / ex.GRAPH_FILES["export"]).read_text()
    assert "def forward" in scripted and "self.training" in scripted  # BatchNorm's branch survives scripting
    assert "aten::batch_norm" in traced and "graph(" in traced
    assert "batch" in program and "aten" in program
    assert ex.graph_excerpt(exported, "torchscript-script", 3).count("\n") == 3
    tvs = info["tracing_vs_scripting"]
    assert tvs["traced_train_mode_max_abs_logit_change"] == 0.0  # eval-mode BatchNorm frozen into the trace
    assert tvs["scripted_train_mode_max_abs_logit_change"] > 0.0


def test_in_memory_export_for_the_lab_and_mismatch_is_an_error_that_writes_nothing(tmp_path, monkeypatch):
    model = resnet18(norm="none").eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    real = ex.load_artifact

    def off_by_a_bit(fmt, path, device):
        fn = real(fmt, path, device)
        return lambda t: fn(t) + 0.01
    monkeypatch.setattr(ex, "load_artifact", off_by_a_bit)
    with pytest.raises(ex.ExportMismatch, match="does not match eager") as err:
        ex.export_model(model, tmp_path / "bad", ["torchscript-script"], x)
    assert err.value.report["status"] == "mismatch" and err.value.exit_code == 2
    assert err.value.report["source"] == {"in_memory": True}
    assert "tracing_vs_scripting" not in err.value.report  # no BatchNorm, and only one TorchScript flavour
    assert not (tmp_path / "bad").exists()  # the folder it created is gone again, nothing half-written
    kept = ex.export_model(model, tmp_path / "kept", ["torchscript-script"], x, raise_on_mismatch=False)
    assert kept["status"] == "mismatch" and (tmp_path / "kept" / "export.json").is_file()


def _tampered(run_dir: Path, tmp: Path) -> Path:
    bad = tmp / "tampered"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("export", "inferbench"))
    data = bytearray((bad / "checkpoint.pt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    (bad / "checkpoint.pt").write_bytes(bytes(data[: len(data) // 2 + 64]))  # garbled and truncated
    return bad


def _other_model(run_dir: Path, tmp: Path) -> Path:
    other = tmp / "other-model"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("export", "inferbench"))
    ckpt = torch.load(other / "checkpoint.pt", weights_only=True)
    ckpt["model"] = torch.nn.Linear(3, 10).state_dict()
    torch.save(ckpt, other / "checkpoint.pt")
    return other


def _no_checkpoint(run_dir: Path, tmp: Path) -> Path:
    bare = tmp / "no-ckpt"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("export", "inferbench", "checkpoint.pt"))
    return bare


BAD_EXPORTS = [
    ("no checkpoint", lambda r, t: ["export", str(_no_checkpoint(r, t))], "has no checkpoint.pt"),
    ("not a folder", lambda r, t: ["export", str(t / "missing")], "is not a folder"),
    ("tampered", lambda r, t: ["export", str(_tampered(r, t))], "not a loadable cifarlab checkpoint"),
    ("another model", lambda r, t: ["export", str(_other_model(r, t))], "does not hold cifarlab's ResNet-18"),
    ("unknown format", lambda r, t: ["export", str(r), "--format", "torchscript,export"], "'torchscript' is not known"),
    ("empty format", lambda r, t: ["export", str(r), "--format", ","], "names no format"),
    ("check images", lambda r, t: ["export", str(r), "--check-images", "0"], "--check-images 0"),
    ("bench batch", lambda r, t: ["infer-bench", str(r), "--batch-sizes", "1,x"], "--batch-sizes '1,x'"),
    ("bench iters", lambda r, t: ["infer-bench", str(r), "--iters", "0"], "--iters 0"),
    ("bench not a run", lambda r, t: ["infer-bench", str(t)], "neither a run folder nor an export folder"),
]


@pytest.mark.parametrize("argv, needle", [pytest.param(a, n, id=i) for i, a, n in BAD_EXPORTS])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, argv, needle):
    before = sorted(p.name for p in run_dir.iterdir())
    code = cli.main(argv(run_dir, tmp_path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing new in the run folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_out_folder_is_one_line(run_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = cli.main(["export", str(run_dir), "--format", "torchscript-script", "--out", str(locked / "x")])
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not writable" in err
    assert list(locked.iterdir()) == []


def test_unwritable_out_folder_file_in_the_way(run_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = cli.main(["export", str(run_dir), "--format", "torchscript-script", "--out", str(blocker / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--out" in err and "not writable" in err
    assert blocker.read_text() == "not a folder"


def test_onnx_is_optional(monkeypatch):
    monkeypatch.setattr(ex, "onnx_missing", lambda: "needs onnx: pip install 'cifarlab[onnx]'")
    formats, skipped = ex.parse_formats(None)
    assert "onnx" not in formats and "cifarlab[onnx]" in skipped["onnx"]
    with pytest.raises(ex.UsageError, match=r"--format onnx needs onnx"):
        ex.parse_formats("export,onnx")


def test_infer_bench_writes_table_csv_json_and_plot(exported, tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main(["infer-bench", str(exported), "--batch-sizes", "1,3", "--iters", "2", "--warmup", "1",
                     "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    names = {"eager", "torchscript-trace", "torchscript-script", "export"} | ({"onnxruntime"} if "onnx" in CI_FORMATS else set())
    data = json.loads((out / "inferbench.json").read_text())
    assert data["schema"] == "cifarlab.inferbench/1" and data["environment"]["cpu"]["cpu_count_usable"] >= 1
    rows = data["rows"]
    assert {r["variant"] for r in rows} == names and {r["batch_size"] for r in rows} == {1, 3}
    for r in rows:
        assert r["status"] == "ok" and r["iters"] == 2
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
    assert "| cpu | eager | fp32 | 1 |" in printed and (out / "inferbench.txt").read_text().startswith("| device |")
    assert (out / "inferbench.csv").read_text().splitlines()[0].startswith("device,variant,precision,batch_size")
    assert (out / "inferbench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_api_on_in_memory_callables():
    model = torch.nn.Conv2d(3, 4, 3)  # bench() times any callable; a small one keeps the test fast
    calls = []
    variants = [ib.Variant("eager", model, torch.device("cpu")),
                ib.Variant("broken", lambda x: 1 / 0, torch.device("cpu"))]
    rows = ib.bench(variants, [2], iters=3, warmup=1, log=calls.append)
    ok, broken = rows
    assert ok["iters"] == 3 and ok["speedup_vs_eager_p50"] == 1.0
    assert broken["status"].startswith("failed: ZeroDivisionError") and broken.get("p50_ms") is None
    assert calls and "batch 2" in calls[0]
    assert "failed: ZeroDivisionError" in ib.format_table(rows)


def _cmake_hints() -> list[str]:
    """Where a CUDA build of the torch wheel finds the CUDA toolkit and NVRTC its CMake config asks for."""
    if torch.version.cuda is None:
        return []
    hints = []
    toolkits = [Path(os.environ["CUDA_HOME"])] if os.environ.get("CUDA_HOME") else sorted(Path("/usr/local").glob("cuda*"))
    toolkit = next((t for t in toolkits if (t / "include" / "cuda_runtime.h").is_file()), None)
    if toolkit:
        hints.append(f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}")
    lib_dirs = [toolkit / "lib64"] if toolkit else []
    lib_dirs += [d for p in sys.path for d in sorted(Path(p).glob("nvidia/*/lib"))]  # the nvidia-* pip packages
    libs = [lib for d in lib_dirs if d.is_dir() for lib in sorted(d.glob("libnvrtc.so*"))]
    if libs:
        hints.append(f"-DCUDA_nvrtc_LIBRARY={libs[0]}")
    return hints


@pytest.mark.skipif(os.environ.get("CIFARLAB_BUILD_LIBTORCH") != "1",
                    reason="building examples/libtorch against the wheel's LibTorch takes ~30 s on 2 cores; set CIFARLAB_BUILD_LIBTORCH=1")
def test_libtorch_example_loads_the_torchscript_file(exported, tmp_path):
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} on PATH")
    prefix = Path(torch.utils.cmake_prefix_path)
    if not (prefix / "Torch" / "TorchConfig.cmake").is_file():
        pytest.skip(f"the torch wheel ships no CMake config under {prefix}")
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(ROOT / "examples" / "libtorch"), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                                "-DCMAKE_BUILD_TYPE=Release", *_cmake_hints()], capture_output=True, text=True)
    if configure.returncode != 0:
        first = next((line for line in configure.stderr.splitlines() if "rror" in line), configure.stderr[-200:])
        pytest.skip(f"LibTorch's CMake config does not configure here: {first.strip()}")
    built = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-2000:]
    x, _ = ex.check_batch({"dataset": "synthetic", "seed": 0}, 5)
    x.numpy().astype("<f4").tofile(tmp_path / "images.f32")
    ran = subprocess.run([str(build / "infer"), str(exported / ex.ARTIFACTS["torchscript-trace"]), str(tmp_path / "images.f32"), "5"],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    with torch.no_grad():
        logits = ex.load_artifact("torchscript-trace", exported / ex.ARTIFACTS["torchscript-trace"], torch.device("cpu"))(x)
    lines = ran.stdout.splitlines()
    assert len(lines) == 5
    for i, line in enumerate(lines):
        top1 = int(logits[i].argmax())
        assert line.startswith(f"image {i}: top-1 {top1} (logit "), line
        assert abs(float(line.split("logit ")[1].rstrip(")")) - float(logits[i, top1])) < 1e-4

"""infer-bench's trust policy for export folders (exporttrust.py): export.json validated field by field, every
artifact inside the folder and matching its recorded sha256, code-carrying formats refused without
--allow-code-execution, one console line per refused artifact, exit 2 when nothing but eager is left. The
crafted .pt2 below really runs code when torch loads it: the flag's test proves the refusal is what stops it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from tests.conftest import train_tiny_run

from cifarlab import cli
from cifarlab.export import artifacts as ex
from cifarlab.export import trust

BENCH = ["--batch-sizes", "2", "--iters", "1", "--warmup", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = train_tiny_run(tmp_path_factory.mktemp("runs"))
    assert cli.main(["export", str(run), "--format", "torchscript-trace,export", "--check-images", "4"]) == 0
    return run


def _copy(run_dir: Path, tmp: Path) -> Path:
    folder = tmp / "export"
    shutil.copytree(run_dir / "export", folder)
    return folder


def _edit_json(folder: Path, change) -> None:
    info = json.loads((folder / "export.json").read_text())
    change(info)
    (folder / "export.json").write_text(json.dumps(info))


def _record(folder: Path, fmt: str, file: str) -> None:
    """What an adversary does after editing an artifact: record the new file's size and sha256."""
    data = (folder / file).read_bytes()

    def change(info):
        info["artifacts"][fmt].update(file=file, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    _edit_json(folder, change)


def _bench(folder: Path, tmp: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["infer-bench", str(folder), "--out", str(tmp / "bench"), *BENCH, *extra])
    out, err = capsys.readouterr()
    return code, out, err


class Evil:
    """Unpickling this runs a shell command (what a crafted pickle can do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _craft_pickled_pt2(folder: Path, marker: Path) -> None:
    """Rewrite resnet18.exported.pt2 so its first weight is a pickle marked use_pickle (torch.export.load
    unpickles it with weights_only=False), then record the new sha256 in export.json."""
    path = folder / ex.ARTIFACTS["export"]
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                victim = first["path_name"]
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as tmp, zipfile.ZipFile(out, "w") as dst:
        for item in tmp.infolist():
            data = tmp.read(item.filename)
            if item.filename.endswith(f"/data/weights/{victim}"):
                payload = io.BytesIO()
                torch.save(Evil(marker), payload)
                data = payload.getvalue()
            dst.writestr(item, data)
    path.write_bytes(out.getvalue())
    _record(folder, "export", ex.ARTIFACTS["export"])


def test_untouched_folder_benchmarks_every_artifact(run_dir, tmp_path, capsys):
    code, out, err = _bench(_copy(run_dir, tmp_path), tmp_path, capsys)
    assert code == 0, err
    assert "not benchmarked" not in out
    rows = json.loads((tmp_path / "bench" / "inferbench.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"eager", "torchscript-trace", "export"}


def test_tampered_artifact_is_one_line_and_the_rest_still_run(run_dir, tmp_path, capsys):
    folder = _copy(run_dir, tmp_path)
    data = bytearray((folder / ex.ARTIFACTS["torchscript-trace"]).read_bytes())
    data[-100] ^= 0xFF
    (folder / ex.ARTIFACTS["torchscript-trace"]).write_bytes(bytes(data))
    code, out, err = _bench(folder, tmp_path, capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if "not benchmarked" in line]
    assert len(lines) == 1 and "torchscript-trace" in lines[0] and "sha256" in lines[0]
    rows = json.loads((tmp_path / "bench" / "inferbench.json").read_text())
    assert {r["variant"] for r in rows["rows"]} == {"eager", "export"}
    assert "sha256" in rows["skipped"]["cpu"]["torchscript-trace"]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_artifact_outside_the_folder_is_refused(run_dir, tmp_path, capsys, how):
    folder = _copy(run_dir, tmp_path)
    outside = tmp_path / "elsewhere.pt"
    shutil.copy(folder / ex.ARTIFACTS["torchscript-trace"], outside)
    name = {"dotdot": "../elsewhere.pt", "absolute": str(outside), "symlink": "link.pt"}[how]
    if how == "symlink":
        (folder / "link.pt").symlink_to(outside)
    _record(folder, "torchscript-trace", name)
    code, out, err = _bench(folder, tmp_path, capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "not benchmarked" in line]
    assert "outside the export folder" in line and "torchscript-trace" in line


def test_pt2_with_a_pickled_entry_is_refused_unless_the_flag_names_the_risk(run_dir, tmp_path, capsys):
    folder = _copy(run_dir, tmp_path)
    marker = tmp_path / "code-ran"
    _craft_pickled_pt2(folder, marker)
    code, out, err = _bench(folder, tmp_path, capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "not benchmarked" in line]
    assert "use_pickle" in line and "--allow-code-execution" in line
    assert not marker.exists()  # refused before torch could unpickle it
    # The same folder with the flag: torch's loader unpickles the entry and the command runs. This proves the
    # crafted file is real and that the refusal above is what kept it from running.
    cli.main(["infer-bench", str(folder), "--out", str(tmp_path / "b2"), *BENCH, "--allow-code-execution"])
    capsys.readouterr()
    assert marker.exists()


def test_pt2_with_extra_members_is_refused(run_dir, tmp_path):
    folder = _copy(run_dir, tmp_path)
    data = (folder / ex.ARTIFACTS["export"]).read_bytes()
    assert trust.pt2_code_risk(data) is None  # what torch.export.save writes passes
    buf = io.BytesIO(data)
    with zipfile.ZipFile(buf, "a") as z:
        root = z.namelist()[0].split("/")[0]
        z.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    assert "aotinductor" in trust.pt2_code_risk(buf.getvalue())


def test_aoti_package_is_refused_without_the_flag(run_dir, tmp_path, capsys):
    folder = _copy(run_dir, tmp_path)
    (folder / ex.ARTIFACTS["aoti"]).write_bytes(b"PK\x05\x06" + b"\0" * 18)  # any bytes: it is never opened

    def add(info):
        info["artifacts"]["aoti"] = {"file": ex.ARTIFACTS["aoti"]}
    _edit_json(folder, add)
    _record(folder, "aoti", ex.ARTIFACTS["aoti"])
    code, out, err = _bench(folder, tmp_path, capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "not benchmarked" in line]
    assert "aoti" in line and "AOTInductor" in line and "--allow-code-execution" in line


def test_nothing_left_to_benchmark_is_exit_2(run_dir, tmp_path, capsys):
    folder = _copy(run_dir, tmp_path)
    for fmt in ("torchscript-trace", "export"):
        (folder / ex.ARTIFACTS[fmt]).unlink()
    code, out, err = _bench(folder, tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "nothing to benchmark" in err and "Traceback" not in err
    assert out.count("not benchmarked") == 2 and out.count("missing") == 2
    assert not (tmp_path / "bench" / "inferbench.json").exists()


@pytest.mark.parametrize("change, field", [
    (lambda i: i.update(artifacts=["resnet18.traced.pt"]), "field artifacts is list"),
    (lambda i: i["artifacts"]["export"].update(sha256=12), "field artifacts.export.sha256"),
    (lambda i: i["artifacts"]["export"].pop("file"), "field artifacts.export.file"),
    (lambda i: i["artifacts"]["export"].update(bytes=True), "field artifacts.export.bytes"),
    (lambda i: i.update(source="x"), "field source"),
    (lambda i: i["source"].update(run_dir=5), "field source.run_dir"),
    (lambda i: i.update(schema="other/9"), "field schema"),
    (lambda i: i["artifacts"].update(pickle={}), "field artifacts.pickle"),
])
def test_export_json_of_the_wrong_shape_is_one_line(run_dir, tmp_path, capsys, change, field):
    folder = _copy(run_dir, tmp_path)
    _edit_json(folder, change)
    code, out, err = _bench(folder, tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert field in err and "export.json" in err


def test_export_json_that_is_a_list_is_one_line(run_dir, tmp_path, capsys):
    folder = _copy(run_dir, tmp_path)
    (folder / "export.json").write_text("[1, 2]")
    code, _, err = _bench(folder, tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "a JSON object" in err

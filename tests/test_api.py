"""The public Python API (cifarlab.api, reached through the package root): a notebook user trains a tiny
synthetic run, reads its records and run folder, inspects the model and exports the run, and gets the
CLI's one-line errors as UsageError. `import cifarlab` itself stays torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import one_line

import cifarlab
from cifarlab import TrainConfig, UsageError, export_run, inspect_model, load_run, train_model
from cifarlab.cli import main


def test_import_cifarlab_is_light_and_every_api_name_resolves() -> None:
    code = ("import sys, cifarlab; print('torch' in sys.modules); "
            "[getattr(cifarlab, n) for n in cifarlab.__all__]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]  # light until an API name is used, then the API is there
    assert set(cifarlab.__all__) <= set(dir(cifarlab))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        cifarlab.nonexistent  # noqa: B018


def test_train_inspect_and_export_through_the_api(tmp_path: Path) -> None:
    cfg = TrainConfig(dataset="synthetic", subset=16, test_subset=16, epochs=2, batch_size=8, max_steps=2,
                      device="cpu", loader="torch", workers=0, out_dir=str(tmp_path / "runs"))
    result = train_model(cfg, lr=0.05)
    assert result.status == "completed" and result.config.lr == 0.05
    assert [r.epoch for r in result.records] == [1, 2] and all(r.steps == 2 for r in result.records)
    for r in result.records:  # the same timings the CLI records, adding up to the epoch
        assert r.data_s + (r.h2d_s or 0) + (r.compute_s or 0) + r.other_s == pytest.approx(r.epoch_s, rel=1e-9)
    saved = json.loads((result.path / "records.json").read_text())
    assert [row["train_loss"] for row in saved] == [r.train_loss for r in result.records]
    assert load_run(result.path)["config"]["lr"] == 0.05

    facts = inspect_model(("sgd",), batch_size=1)
    assert facts["conv_layers"] == 20 and facts["optimizers"]["sgd"]["gradient_elements"] == 11_173_962

    info, out = export_run(result.path, ["torchscript-trace"], out_dir=tmp_path / "export")
    assert info["status"] == "ok" and (out / "export.json").is_file()


def test_bad_input_raises_the_clis_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UsageError) as caught:
        train_model(TrainConfig(dataset="synthetic", lr=-1.0, out_dir=str(tmp_path)))
    assert main(["train", "--dataset", "synthetic", "--lr", "-1", "--out", str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err) == f"cifarlab: error: {caught.value}\n"
    assert not any(tmp_path.iterdir())  # nothing written for bad input

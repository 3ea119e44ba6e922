"""The lab's E section (export and inference): a smoke lab with C1, E and C7 exports C1's own trained
model, checks each reloaded artifact against eager, quotes the graphs and times them, and the report shows
it; C7 still reuses C1's run (which now keeps a checkpoint); `--only e` trains C1's config itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cifarlab.cli import main
from cifarlab.export.check import LOGIT_LIMIT
from cifarlab.lab.items import e_export
from cifarlab.run.checkpoint import CHECKPOINT_NAME

SMOKE_FORMATS = ("torchscript-trace", "torchscript-script", "export")


def _lab(out: Path, only: str) -> tuple[int, Path, dict, str]:
    code = main(["lab", "--preset", "smoke", "--only", only, "--out", str(out), "--data", str(out / "no-data")])
    (lab,) = out.glob("*-lab-lab-smoke")
    return code, lab, json.loads((lab / "results.json").read_text()), (lab / "report.md").read_text()


def section(md: str, name: str) -> str:
    """From the '## name ...' heading to the next heading of level 1-2 (code blocks hold '#' lines)."""
    m = re.search(rf"^## {name} .*?$(.*?)(?=^#{{1,2}} |\Z)", md, flags=re.M | re.S)
    assert m, f"no section {name} in report.md"
    return m.group(1)


@pytest.fixture(scope="module")
def lab_c1_e(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, dict, str]:
    return _lab(tmp_path_factory.mktemp("labs"), "c1,e,c7")


def test_e_exports_c1s_trained_model_and_c7_still_reuses_c1(lab_c1_e: tuple[int, Path, dict, str]) -> None:
    code, lab, doc, _ = lab_c1_e
    assert code == 0
    assert doc["order"] == ["c1", "e", "c7"]  # E right after C1
    exps = doc["experiments"]
    assert all(exps[k]["status"] == "completed" for k in doc["order"]), {k: exps[k].get("error") for k in exps}
    c1 = exps["c1"]["runs"][0]
    assert (lab / c1["path"] / CHECKPOINT_NAME).is_file()  # the last epoch only (lab runs keep none otherwise)
    assert c1["config"]["checkpoint_every"] == c1["config"]["epochs"]
    res = exps["e"]["result"]
    assert res["model_from"] == "c1" and res["run_path"] == c1["path"] and exps["e"]["runs"] == []
    assert res["checkpoint_epoch"] == c1["summary"]["epochs_completed"]
    bn = next(r for r in exps["c7"]["runs"] if r["label"] == "batchnorm")
    assert bn["reused"] and bn["path"] == c1["path"]  # checkpoint_every is not part of a run's identity


def test_every_reloaded_format_matches_eager(lab_c1_e: tuple[int, Path, dict, str]) -> None:
    _, lab, doc, _ = lab_c1_e
    exp = doc["experiments"]["e"]["result"]["export"]
    # a smoke run (2 steps at lr 0.1, eval-mode BatchNorm on garbage running statistics) may have logits far
    # beyond any sane classifier's: its check is then "inconclusive", never "ok" (exportcheck.py)
    broken = max(a["check"]["max_abs_eager_logit"] for a in exp["artifacts"].values()) > LOGIT_LIMIT
    assert exp["formats"] == list(SMOKE_FORMATS) and exp["status"] == ("inconclusive" if broken else "ok")
    on_disk = json.loads((lab / "e" / "export" / "export.json").read_text())
    for fmt in SMOKE_FORMATS:
        a = exp["artifacts"][fmt]
        assert a["check"]["status"] == exp["status"] and a["check"]["worst_diff_over_tolerance"] <= 1
        assert a["check"]["top1_agree_decisive"] == a["check"]["decisive_images"] and a["dynamic_batch"]
        assert (lab / "e" / "export" / a["file"]).stat().st_size == a["bytes"] == on_disk["artifacts"][fmt]["bytes"]
    facts = exp["tracing_vs_scripting"]
    assert facts["traced_train_mode_max_abs_logit_change"] == 0  # tracing froze eval-mode BatchNorm
    assert facts["scripted_train_mode_max_abs_logit_change"] > 0  # scripting kept `if self.training`
    assert {p.name for p in (lab / "e" / "inferbench").iterdir()} >= {"inferbench.json", "inferbench.csv", "inferbench.png"}


def test_report_has_the_e_section_with_its_numbers(lab_c1_e: tuple[int, Path, dict, str]) -> None:
    _, lab, doc, md = lab_c1_e
    assert md.index("## C1 ") < md.index("## E Export and inference") < md.index("## C7 ")
    e = section(md, "E")
    res = doc["experiments"]["e"]["result"]
    assert f"Model: C1's run `{res['run_path']}`" in e
    for fmt in SMOKE_FORMATS:  # the format table: file, size, max |logit diff|, top-1 agreement, ok
        a = res["export"]["artifacts"][fmt]
        c = a["check"]
        row = (f"| {e_export.FORMAT_TITLES[fmt]} | `{a['file']}` | {a['bytes'] / 2**20:.1f} | "
               f"{c['max_abs_logit_diff']:.2e} | {c['batch1_max_abs_logit_diff']:.2e} | {c['top1_agree']}/{c['images']} | yes |")
        assert row in e, row
    passed = "**Inconclusive**" if res["export"]["status"] == "inconclusive" else "Every format passed."
    assert "max abs logit diff vs eager (batch 8)" in e and passed in e
    assert "**Tracing vs scripting.**" in e and "`if self.training`" in e and "Measured on this model" in e
    code_blocks = re.findall(r"^```\n(.*?)\n```$", e, flags=re.M | re.S)
    assert len(code_blocks) == 3
    assert code_blocks[0].startswith("graph(")  # traced: the inlined graph
    assert code_blocks[1].startswith("def forward(self,")  # scripted: ResNet.forward's TorchScript code
    assert "torch.ops.aten.conv2d" in code_blocks[2]  # the exported program
    assert all(len(b.splitlines()) <= e_export.EXCERPT_LINES for b in code_blocks)
    assert "| device | variant | precision | batch | calls timed |" in e
    rows = res["latency"]["rows"]
    assert {(r["variant"], r["batch_size"]) for r in rows} == {(v, b) for v in ("eager",) + SMOKE_FORMATS for b in (1, 8)}
    for r in rows:
        assert r["status"] == "ok" and r["iters"] == 3
        assert f"| {r['device']} | {r['variant']} | fp32 | {r['batch_size']} | 3 | {r['first_call_ms']:.1f} | {r['p50_ms']:.2f} |" in e
    assert "![E inference latency per batch](plots/e_latency.png)" in e and (lab / "plots" / "e_latency.png").is_file()
    assert {"e_formats.csv", "e_latency.csv"} <= {p.name for p in (lab / "csv").iterdir()}


def test_report_command_rebuilds_the_e_section(lab_c1_e: tuple[int, Path, dict, str]) -> None:
    _, lab, _, md = lab_c1_e
    assert main(["report", str(lab)]) == 0
    assert section((lab / "report.md").read_text(), "E") == section(md, "E")


def test_only_e_trains_c1s_config_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    # The path without C1, made small: one format, batch 1, one timed call (the full smoke E is tested above).
    monkeypatch.setitem(e_export.SETTINGS, "smoke", e_export.ESettings(4, (1,), 1, 1, 0.1, ("torchscript-script",)))
    code, lab, doc, md = _lab(tmp_path, "e")
    # The console follows E as it goes: each format's export and check, then the latency per batch size.
    out = capsys.readouterr().out
    assert re.search(r"TorchScript, scripted: written in [0-9.]+ s, reloaded and checked in [0-9.]+ s, max \|logit "
                     r"diff\| \S+ against a per-logit tolerance of 0.001 \* \|logit\| \+ 0.001: (ok|INCONCLUSIVE)", out), out
    assert re.search(r"cpu batch 1, p50 per call: eager [0-9.]+ ms, torchscript-script [0-9.]+ ms", out), out
    assert code == 0 and doc["order"] == ["e"]
    entry = doc["experiments"]["e"]
    assert entry["status"] == "completed", entry.get("error")
    res = entry["result"]
    (run,) = entry["runs"]
    assert res["model_from"] == "e" and res["run_path"] == run["path"] and run["path"].startswith("e/")
    assert (lab / run["path"] / CHECKPOINT_NAME).is_file() and res["export"]["status"] in ("ok", "inconclusive")
    e = section(md, "E")
    assert "C1 did not run in this lab, so E trained C1's configuration itself" in e
    assert "| TorchScript, scripted | `resnet18.scripted.pt` |" in e and "def forward(self," in e
    assert "| cpu | eager | fp32 | 1 | 1 |" in e

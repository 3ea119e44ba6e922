"""Bad input never gets a traceback: a table of hand-picked bad invocations (beyond the 14 in
tests/test_cli.py), each answered with exit code 2 and one line naming the value, and a hypothesis
fuzz test driving the real parser and config validation with random and hostile argv."""

from __future__ import annotations

import json
import os
import pickle
import socket

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cifarlab.cli.commands as commands
from cifarlab.cli import build_parser, config_from_args, main
from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.run.checkpoint import CHECKPOINT_NAME, save_checkpoint
from cifarlab.step.state import EpochRecord
from cifarlab.train.engine import build_state

RUN_CFG = TrainConfig(dataset="synthetic", subset=16, test_subset=10, batch_size=8, epochs=2, loader="torch",
                      workers=0)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cifarlab-badinput-pwned",))


def _record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch=epoch, status="ok", train_loss=2.0, train_acc=0.1, test_loss=None, test_acc=None,
                       images=16, steps=2, epoch_s=1.0, data_s=0.1, h2d_s=0.0, compute_s=0.9, other_s=0.0,
                       loader_start_s=0.0, eval_s=None, images_per_s=16.0, timing_mode="synchronized")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders in every broken state a --resume can meet, built by hand (no training)."""
    root = tmp_path_factory.mktemp("runs")

    def folder(name, config=RUN_CFG.to_dict(), run=None):
        path = root / name
        path.mkdir()
        if config is not None:
            (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        (path / "run.json").write_text(json.dumps(run or {"status": "interrupted"}))
        return path

    paths = {"empty": folder("empty", config=None), "notjson": folder("notjson", config="{not json"),
             "list": folder("list", config="[1, 2]"), "unknown": folder("unknown", config={**RUN_CFG.to_dict(), "bogus": 1}),
             "badtype": folder("badtype", config={**RUN_CFG.to_dict(), "batch_size": "128"}),
             "nockpt": folder("nockpt")}
    state = build_state(RUN_CFG, torch.device("cpu"))
    state.epoch, state.records = 2, [_record(1), _record(2)]
    paths["finished"] = folder("finished")
    save_checkpoint(paths["finished"], RUN_CFG, state)
    paths["edited"] = folder("edited", config=RUN_CFG.replace(lr=0.5).to_dict())
    save_checkpoint(paths["edited"], RUN_CFG, state)
    paths["evil"] = folder("evil")
    with open(paths["evil"] / CHECKPOINT_NAME, "wb") as f:
        pickle.dump({"format": "cifarlab.checkpoint/1", "model": _Payload()}, f)
    paths["truncated"] = folder("truncated")
    (paths["truncated"] / CHECKPOINT_NAME).write_bytes((paths["finished"] / CHECKPOINT_NAME).read_bytes()[:4096])
    # run.json says a live process on this host is still training it (our parent process is alive)
    paths["live"] = folder("live", run={"status": "running", "host": socket.gethostname(), "pid": os.getppid()})
    (root / "afile").write_text("x")
    paths["afile"] = root / "afile"
    return paths


# (argv, text the one-line message must contain: the bad value, quoted as the user typed it where possible)
BAD = [
    (["train", "--workers", "100000"], "--workers must be between 0 and 256 (got 100000)"),
    (["train", "--batch-size", "-3"], "--batch-size must be between 1 and 1048576 (got -3)"),
    (["train", "--batch-size", "2000000"], "(got 2000000)"),
    (["train", "--batch-size", "1e3"], "invalid int value: '1e3'"),
    (["train", "--test-batch-size", "0"], "--test-batch-size must be between 1 and 1048576 (got 0)"),
    (["train", "--epochs", "-1"], "--epochs must be between 1 and 100000 (got -1)"),
    (["train", "--epochs", "1000001"], "(got 1000001)"),
    (["train", "--epochs"], "argument --epochs: expected one argument"),
    (["train", "--lr", "inf"], "--lr must be a finite number (got inf)"),
    (["train", "--lr", "-inf"], "--lr must be a finite number (got -inf)"),
    (["train", "--lr", "0"], "--lr must be in (0.0, 1000.0] (got 0.0)"),
    (["train", "--lr", "5000"], "(got 5000.0)"),
    (["train", "--lr", "ten"], "invalid float value: 'ten'"),
    (["train", "--lr", "1e999"], "--lr must be a finite number (got inf)"),
    (["train", "--momentum", "1.0"], "--momentum must be in [0.0, 1.0) (got 1.0)"),
    (["train", "--momentum", "-0.5"], "(got -0.5)"),
    (["train", "--momentum", "NaN"], "--momentum must be a finite number (got nan)"),
    (["train", "--weight-decay", "-1e-4"], "--weight-decay must be in [0.0, 1.0] (got -0.0001)"),
    (["train", "--seed", "-7"], "--seed must be between 0 and"),
    (["train", "--seed", "1.5"], "invalid int value: '1.5'"),
    (["train", "--seed", "99999999999999999999999"], "(got 99999999999999999999999)"),
    (["train", "--test-subset", "0"], "--test-subset must be between 1 and 1000000000 (got 0)"),
    (["train", "--max-steps", "-2"], "--max-steps must be between 1 and 1000000000 (got -2)"),
    (["train", "--prefetch-factor", "0", "--workers", "1"], "--prefetch-factor must be between 1 and 1024 (got 0)"),
    (["train", "--persistent-workers", "--workers", "0"], "--persistent-workers needs --workers >= 1 (got --workers 0)"),
    (["train", "--checkpoint-every", "-1"], "--checkpoint-every must be between 0 and 100000 (got -1)"),
    (["train", "--checkpoint-every", "often"], "invalid int value: 'often'"),
    (["train", "--name", ""], "--name '' is not a plain folder name"),
    (["train", "--name", ".."], "--name '..' is not a plain folder name"),
    (["train", "--name", "a\nb"], "--name 'a\\nb' is not a plain folder name"),
    (["train", "--name", "x" * 300], "is not a plain folder name"),
    (["train", "--name", "a\\b"], "--name 'a\\\\b' is not a plain folder name"),
    (["train", "--out", "runs\0evil"], "--out 'runs\\x00evil' is not a usable folder path"),
    (["train", "--data", "data\0"], "--data 'data\\x00' is not a usable folder path"),
    (["train", "--optimizer", ""], "--optimizer '' is not known"),
    (["train", "--optimizer", "SGD"], "--optimizer 'SGD' is not known"),
    (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["train", "--compile", "fast"], "invalid choice: 'fast'"),
    (["train", "--loader", "gpu"], "invalid choice: 'gpu'"),
    (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "--lr", "0.1", "0.2"], "unrecognized arguments: 0.2 (see 'cifarlab train --help')"),
    (["export", "--bogus", "{tmp}"], "unrecognized arguments: --bogus (see 'cifarlab export --help')"),
    (["train", "junk\nmore"], "unrecognized arguments: junk\\nmore"),
    (["train", "--epochs=3=4"], "invalid int value: '3=4'"),
    (["inspect", "--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
    (["inspect", "--batch-size", "two"], "invalid int value: 'two'"),
    # the first call is always untimed (first_call_ms): --warmup 0 would claim a cold first call was timed
    (["infer-bench", "{tmp}/nope", "--warmup", "0"], "--warmup 0 is out of range; use 1..10000"),
    # --resume: every way a run folder can be unusable
    (["train", "--resume", "{tmp}/nope"], "--resume '{tmp}/nope' is not a folder"),
    (["train", "--resume", "{afile}"], "is not a folder"),
    (["train", "--resume", "{empty}"], "--resume '{empty}' has no config.json"),
    (["train", "--resume", "{notjson}"], "config.json is unreadable or not JSON"),
    (["train", "--resume", "{list}"], "config.json does not hold a config (found list)"),
    (["train", "--resume", "{unknown}"], "unknown config keys ['bogus']"),
    (["train", "--resume", "{badtype}"], "--batch-size must be a whole number (got '128')"),
    (["train", "--resume", "{nockpt}"], "no checkpoint at {nockpt}/checkpoint.pt"),
    (["train", "--resume", "{evil}"], "{evil}/checkpoint.pt is not a loadable cifarlab checkpoint (UnpicklingError: weights_only refused it"),
    (["train", "--resume", "{truncated}"], "{truncated}/checkpoint.pt is not a loadable cifarlab checkpoint"),
    (["train", "--resume", "{edited}"], "config.json and checkpoint.pt disagree on lr"),
    (["train", "--resume", "{finished}"], "all 2 epochs are already finished"),
    (["train", "--resume", "{finished}", "--epochs", "1"], "all 2 epochs are already finished"),
    (["train", "--resume", "{finished}", "--epochs", "0"], "--epochs must be between 1 and 100000 (got 0)"),
    (["train", "--resume", "{finished}", "--lr", "0.01"], "drop --lr (only --epochs may change)"),
    (["train", "--resume", "{live}"], "is still being trained by process"),
]


@pytest.mark.parametrize("argv, needle", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_invocation_exits_2_with_one_line_naming_the_value(argv, needle, runs, tmp_path, capsys):
    fill = {k: str(v) for k, v in runs.items()} | {"tmp": str(tmp_path)}
    code = main([a.format(**fill) if "{" in a else a for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("cifarlab: error: "), err
    assert "Traceback" not in err
    assert needle.format(**fill) in err
    assert not os.path.exists("/tmp/cifarlab-badinput-pwned")


def test_the_table_is_long_enough():
    assert len(BAD) >= 30


# ---------------------------------------------------------------------------------------- fuzzing

_parser = build_parser()
_train_parser = _parser._subparsers._group_actions[0].choices["train"]
FLAGS = sorted(s for a in _train_parser._actions for s in a.option_strings if s not in ("-h", "--help"))

HOSTILE = ["", " ", "0", "-1", "-0", "1", "2", "3", "-9999999999", "10" * 30, "1e309", "-1e309", "nan", "NaN",
           "inf", "-inf", "Infinity", "1e-320", "0.5", "0x10", "1_000", "１２", "²", "..", ".", "/", "../../etc",
           "../escape", "/dev/null", "a/b", "a\\b", "x\0y", "\0", "\n", "a\nb", "\r", "\t", "~", "$HOME", "%s",
           "{}", "--", "-", "-x", "--bogus", "'", '"', "é", "名前", "\u202e", "CON", "x" * 300, "sgd", "adam",
           "cpu", "cuda", "auto", "synthetic", "torch", "device", "fp16", "none", "default", "train"]

value = st.one_of(
    st.sampled_from(HOSTILE),
    st.integers(min_value=-(10**25), max_value=10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=20),
    # short strings built from the characters that break paths and log lines
    st.text(alphabet=st.sampled_from("\n\r\t\0 ./\\-~eé1"), min_size=1, max_size=8),
)
option = st.one_of(
    st.tuples(st.sampled_from(FLAGS), value).map(list),  # a known flag with a value
    st.sampled_from(FLAGS).map(lambda f: [f]),  # a flag alone (missing value, or a switch)
    st.text(min_size=1, max_size=12).map(lambda t: ["--" + t]),  # unknown names
    value.map(lambda v: [v]),  # stray positionals
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(option, max_size=6).map(lambda opts: ["train", *[tok for o in opts for tok in o]]))
def test_fuzzed_argv_gives_a_valid_config_or_one_usage_line(argv):
    # "-h", "--help" and any prefix of it ("--he") print help and exit 0 by design; not a bad input
    assume(not any(t.startswith("-h") or (t.startswith("--h") and "--help".startswith(t.split("=")[0]))
                   for t in argv))
    try:
        cfg = config_from_args(_parser.parse_args(argv))
    except UsageError as e:  # anything else (ValueError, TypeError, SystemExit...) fails the test
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return
    assert isinstance(cfg, TrainConfig)
    assert cfg.validate() is cfg and TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert "\0" not in cfg.out_dir + cfg.data_dir + cfg.name and "/" not in cfg.name and cfg.name not in ("..", ".")


def test_more_workers_than_usable_cores_warns_once_with_the_core_count(tmp_path, capsys, monkeypatch):
    from cifarlab.core import runtime

    monkeypatch.setattr(runtime, "usable_cpus", lambda: 3)
    assert runtime.workers_warning(3) is None
    blocker = tmp_path / "file"
    blocker.write_text("x")  # an unwritable --out ends the command before any training
    code = main(["train", "--loader", "torch", "--workers", "7", "--dataset", "synthetic", "--out", str(blocker / "r")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 2
    assert err[0] == ("cifarlab: warning: --workers 7 exceeds the 3 CPU core(s) this process may use; the extra "
                      "workers compete with training for the same cores (try --workers 2..3)")
    assert err[1].startswith("cifarlab: error: --out")


def test_export_device_cuda_without_a_gpu_is_one_usage_line(runs, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    code = main(["export", str(runs["finished"]), "--device", "cuda"])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err == "cifarlab: error: --device cuda: no CUDA device is available here; use --device cpu\n"
    assert not (runs["finished"] / "export").exists()


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 2.24 TiB for an array"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 26214400000 bytes")])
def test_inspect_out_of_memory_is_one_line_naming_the_batch_size(error, monkeypatch, capsys):
    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr(commands, "inspect_model", too_big)  # what --batch-size 99999999 / 100000 raised on a 24 GiB host
    code = main(["inspect", "--batch-size", "100000"])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err == ("cifarlab: error: out of memory at --batch-size 100000 (the inspection's backward pass); "
                   "try a smaller --batch-size, e.g. 32\n")

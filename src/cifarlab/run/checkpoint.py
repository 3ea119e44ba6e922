"""Checkpoints: everything needed to continue a run exactly, saved atomically, loaded without
executing code.

A checkpoint is written at an epoch boundary. It holds the model, optimizer and GradScaler states, the
RNG states (torch, numpy, python, CUDA), the number of completed epochs, the records so far and the
config. Every value is a plain dict/list/str/number/None or a tensor -- RNG states are converted to
tensors -- so `torch.load(weights_only=True)` can read it: a crafted checkpoint cannot run code.
Sampler position needs no field: engine.seed_epoch reseeds shuffling and augmentation from
(seed, epoch) at every epoch start, so a run resumed at a boundary replays what would have run.

The file is written to a temp file in the same folder, fsynced and renamed over the old one, so a
crash, a full disk or a second Ctrl-C during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError, raise_if_interrupted
from cifarlab.core.fileio import fsync_dir, os_error_in_chain, write_atomic
from cifarlab.core.text import one_line
from cifarlab.parallel import collectives
from cifarlab.step.state import EpochRecord, TrainState

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "cifarlab.checkpoint/1"
REQUIRED_KEYS = ("format", "epoch", "model", "optimizer", "scaler", "rng", "records", "config")


# ------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and numbers (weights_only-loadable)."""
    mt_name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(mt_name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss_next,
        },
        # Only touch CUDA when it is already in use: initialising it here would cost seconds on CPU runs.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    cuda = state.get("cuda") or []
    # A checkpoint from a GPU machine resumed on CPU (or on fewer GPUs) cannot restore those streams;
    # engine.seed_epoch reseeds CUDA at every epoch start anyway.
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.to(torch.uint8).cpu() for t in cuda])


# ------------------------------------------------------------------------------------ save / load


def _module(state: TrainState) -> torch.nn.Module:
    # A DistributedDataParallel wrapper keeps the real model in .module; save that so keys stay plain.
    return getattr(state.model, "module", state.model)


def checkpoint_dict(cfg: TrainConfig, state: TrainState) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(state.epoch),
        "model": _module(state).state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": rng_state(),
        "records": [r.to_dict() for r in state.records if r.status == "ok" and r.epoch <= state.epoch],
        "config": cfg.to_dict(),
        "run": run_identity(state),
        "torch_version": str(torch.__version__),  # TorchVersion is not weights_only-loadable
        "saved_unix_s": time.time(),
    }


def run_identity(state: TrainState) -> dict[str, Any]:
    """What config.json does not pin down but the run's numbers depend on: the device type and precision that
    "auto" resolved to, and the number of processes (--nproc; the global batch is --batch-size times it)."""
    return {"device": state.device.type, "precision": state.precision,
            "processes": collectives.world_size() if collectives.is_active() else 1}


def save_checkpoint(folder: Path, cfg: TrainConfig, state: TrainState) -> Path:
    """Write folder/checkpoint.pt atomically. OSErrors (full or read-only disk) propagate; the previous
    checkpoint is then still in place and no temp file is left behind."""
    folder = Path(folder)
    payload = checkpoint_dict(cfg, state)

    def write(f: Any) -> None:
        try:
            torch.save(payload, f)
        except Exception as e:
            # torch's zip writer turns a full disk into "RuntimeError: unexpected pos ...": surface the
            # OSError underneath so the caller can say "No space left on device". The same wrapping hides a
            # second Ctrl-C that landed in its write callback: that is an interruption, not a failure.
            raise_if_interrupted(e)
            os_error = os_error_in_chain(e)
            if os_error is None:
                raise
            raise os_error from None

    target = write_atomic(folder / CHECKPOINT_NAME, write)
    fsync_dir(folder)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and sanity-check a checkpoint with weights_only=True; any problem is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"no checkpoint at {path} (the run stopped before its first checkpoint, or ran with "
            f"--checkpoint-every 0); start the run again instead of resuming it"
        )
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before refusing it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbled, or a pickle that asks for code (weights_only refuses)
        raise UsageError(
            f"{path} is not a loadable cifarlab checkpoint ({type(e).__name__}: {_gist(e)}); "
            f"it may be truncated or not written by cifarlab -- start the run again"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UsageError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (found {found!r})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}; it is incomplete -- start the run again")
    epoch = ckpt["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0 or len(ckpt["records"]) != epoch:
        raise UsageError(f"{path}: epoch {epoch!r} does not match its {len(ckpt['records'])} records; it is corrupt")
    return ckpt


# ------------------------------------------------------------------------------------------ resume

# What a resumed run may change: how many epochs it trains. Everything else would make the resumed
# run a different experiment from the one its first epochs belong to.
RESUME_OVERRIDES = ("epochs",)


def resume_config(run_dir: str | Path, given: dict[str, Any], claim: bool = True,
                  processes: int | None = None) -> TrainConfig:
    """The config of the run in run_dir (its config.json), with the allowed overrides from `given`.
    Refuses folders that are not runs, and runs still alive on this host. claim=False checks without claiming
    the folder (the --nproc launcher, whose rank 0 claims it); `processes` (the launcher's --nproc) must be
    the number the checkpoint was trained with, when it recorded one."""
    folder = Path(run_dir)
    flag = f"--resume {str(run_dir)!r}"
    if not folder.is_dir():
        raise UsageError(f"{flag} is not a folder; pass a run folder such as runs/20260101-120000-train")
    refused = sorted(k for k in given if k not in RESUME_OVERRIDES)
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise UsageError(f"{flag} continues the run with its own config; drop {flags} (only --epochs may change)")
    config_path = folder / "config.json"
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{flag} has no config.json; it is not a cifarlab run folder") from None
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise UsageError(f"{config_path} is unreadable or not JSON ({type(e).__name__}); cannot resume") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{config_path} does not hold a config (found {type(raw).__name__}); cannot resume")
    try:
        cfg = TrainConfig.from_dict(raw)
    except TypeError as e:
        raise UsageError(f"{config_path} is not a valid config ({e}); cannot resume") from None
    # Write back into this very folder, wherever it has moved since (its out_dir may be relative to
    # another working directory).
    cfg = cfg.replace(out_dir=str(folder.resolve().parent), **{k: given[k] for k in given})
    cfg.validate()
    _refuse_live_run(folder, flag)
    if claim:
        _claim_run(folder, flag)
    _refuse_unwritable(folder, flag)
    # Read the checkpoint now, so a bad one is reported before any data is loaded.
    ckpt = load_checkpoint(folder / CHECKPOINT_NAME)
    saved, now = _as_current_config(ckpt["config"]), cfg.to_dict()
    differ = sorted(k for k in set(saved) | set(now) if k not in ("epochs", "out_dir") and saved.get(k) != now.get(k))
    if differ:
        raise UsageError(f"{flag}: config.json and {CHECKPOINT_NAME} disagree on {', '.join(differ)}; "
                         f"the folder was edited -- start the run again")
    if ckpt["epoch"] >= cfg.epochs:
        raise UsageError(f"{flag}: all {ckpt['epoch']} epochs are already finished; "
                         f"add --epochs N with N > {ckpt['epoch']} to train further")
    run = ckpt.get("run")
    trained_on = run.get("processes") if isinstance(run, dict) else None
    if processes is not None and isinstance(trained_on, int) and trained_on != processes:
        raise UsageError(f"{flag} was trained on {trained_on} process(es) (global batch {trained_on * cfg.batch_size}); "
                         f"--nproc {processes} would go on as a different experiment -- "
                         + (f"resume it with --nproc {trained_on}" if trained_on > 1 else "resume it without --nproc")
                         + ", or start a new run")
    return cfg


def _as_current_config(saved: Any) -> Any:
    """The checkpoint's config as this cifarlab reads it: a key added to TrainConfig after the run was saved
    takes its default, as it does when config.json is read -- so a run from an older cifarlab is not taken
    for a folder whose config.json was edited."""
    try:
        return TrainConfig.from_dict(saved).to_dict()
    except (UsageError, TypeError, ValueError, AttributeError):
        return saved if isinstance(saved, dict) else {}


def _refuse_live_run(folder: Path, flag: str) -> None:
    path = folder / "run.json"
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except FileNotFoundError:
        return  # no status: the checkpoint decides
    except (OSError, ValueError) as e:  # the resumed run would read it for its start time and earlier resumes
        run = e
    if not isinstance(run, dict):
        found = type(run).__name__
        raise UsageError(f"{path} is unreadable or not a JSON object ({found}); restore it, or delete it to "
                         f"resume without its history (start time, earlier resumes)")
    if run.get("status") != "running" or run.get("host") != socket.gethostname():
        return
    pid = run.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
        raise UsageError(f"{flag} is still being trained by process {pid}; stop it first (Ctrl-C) or wait")


# Run folders this process resumes, each held under an exclusive flock until the process exits (the kernel
# drops the lock then, however it ends).
_CLAIMED: dict[str, int] = {}


def _claim_run(folder: Path, flag: str) -> None:
    """Refuse a folder another --resume is already continuing. run.json names a live process only once that
    process has loaded its data and built its model; two resumes started together both passed that check and
    then trained into the same folder, overwriting each other's checkpoint and records. Under torchrun only rank
    0 claims (every rank resumes the same folder). Where a folder cannot be locked (no flock), nothing is refused."""
    key = str(folder.resolve())
    if key in _CLAIMED or (collectives.is_active() and not collectives.is_main()):
        return
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UsageError(f"{flag} is being resumed by another process right now; wait for it to end "
                             f"(or stop it with Ctrl-C) instead of training the same folder twice") from None
        return
    _CLAIMED[key] = fd


def _refuse_unwritable(folder: Path, flag: str) -> None:
    """A resumed run writes into its own folder: say so before any data is loaded (the write itself failed
    later, saying '... or choose another --out', a flag --resume refuses)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".cifarlab-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} is not writable ({e.strerror or e}); make it writable, or copy the folder "
                         f"somewhere writable and resume the copy") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def restore(state: TrainState, ckpt: dict[str, Any], path: Path) -> None:
    """Put a loaded checkpoint into a freshly built state (same config): weights, optimizer, scaler,
    RNGs, completed epochs and their records. Refuses a state built on another device type, precision or number
    of processes than the checkpoint's (--device/--precision auto resolve per machine; --nproc is not in the
    config): the epochs after the resume would belong to a different experiment than the ones before."""
    saved, now = ckpt.get("run"), run_identity(state)
    if isinstance(saved, dict) and {k: saved.get(k) for k in now} != now:
        def say(d: dict[str, Any]) -> str:
            return f"{d.get('device')}, {d.get('precision')}, {d.get('processes')} process(es)"
        raise UsageError(f"{path}: its {ckpt['epoch']} epoch(s) ran on {say(saved)}; this run would go on on "
                         f"{say(now)}, a different experiment -- resume it where it ran (--nproc "
                         f"{saved.get('processes')} where it had several), or start a new run")
    try:
        _module(state).load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        if state.scaler is not None and ckpt["scaler"] is not None:
            state.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        records = [EpochRecord(**r) for r in ckpt["records"]]
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path} does not fit this run's model/optimizer ({type(e).__name__}: {_gist(e)})") from None
    state.epoch = int(ckpt["epoch"])
    state.records = records


def _gist(e: BaseException) -> str:
    """One short line from an exception whose message may span many lines (torch.load's does)."""
    return one_line(e)

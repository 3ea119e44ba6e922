"""Run folders claimed atomically: a writable --out checked before any work, and one new folder per run,
<out>/<UTC time>-<name>[-k], never an existing one. Torch-free, so the CLI's SLURM command can claim a folder
for its job script without importing the training stack."""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from cifarlab.core.errors import UsageError


def ensure_writable_dir(folder: Path, flag: str = "--out") -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cifarlab-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(f"{flag} {str(folder)!r} is not writable ({reason}); choose a folder you can write to") from None
    return folder


def create_run_dir(out_dir: str | Path, name: str) -> Path:
    """A new folder <out>/<UTC time>-<name>[-k]; mkdir(exist_ok=False) makes the claim atomic, so two
    runs started in the same second (or in parallel processes) get different folders."""
    out = ensure_writable_dir(Path(out_dir))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for k in range(10_000):
        path = out / (f"{stamp}-{name}" if k == 0 else f"{stamp}-{name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"--out {str(out)!r}: cannot create a run folder ({e.strerror}); choose another folder") from None
    raise UsageError(f"--out {str(out)!r}: too many runs named {name!r} this second; use another --name")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

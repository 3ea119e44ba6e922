"""Writing result files so that nothing already written is lost: every file goes to a temp file in the
same folder, is fsynced and renamed over the target (a reader, or a crash, sees the old file or the
new one, never half of one), and lands with the mode the user's umask gives, like any new file
(mkstemp's owner-only 0600 would make a lab folder unreadable to a TA or a web server)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import tempfile
import traceback
from pathlib import Path
from typing import IO, Any, Callable

from cifarlab.core.errors import in_chain


def current_umask() -> int:
    # os.umask can only be read by setting it: set it back at once.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename inside folder durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """write(f) fills a temp file beside path; then fsync, chmod to 0666 & ~umask, rename over path.
    Any exception (a full disk, Ctrl-C) removes the temp file and leaves the previous path intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_serialized_atomic(path: Path, save: Callable[[IO[bytes]], None]) -> None:
    """save(buffer) serializes into memory, then the bytes are written atomically with Python's file API: torch's
    C++ file writer aborts the whole process on a full disk (c10::Error, exit 134) where Python raises OSError."""
    buf = io.BytesIO()
    save(buf)
    write_bytes_atomic(path, buf.getvalue())


def write_traceback(path: Path, e: BaseException) -> Path:
    """The exception's full traceback as a text file (results keep one line; a failure on a lent GPU is
    diagnosed afterwards from this file)."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return write_atomic(path, lambda f: f.write(text.encode("utf-8", "replace")))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    obj = json.loads(json.dumps(obj, default=_json_default))  # resolve dataclasses first
    write_text_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_csv_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        columns = list(rows[0].keys())
        for row in rows[1:]:
            columns += [k for k in row if k not in columns]
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file read in 1 MiB chunks (md5 for CIFAR-10's published sums, sha256 for exports)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def os_error_in_chain(e: BaseException | None) -> OSError | None:
    found = in_chain(e, OSError)
    return found if isinstance(found, OSError) else None


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)

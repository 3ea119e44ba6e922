"""What cifarlab trusts in an export folder it did not just write itself (`infer-bench`, and anyone who
loads artifacts through `load_trusted`). The policy, applied before any artifact is loaded:

1. `export.json` is validated against its schema: every field used is present and of the right type, or the
   command stops with one line naming the file and the field.
2. Every artifact file must lie inside the export folder after resolving symlinks (`..`, absolute paths and
   links pointing out are refused), be a regular file, and have the byte count and sha256 export.json
   records. The file is read once into memory, hashed, and loaded from those same bytes, so it cannot be
   swapped between the check and the load.
3. Formats that can run code while loading are refused unless the user passes `--allow-code-execution`:
   an AOTInductor package (`aoti`: its shared library runs on load), and a torch.export `.pt2` whose archive
   holds anything beyond plain tensors and JSON (entries marked `use_pickle`, custom or opaque objects,
   legacy pickled weights, AOTInductor or extra files, or sample inputs that `weights_only` cannot read:
   torch's own loader unpickles all of those without `weights_only`).
4. A refused or failed artifact is one console line with its reason (the caller prints it); when nothing
   but eager is left to benchmark, the command stops with exit 2.

TorchScript and ONNX files are data to their loaders (TorchScript code runs in TorchScript's interpreter,
not Python; ONNX graphs only name operators), so steps 1-2 are what guards them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from cifarlab.core.errors import UsageError

ALLOW_CODE_FLAG = "--allow-code-execution"
CODE_FORMATS = {"aoti": "an AOTInductor package, whose compiled shared library runs when it is loaded"}
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# The members of a plain torch.export archive (torch 2.6+ layout); anything else is refused. <p>: the archive's
# root folder, <m>: the model name.
_PT2_PLAIN = re.compile(
    r"[^/]+/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|data/weights/weight_\d+|data/weights/[\w.-]+_weights_config\.json"
    r"|data/constants/tensor_\d+|data/constants/[\w.-]+_constants_config\.json|data/sample_inputs/[\w.-]+\.pt)")


@dataclass(frozen=True)
class ArtifactEntry:
    """One validated artifacts[fmt] entry of export.json."""

    fmt: str
    file: str
    sha256: str
    bytes: int


def _field(path: Path, where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is int or not isinstance(value, kind):
        raise UsageError(f"{str(path)!r}: field {where} is {type(value).__name__}, not {what}; "
                         f"the export folder is damaged or not written by cifarlab -- export the run again")
    return value


def read_export_json(folder: Path, known_formats: tuple[str, ...] | list[str], schema: str,
                     name: str = "export.json") -> tuple[dict[str, Any], list[ArtifactEntry]]:
    """export.json as a dict and its artifact entries, each field checked; one UsageError line otherwise."""
    path = Path(folder) / name
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{str(path)!r} cannot be read ({getattr(e, 'strerror', None) or e}); "
                         f"export the run again") from None
    _field(path, "(top level)", info, dict, "a JSON object")
    if info.get("schema") != schema:
        raise UsageError(f"{str(path)!r}: field schema is {info.get('schema')!r}; this cifarlab reads {schema!r} "
                         f"-- export the run again")
    _field(path, "source", info.get("source"), dict, "an object")
    _field(path, "device", info.get("device"), str, "a string")
    artifacts = _field(path, "artifacts", info.get("artifacts"), dict, "an object")
    entries = []
    for fmt, entry in artifacts.items():
        if fmt not in known_formats:
            raise UsageError(f"{str(path)!r}: field artifacts.{fmt} names no format cifarlab knows "
                             f"({', '.join(known_formats)}); export the run again")
        _field(path, f"artifacts.{fmt}", entry, dict, "an object")
        file = _field(path, f"artifacts.{fmt}.file", entry.get("file"), str, "a file name")
        digest = _field(path, f"artifacts.{fmt}.sha256", entry.get("sha256"), str, "a sha256 string")
        size = _field(path, f"artifacts.{fmt}.bytes", entry.get("bytes"), int, "a whole number")
        if not SHA256_HEX.fullmatch(digest):
            raise UsageError(f"{str(path)!r}: field artifacts.{fmt}.sha256 is not 64 lowercase hex digits; "
                             f"export the run again")
        entries.append(ArtifactEntry(fmt, file, digest, size))
    return info, entries


def inside(folder: Path, file: str) -> Path | None:
    """folder/file with symlinks resolved, or None when it lies outside folder (or names no file in it)."""
    root = Path(folder).resolve()
    if not file or Path(file).is_absolute():
        return None
    target = (root / file).resolve()
    return target if target != root and target.is_relative_to(root) else None


def pt2_code_risk(data: bytes) -> str | None:
    """Why a torch.export archive could run code when torch.export.load reads it, or None when it holds only
    tensors and JSON that torch reads without unpickling."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as e:
        return f"not a zip archive ({e})"
    extra = [n for n in names if not n.endswith("/") and not _PT2_PLAIN.fullmatch(n)]
    if extra:
        return f"it holds {extra[0]!r}, which torch.export.load would unpickle or run (not a plain exported program)"
    for name in names:
        if not name.endswith(("_weights_config.json", "_constants_config.json")):
            continue
        try:
            config = json.loads(archive.read(name)).get("config", {})
            for key, meta in config.items():
                if meta.get("use_pickle") is not False:
                    return f"{name} marks {key!r} use_pickle, which torch.export.load unpickles without weights_only"
                if not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name"))):
                    return f"{name} names {meta.get('path_name')!r} for {key!r}, not a plain tensor payload"
        except (ValueError, AttributeError, KeyError) as e:
            return f"{name} is not a weights config ({type(e).__name__})"
    for name in names:
        if "/data/sample_inputs/" in name:  # torch falls back to weights_only=False when this fails
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except Exception as e:  # noqa: BLE001 -- any refusal means torch would unpickle it fully
                return f"{name} is not loadable with weights_only ({type(e).__name__}); torch would unpickle it fully"
    return None


def verified_bytes(folder: Path, entry: ArtifactEntry, allow_code: bool) -> tuple[bytes | None, Path | None, str]:
    """(the file's bytes, its resolved path, '') when the entry passes the policy, else (None, None, reason)."""
    path = inside(folder, entry.file)
    if path is None:
        return None, None, f"{entry.file!r} lies outside the export folder {str(folder)!r} (refused)"
    if not path.is_file():
        return None, None, f"{entry.file!r} is missing or not a regular file"
    if entry.fmt in CODE_FORMATS and not allow_code:
        return None, None, (f"{entry.file!r} is {CODE_FORMATS[entry.fmt]}; refused -- pass {ALLOW_CODE_FLAG} only "
                            f"if you trust whoever made this folder")
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, None, f"{entry.file!r} cannot be read ({e.strerror or e})"
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        return None, None, (f"{entry.file!r} does not match the sha256 export.json records (tampered, corrupt or "
                            f"replaced; {len(data)} bytes vs {entry.bytes} recorded)")
    if entry.fmt == "export" and not allow_code and (risk := pt2_code_risk(data)):
        return None, None, f"{entry.file!r} can run code when loaded: {risk}; refused -- pass {ALLOW_CODE_FLAG} only " \
                           f"if you trust whoever made this folder"
    return data, path, ""


def foreign_files(folder: Path, ours: Callable[[str], bool]) -> list[str]:
    """The entries of an existing output folder that `ours` does not claim, sorted. Hidden names are left out:
    cifarlab only ever writes fresh, uniquely named hidden files (staging folders, temp files), so it cannot
    overwrite one."""
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []  # a new folder, or a file in the way (ensure_writable_dir says so)
    return [n for n in names if not (Path(folder, n).is_file() and ours(n))]


def recorded_in(folder: Path, name: str, listing: str, schema: str, plain_names: tuple[str, ...] = ()) -> bool:
    """Whether folder/name is a file an earlier cifarlab command wrote there: the folder's `listing` JSON has
    `schema`, and name is the listing itself, one of plain_names, or an artifact whose sha256 it records."""
    try:
        with open(Path(folder) / listing, encoding="utf-8") as f:
            info = json.load(f)
        if info["schema"] != schema:
            return False
        if name == listing or name in plain_names:
            return True
        data = (Path(folder) / name).read_bytes()
        return any(isinstance(a, dict) and a.get("file") == name and a.get("sha256") == hashlib.sha256(data).hexdigest()
                   for a in info.get("artifacts", {}).values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def refuse_foreign_out(folder: Path, flag: str, command: str, ours: Callable[[str], bool]) -> None:
    """An existing output folder may hold only what an earlier run of `command` wrote: a user's own files are
    never overwritten, nor mixed with cifarlab's."""
    foreign = foreign_files(folder, ours)
    if foreign:
        raise UsageError(f"{flag} {str(folder)!r} holds {len(foreign)} file(s) no cifarlab {command} wrote (first: "
                         f"{foreign[0]!r}); nothing was overwritten -- choose a new or empty folder")

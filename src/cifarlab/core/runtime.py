"""Where a run executes: device choice, seeding, and a record of the machine."""

from __future__ import annotations

import getpass
import os
import platform
import random
import re
import socket
import tempfile
from typing import Any

import numpy as np
import torch
import torchvision

from cifarlab.core.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when present, else CPU. On CPU nothing below calls a CUDA API."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"--device {name!r} is not known; choose one of: auto, cpu, cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def usable_cpus() -> int:
    """CPU cores this process may run on (affinity/cgroup aware where the OS tells), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def workers_warning(workers: int) -> str | None:
    """A sentence for the user when more loader workers than usable cores are asked for, else None:
    the extra workers only compete with the training process for the same cores."""
    cores = usable_cpus()
    if workers <= cores:
        return None
    return (f"--workers {workers} exceeds the {cores} CPU core(s) this process may use; the extra workers "
            f"compete with training for the same cores (try --workers {max(cores - 1, 0)}..{cores})")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16() -> bool:
    """Whether /proc/cpuinfo lists bf16 arithmetic units (without them bf16 autocast is emulated)."""
    return bool(cpu_flags() & set(NATIVE_BF16_FLAGS))


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Machine and software facts stored beside every result (what a reader needs to compare numbers)."""
    env: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cpu_model": cpu_model(),
        "cpu_count_host": os.cpu_count(),
        "cpu_count_usable": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "device": str(device) if device is not None else None,
        "gpu_name": None,
        "gpu_count": 0,
    }
    if device is not None and device.type == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["gpu_count"] = torch.cuda.device_count()
        env["cudnn_version"] = torch.backends.cudnn.version()
    return env


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads, {usable_cpus()} usable cores)"


# ------------------------------------------------------------- inductor's on-disk cache (torch.compile)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
MAX_COUNTED_ENTRIES = 1_000_000  # stop counting there (a shared cache can be huge; the count is a signal)


def inductor_cache_dir() -> tuple[str, str]:
    """(inductor's on-disk cache folder, how it was found). torch has no public accessor for it; its caching
    tutorial documents the env variable TORCHINDUCTOR_CACHE_DIR and, without it, a per-user folder
    torchinductor_<username> in the system temp directory (e.g. /tmp/torchinductor_alice): computed here
    the same way (torch replaces characters a path cannot hold in the username). Importing torch may itself
    set the variable to that default (torch._inductor's cache_dir_utils), so a variable holding exactly the
    default is reported as the default, not as the user's choice."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError, ImportError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    user = re.sub(r'[\\/:*?"<>|]', "_", user)
    default = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    env = os.environ.get(CACHE_ENV)
    if env and os.path.abspath(env) != os.path.abspath(default):
        return os.path.abspath(env), f"from ${CACHE_ENV}"
    return default, f"torch's documented default ({'set so by torch' if env else f'${CACHE_ENV} unset'})"


def cache_state(path: str) -> dict[str, Any]:
    """How full the cache folder is now: entries = files below it (0 when it does not exist yet)."""
    entries = 0
    for _, _, files in os.walk(path):
        entries += len(files)
        if entries >= MAX_COUNTED_ENTRIES:
            break
    return {"exists": os.path.isdir(path), "entries": entries}


def compile_cache() -> dict[str, Any]:
    """Inductor's cache as a compiled run finds it: folder, how it was found, files in it now (0: cold)."""
    path, source = inductor_cache_dir()
    return {"dir": path, "source": source, "entries_before": cache_state(path)["entries"]}

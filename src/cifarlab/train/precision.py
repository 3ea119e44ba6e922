"""Which precision a run trains in, and why: `--precision auto` decided by measurement on a CPU.

The rule (choose_precision):
- `--precision fp32|bf16|fp16` always wins.
- CUDA: bf16 where the GPU supports it, else fp32 (no measurement).
- CPU, classic pipeline (--loader torch: the lab's C2-C4 and its script as written): fp32.
- CPU without native bf16 (no avx512_bf16 / amx_bf16 in /proc/cpuinfo): fp32 -- bf16 would be emulated.
- CPU with native bf16: a few training steps of each precision are timed once (interleaved fp32, bf16, ...
  on the real ResNet-18 step with the run's norm, layout and batch size, SGD, random data, the run's RNGs
  untouched) and bf16 runs
  only when its fastest step is at least BF16_MARGIN times faster than fp32's (the fastest: other
  processes' load only ever adds time). Why measure: on two 2-core Xeons with AMX and the same torch 2.14,
  bf16 autocast has been measured 3.6x slower and 2.6x faster than fp32 (the flags do not tell them apart),
  on an AMD EPYC with avx512_bf16 2.0x faster.
  The verdict is cached per machine (CPU model and flags), torch version, thread count and model config in
  a small JSON file (cache_path), so it is measured once; its seconds are setup, reported apart from every
  epoch. CIFARLAB_PRECISION_CALIBRATION=refresh measures again, =off skips the measurement (fp32).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from cifarlab.config import TrainConfig
from cifarlab.core import runtime
from cifarlab.core.fileio import read_json, write_json_atomic
from cifarlab.model.optim import build_optimizer
from cifarlab.model.resnet import resnet18
from cifarlab.parallel import collectives
from cifarlab.step.capture import StepRunner

BF16_MARGIN = 1.15  # bf16 must be this many times faster than fp32 (fastest step of each) to be chosen
CALIBRATION_STEPS = 3  # timed steps per precision (after CALIBRATION_WARMUP untimed ones)
CALIBRATION_WARMUP = 1  # oneDNN's first call per shape builds its kernels: never timed
CALIBRATION_MAX_S = 60.0  # past this, no further timed round starts (at least one timed step each is kept)
# A verdict measured at a 1-minute load average of at least BUSY_LOAD_PER_CORE x the usable cores (the calibration's
# own threads included) was taken on a busy machine: it is used, and measured again by a run that finds the
# load below the number of usable cores.
BUSY_LOAD_PER_CORE = 2.0
CACHE_SCHEMA = "cifarlab.precision-cache/1"
CACHE_FILE = "precision.json"
CACHE_DIR_ENV = "CIFARLAB_CACHE_DIR"
CALIBRATION_ENV = "CIFARLAB_PRECISION_CALIBRATION"  # on (default) | refresh | off
CALIBRATION_MODES = ("on", "refresh", "off")

# (config, device, timed steps) -> {"fp32"|"bf16": {"wall_s": [...], "cpu_s": [...]}}, one value per timed step
StepTimer = Callable[[TrainConfig, torch.device, int], dict[str, dict[str, list[float]]]]


@dataclass(frozen=True)
class PrecisionChoice:
    """What precision a run trains in (fp32 | bf16 | fp16), what was asked for, and one sentence why."""

    precision: str
    requested: str
    reason: str
    calibration: dict[str, Any] | None = None  # the timed steps, ratio, seconds spent, cache facts

    @property
    def calibration_s(self) -> float:
        """Seconds this process spent measuring (0 on a cache hit): setup, in no epoch."""
        return float(self.calibration["calibration_s"]) if self.calibration else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_path() -> Path:
    """$CIFARLAB_CACHE_DIR/precision.json, else $XDG_CACHE_HOME/cifarlab/..., else ~/.cache/cifarlab/..."""
    folder = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cifarlab")
    return Path(folder) / CACHE_FILE


def calibration_mode() -> str:
    mode = os.environ.get(CALIBRATION_ENV, "on").strip().lower() or "on"
    return mode if mode in CALIBRATION_MODES else "on"


def cache_key(cfg: TrainConfig) -> dict[str, Any]:
    """Everything the verdict depends on: the machine, the software and the step's shape. Not the optimizer:
    its update runs in fp32 under either precision (the lab's five optimizers share one calibration)."""
    return {
        "schema": CACHE_SCHEMA,
        "cpu_model": runtime.cpu_model(),
        "cpu_flags_sha1": hashlib.sha1(" ".join(sorted(runtime.cpu_flags())).encode()).hexdigest(),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "norm": cfg.norm,
        "batch_size": cfg.batch_size,
        "channels_last": cfg.channels_last,
    }


def _key_id(key: dict[str, Any]) -> str:
    return hashlib.sha1(repr(sorted(key.items())).encode()).hexdigest()[:16]


def read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries by key id; an absent, unreadable or foreign file is an empty cache."""
    try:
        doc = read_json(path)
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("schema") != CACHE_SCHEMA or not isinstance(doc.get("entries"), dict):
        return {}
    return doc["entries"]


def write_cache_entry(path: Path, key: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """Add one verdict to the cache (atomically: a reader sees the old file or the new). None, or why not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = read_cache(path)
        entries[_key_id(key)] = {"key": key, **entry}
        write_json_atomic(path, {"schema": CACHE_SCHEMA, "entries": entries})
    except OSError as e:
        return f"not cached ({path}: {e.strerror or e})"
    return None


def decide(fp32_step_s: float, bf16_step_s: float, margin: float = BF16_MARGIN) -> tuple[str, float]:
    """(precision, bf16's speed as a multiple of fp32's): bf16 only when that multiple is >= margin."""
    ratio = fp32_step_s / bf16_step_s if bf16_step_s > 0 else 0.0
    return ("bf16" if ratio >= margin else "fp32"), ratio


def time_precisions(cfg: TrainConfig, device: torch.device, steps: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds (all of this process's threads) of each of `steps` training steps per precision,
    after CALIBRATION_WARMUP untimed ones, interleaved
    (fp32, bf16, fp32, ...) so that load from other processes falls on both alike; no new round after
    CALIBRATION_MAX_S. The real step (engine's
    StepRunner: autocast, loss, backward, SGD) on a fresh ResNet-18 and random data of the run's
    batch shape; the global RNGs are restored afterwards, so the run's initialisation is unchanged."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        runners: dict[str, StepRunner] = {}
        for precision in ("fp32", "bf16"):
            model = resnet18(norm=cfg.norm).to(device)
            if cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
            optimizer = build_optimizer("sgd", model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
            runners[precision] = StepRunner(model, optimizer, precision, device, model=model)
        inputs = torch.randn(cfg.batch_size, 3, 32, 32, device=device)
        if cfg.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = torch.randint(0, 10, (cfg.batch_size,), device=device)
        times: dict[str, dict[str, list[float]]] = {p: {"wall_s": [], "cpu_s": []} for p in runners}
        started = time.perf_counter()
        for i in range(CALIBRATION_WARMUP + steps):
            for precision, runner in runners.items():
                wall0, cpu0 = time.perf_counter(), time.process_time()
                runner.load(inputs, targets)
                runner.step()  # a CPU op has finished when it returns: no synchronization needed
                if i >= CALIBRATION_WARMUP:
                    times[precision]["wall_s"].append(time.perf_counter() - wall0)
                    times[precision]["cpu_s"].append(time.process_time() - cpu0)
            if i >= CALIBRATION_WARMUP and time.perf_counter() - started > CALIBRATION_MAX_S:
                break  # a loaded machine: fewer timed steps rather than minutes of setup
    return times


def _load_now() -> float:
    return os.getloadavg()[0]


def _busy(calibration: dict[str, Any]) -> bool:
    load = calibration.get("load_average")
    return isinstance(load, (int, float)) and load >= BUSY_LOAD_PER_CORE * runtime.usable_cpus()


def _reason(precision: str, ratio: float, steps: int) -> str:
    if precision == "bf16":
        return f"bf16: {ratio:.1f}x fp32 in a {steps}-step calibration on this CPU"
    return (f"fp32: bf16 was {ratio:.2f}x fp32 in a {steps}-step calibration on this CPU "
            f"(bf16 runs from {BF16_MARGIN:.2f}x)")


def static_choice(cfg: TrainConfig, device: torch.device) -> PrecisionChoice | None:
    """The choice where no measurement is needed, else None (auto on a CPU with native bf16)."""
    requested = cfg.precision
    if requested != "auto":
        return PrecisionChoice(requested, requested, f"{requested}: --precision {requested} asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", requested, "bf16: this GPU supports it")
        return PrecisionChoice("fp32", requested, "fp32: this GPU does not support bf16")
    if cfg.loader == "torch":
        return PrecisionChoice("fp32", requested, "fp32: the classic pipeline (--loader torch) trains as the lab's script does")
    if not runtime.cpu_has_native_bf16():
        return PrecisionChoice("fp32", requested, "fp32: this CPU has no native bf16 (avx512_bf16/amx_bf16); bf16 would be emulated")
    if collectives.launched_by_torchrun():
        return PrecisionChoice("fp32", requested, "fp32: data parallel (torchrun) ranks do not calibrate (each could decide "
                                                  "differently); --precision bf16 asks for bf16")
    if calibration_mode() == "off":
        return PrecisionChoice("fp32", requested, f"fp32: calibration turned off (${CALIBRATION_ENV}=off)")
    return None


def choose_precision(cfg: TrainConfig, device: torch.device, *, timer: StepTimer | None = None,
                     cache: Path | None = None, steps: int = CALIBRATION_STEPS,
                     say: Callable[[str], None] | None = None, measure: bool = True) -> PrecisionChoice:
    """The precision this run trains in (module docstring: the rule). On a CPU with native bf16 and auto,
    the cached verdict for this machine and config, or a calibration (`timer`) whose verdict is cached;
    measure=False: no calibration on a miss (fp32, saying so)."""
    fixed = static_choice(cfg, device)
    if fixed is not None:
        return fixed
    path = cache if cache is not None else cache_path()
    key = cache_key(cfg)
    hit = read_cache(path).get(_key_id(key)) if calibration_mode() != "refresh" else None
    if isinstance(hit, dict) and measure and _busy(hit.get("calibration") or {}) and _load_now() < runtime.usable_cpus():
        hit = None  # measured on a busy machine, and this one is quiet now: measure again
    if isinstance(hit, dict) and hit.get("key") == key and hit.get("precision") in ("fp32", "bf16"):
        calibration = {**(hit.get("calibration") or {}), "cached": True, "cache_file": str(path), "calibration_s": 0.0}
        reason = f"{hit.get('reason', hit['precision'])} (cached {hit.get('created', '?')} in {path})"
        return PrecisionChoice(hit["precision"], cfg.precision, _eager_note(cfg, reason), calibration)
    if not measure:
        return PrecisionChoice("fp32", cfg.precision, "fp32: not calibrated for this machine and config yet "
                                                      "(cifarlab train measures it once)")
    if say is not None:
        say(f"precision: timing {steps} training steps each of fp32 and bf16 on this CPU (once per machine and config; "
            f"setup, not in any epoch) ...")
    t0 = time.perf_counter()
    times = (timer or time_precisions)(cfg, device, steps)
    calibration_s = time.perf_counter() - t0
    # The fastest step of each: the one least slowed by other processes (a shared machine's load only adds time).
    fp32_s, bf16_s = min(times["fp32"]["wall_s"]), min(times["bf16"]["wall_s"])
    timed = min(len(times["fp32"]["wall_s"]), len(times["bf16"]["wall_s"]))
    precision, ratio = decide(fp32_s, bf16_s)
    reason = _reason(precision, ratio, timed)
    load = _load_now()
    if _busy({"load_average": load}):
        reason += (f" at load average {load:.1f} on {runtime.usable_cpus()} cores (measured again when the machine "
                   f"is quieter)")
    calibration = {"steps": timed, "warmup_steps": CALIBRATION_WARMUP, "batch_size": cfg.batch_size,
                   "fp32_step_s": fp32_s, "bf16_step_s": bf16_s, "bf16_speedup": ratio, "margin": BF16_MARGIN,
                   "statistic": "fastest timed step of each precision (wall clock)",
                   "bf16_speedup_cpu_time": min(times["fp32"]["cpu_s"]) / max(min(times["bf16"]["cpu_s"]), 1e-9),
                   "step_s": times, "load_average": load, "measured_s": calibration_s}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    not_cached = write_cache_entry(path, key, {"precision": precision, "reason": reason, "created": created,
                                               "calibration": calibration})
    calibration = {**calibration, "cached": False, "cache_file": None if not_cached else str(path),
                   "calibration_s": calibration_s}
    if not_cached:
        reason += f"; {not_cached}"
    return PrecisionChoice(precision, cfg.precision, _eager_note(cfg, reason), calibration)


def _eager_note(cfg: TrainConfig, reason: str) -> str:
    """The calibration times eager steps: a compiled run is told so (compiling both precisions costs minutes)."""
    return reason if cfg.compile == "none" else f"{reason}; eager steps timed, --compile {cfg.compile} not calibrated"

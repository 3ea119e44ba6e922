"""How the doctor times one configuration: the loader as a stream of steps across timed windows
(StepStream), a measurement's time limit (TimeLimit: a soft stop between steps, a hard one by SIGALRM for
a step that does not return) and the host counters read around the windows (loader workers' CPU time, the
main thread's schedstat, the per-op dispatch floor, peak RSS, GPU busy time)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import statistics
import threading
import time
from typing import Any, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

from cifarlab.config import TrainConfig
from cifarlab.step.state import EpochRecord
from cifarlab.train.engine import Hooks, seed_epoch, train_epoch

HARD_GRACE_S = 5.0  # a step still running this long after the limit (a compilation, a stuck loader) is interrupted
OVER_BUDGET = "over budget"


class StepStream:
    """The train loader as train_epoch sees it across several calls: one iterator keeps running from
    call to call until restart() (a new epoch: reseeded, workers started again, inside the next call's
    data wait) or until the real epoch ends. len() is the steps the next call should plan for."""

    def __init__(self, loader: Any, seed: int) -> None:
        self.loader, self.seed = loader, seed
        self.epoch, self.steps = 0, 0
        self.loader_start_s = 0.0  # creating the latest iterator (worker start-up)
        self._it: Iterator | None = None

    def __len__(self) -> int:
        return self.steps

    def restart(self) -> None:
        self._it = None  # drops the DataLoader iterator: non-persistent workers shut down

    def __iter__(self) -> Iterator:
        while True:
            fresh = self._it is None
            if fresh:
                self.epoch += 1
                seed_epoch(self.seed, self.epoch, self.loader)
                t0 = time.perf_counter()
                self._it = iter(self.loader)
                self.loader_start_s = time.perf_counter() - t0
            try:
                yield next(self._it)
            except StopIteration:
                self._it = None
                if fresh:
                    return  # an empty loader

    def run(self, cfg: TrainConfig, state: Any, steps: int, limit: "TimeLimit | None" = None) -> EpochRecord:
        """`steps` steps on the running iterator; with a limit, stopped after the step that passes it
        (status "interrupted") and counted into the limit's partial figures."""
        self.steps = steps
        hooks = Hooks(should_stop=limit.passed) if limit is not None else None
        record = train_epoch(cfg.replace(max_steps=steps), state, self, self.epoch or 1, hooks)
        if limit is not None:
            limit.count(record)
        return record


class OverBudget(Exception):
    """A measurement stopped at its time limit; `partial` holds what it had measured by then."""

    def __init__(self, limit_s: float, partial: dict[str, Any]) -> None:
        super().__init__(f"{OVER_BUDGET}: stopped at its {limit_s:.0f} s limit in its {partial['phase']}")
        self.limit_s, self.partial = limit_s, partial

    def describe(self) -> str:
        p = self.partial
        done = (f"{p['timed_steps']} step(s) timed at {p['images_per_s']:.1f} img/s before the stop" if p["timed_steps"]
                else "no step timed before the stop")
        return f"{OVER_BUDGET}: stopped at its {self.limit_s:.0f} s limit during its {p['phase']} ({done})"


class _Alarm(BaseException):
    """SIGALRM at limit + HARD_GRACE_S: a BaseException, so no `except Exception` on the way swallows it."""


class TimeLimit:
    """One measurement's time limit (None: none). passed() is the soft stop, polled between steps; hard()
    interrupts a step that runs HARD_GRACE_S past the limit (main thread only: SIGALRM)."""

    def __init__(self, limit_s: float | None) -> None:
        self.limit_s, self.t0 = limit_s, time.perf_counter()
        self.phase = "setup (model, step runner, compilation)"
        self.timed_steps, self.timed_s, self.images = 0, 0.0, 0

    def passed(self) -> bool:
        return self.limit_s is not None and time.perf_counter() - self.t0 >= self.limit_s

    def count(self, record: EpochRecord) -> None:
        if self.phase.startswith("timed"):
            self.timed_steps, self.timed_s, self.images = (self.timed_steps + record.steps, self.timed_s + record.epoch_s,
                                                           self.images + record.images)

    def check(self, record: EpochRecord | None = None) -> None:
        """Raise OverBudget when `record` was stopped by the limit, or (no record: between phases) when it passed."""
        if (record.status == "interrupted") if record is not None else self.passed():
            raise self.over()

    def over(self) -> OverBudget:
        partial = {"phase": self.phase, "elapsed_s": time.perf_counter() - self.t0, "timed_steps": self.timed_steps,
                   "timed_s": self.timed_s, "images": self.images,
                   "images_per_s": self.images / self.timed_s if self.timed_s > 0 else None}
        return OverBudget(self.limit_s or 0.0, partial)

    @contextlib.contextmanager
    def hard(self) -> Iterator[None]:
        if self.limit_s is None or threading.current_thread() is not threading.main_thread() \
                or not hasattr(signal, "setitimer"):
            yield
            return

        def on_alarm(signum: int, frame: Any) -> None:
            raise _Alarm()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.limit_s, 0.0) + HARD_GRACE_S)
        try:
            yield
        except _Alarm:
            raise self.over() from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def children_cpu_s() -> float | None:
    """CPU seconds used so far by this process's live descendants (the loader workers, also when a
    forkserver or spawn parent sits between), from /proc; None where /proc does not tell."""
    if not os.path.exists("/proc/self/task"):
        return None
    total, todo, seen = 0, ["self"], set()
    while todo:
        pid = todo.pop()
        try:  # a process may exit at any point of this walk: skip it, keep the others
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    kids = [k for k in f.read().split() if k not in seen]
                seen.update(kids)
                todo += kids
        except OSError:
            continue
    for pid in seen:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        except (OSError, ValueError, IndexError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


DISPATCH_OPS, DISPATCH_ROUNDS = 2000, 5


def dispatch_us() -> float:
    """Median CPU time (this thread's, so preemption by other processes is not in it) of one trivial
    torch op: the host's per-op floor, to compare a step's CPU time with."""
    x = torch.zeros(1)
    rounds = []
    for _ in range(DISPATCH_ROUNDS):
        t0 = time.thread_time()
        for _ in range(DISPATCH_OPS):
            x.add_(1.0)
        rounds.append((time.thread_time() - t0) / DISPATCH_OPS)
    return 1e6 * statistics.median(rounds)


def main_thread_sched_s() -> tuple[float, float] | None:
    """(on-CPU, waiting-for-a-CPU) seconds of this process's main thread so far (/proc schedstat)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/schedstat") as f:
            run_ns, wait_ns = f.read().split()[:2]
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        return None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def gpu_busy_s(stream: StepStream, cfg: TrainConfig, state: Any, steps: int) -> float | None:
    """Union of the GPU's kernel and copy intervals over `steps` profiled steps (profiler overhead
    lands on the host, not in the kernels' own durations, so the busy time itself stays honest)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        stream.run(cfg, state, steps)
    try:
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    except (AttributeError, RuntimeError):  # a profiler without device events: busy fraction not measured
        return None
    if not spans:
        return None
    busy_us, cur_start, cur_end = 0.0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > cur_end:
            busy_us += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    return (busy_us + cur_end - cur_start) / 1e6


def window_row(name: str, rec: EpochRecord, weight: float) -> dict[str, Any]:
    return {"window": name, "steps": rec.steps, "images": rec.images, "window_s": rec.epoch_s, "data_s": rec.data_s,
            "h2d_s": rec.h2d_s, "compute_s": rec.compute_s, "other_s": rec.other_s, "weight": weight}


def weighted(windows: list[dict[str, Any]], key: str) -> float | None:
    values = [w[key] for w in windows]
    return None if any(v is None for v in values) else sum(v * w["weight"] for v, w in zip(values, windows))

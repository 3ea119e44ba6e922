"""Clocks that tell the truth about asynchronous devices.

CUDA kernels run asynchronously: a host clock read right after `loss.backward()` measures only the
time to *enqueue* the work. `DeviceClock.now()` therefore synchronizes the device *before* reading
the host clock (synchronizing after the read would charge the wait to the next segment).

`SegmentTimer` splits an interval into named, back-to-back segments: every clock read closes one
segment and opens the next, so the segments plus "other" add up to the wall time exactly, by
construction, not by subtraction of independently measured numbers.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class DeviceClock:
    """Host wall clock (perf_counter), optionally synchronized with a CUDA device before each read."""

    def __init__(self, device: torch.device, sync: bool = True) -> None:
        self.device = device
        # On CPU every op has finished when it returns, so there is nothing to synchronize.
        self.sync = sync and device.type == "cuda"

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def barrier_now(self) -> float:
        """A clock read that always waits for the device (epoch boundaries, even in async mode)."""
        self.synchronize()
        return time.perf_counter()


class SegmentTimer:
    """Accumulates back-to-back segments of one interval (e.g. one training epoch)."""

    def __init__(self, clock: DeviceClock) -> None:
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        self.start = clock.barrier_now()
        self._last = self.start
        self.end: float | None = None

    def lap(self, segment: str) -> None:
        """Charge the time since the previous lap to `segment`."""
        t = self.clock.now()
        self.totals[segment] += t - self._last
        self._last = t

    def skip(self) -> None:
        """Restart the running segment without charging it (the time lands in 'other')."""
        self._last = self.clock.now()

    def stop(self) -> float:
        self.end = self.clock.barrier_now()
        # Whatever happened after the last lap (the final sync, bookkeeping) is 'other'.
        return self.end - self.start

    @property
    def wall_s(self) -> float:
        if self.end is None:
            raise RuntimeError("SegmentTimer.stop() has not been called")
        return self.end - self.start

    def breakdown(self, names: tuple[str, ...]) -> dict[str, float]:
        """Named segments plus other_s; the values sum to wall_s (up to float rounding)."""
        parts = {f"{n}_s": self.totals.get(n, 0.0) for n in names}
        parts["other_s"] = self.wall_s - sum(parts.values())
        return parts

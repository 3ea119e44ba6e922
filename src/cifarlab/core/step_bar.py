"""The progress bar inside an epoch (steps, images/s, ETA) on a terminal, drawn by tqdm; nothing at all when the
stream is not a terminal (CI, files), so logs keep only the epoch lines. `cifarlab train` and `cifarlab lab`
both use it; the lab puts its own overall progress (elapsed, ETA of the whole lab) beside the bar."""

from __future__ import annotations

import time
from typing import Callable, TextIO

from tqdm import tqdm


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


class StepBar:
    """One bar per epoch: on_step(...) after every step, close() before the epoch's line is printed."""

    def __init__(self, stream: TextIO, batch_size: int, extra: Callable[[], str] | None = None) -> None:
        self.stream = stream
        self.enabled = is_terminal(stream)
        self.batch_size = batch_size
        self.extra = extra  # more text after images/s (the lab's overall progress), read at each redraw
        self._bar: tqdm | None = None
        self._key: tuple[int, int] | None = None
        self._t0 = 0.0
        self._first = 0  # the step the bar was created after: images/s counts the steps after it
        self._last_postfix = 0.0

    def on_step(self, desc: str, epoch: int, step: int, steps_total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None or self._key != (epoch, steps_total) or step < self._bar.n:
            self.close()
            self._bar = tqdm(total=steps_total or None, desc=desc, unit="step", file=self.stream, leave=False,
                             dynamic_ncols=True, mininterval=0.2, initial=step - 1)
            self._key, self._t0, self._first = (epoch, steps_total), time.perf_counter(), step
        self._bar.update(step - self._bar.n)
        now = time.perf_counter()
        if now - self._last_postfix >= 0.5 or step == steps_total:  # tqdm redraws at most every 0.2 s anyway
            self._last_postfix = now
            done = step - self._first
            rate = f"{done * self.batch_size / (now - self._t0):,.0f} img/s" if now > self._t0 and done else "img/s n/a"
            self._bar.set_postfix_str(rate + (f" | {self.extra()}" if self.extra else ""), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()  # leave=False: the bar's line is cleared for the epoch line
            self._bar = None

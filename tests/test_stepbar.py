"""The in-epoch progress bar: drawn (steps, images/s, ETA, the lab's progress) on a terminal, absent when the
stream is not one, so logs hold the epoch lines only; and a real `cifarlab train` under a pseudo-terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from cifarlab.core.step_bar import StepBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_steps_images_per_s_eta_and_the_extra() -> None:
    err = Terminal()
    bar = StepBar(err, batch_size=32, extra=lambda: "lab 1m elapsed, ETA ~5m")
    for step in range(1, 6):
        time.sleep(0.25)  # a step's time: tqdm redraws at most every 0.2 s
        bar.on_step("epoch 1/2", 1, step, 5)
    text = err.getvalue()
    bar.close()
    assert "epoch 1/2" in text and "/5 [" in text and "img/s" in text and "lab 1m elapsed, ETA ~5m" in text
    assert "<" in text  # tqdm's elapsed<remaining: the ETA


def test_a_log_file_gets_no_bar() -> None:
    err = io.StringIO()
    bar = StepBar(err, batch_size=32)
    for step in range(1, 4):
        bar.on_step("epoch 1/1", 1, step, 3)
    bar.close()
    assert err.getvalue() == ""


def test_train_on_a_terminal_draws_the_bar_and_keeps_stdout_plain(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()  # stderr is a terminal, stdout a pipe (as in `cifarlab train | tee log`)
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "cifarlab", "train", "--dataset", "synthetic", "--subset", "48",
                             "--test-subset", "16", "--batch-size", "16", "--epochs", "1", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=secondary, text=True)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=300)
    os.close(primary)
    assert proc.returncode == 0
    err = b"".join(chunks).decode(errors="replace")
    assert "epoch 1/1" in err and "/3 [" in err and "step/s" in err
    assert "\r" not in out and "img/s" in out and out.count("epoch 1/1") == 1  # the epoch line, no bar in the log

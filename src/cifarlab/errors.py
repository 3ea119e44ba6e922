"""Errors the user can fix. The CLI turns each into one line on stderr and exit code 2; `gist` makes one
short line of a foreign exception for such a message."""

from __future__ import annotations

import re


class UsageError(Exception):
    """Bad input: a flag value, a path, a dataset. The message names the value and the fix."""

    exit_code = 2


class DataError(UsageError):
    """Missing, truncated, corrupt or unsafe dataset files."""


# torch.load's advice to turn weights_only off: never repeated to a user whose file was refused for safety
_TORCH_ADVICE = ("weights only load failed", "re-running `torch.load`", "check the documentation of torch.load",
                 "in pytorch 2.6, we changed", "do it only if you got the file")


def clip(text: str, limit: int = 240) -> str:
    """text cut to at most `limit` characters at a word boundary, with ' ...' when something was cut."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 4].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:(") + " ..."


def gist(e: BaseException, limit: int = 240) -> str:
    """One short line from an exception whose message may span many lines (torch's do), cut at a word. A
    weights_only refusal gives its reason (the blocked global), not torch's advice to switch the check off."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    text = "\n".join(lines).lower()
    if "weightsunpickler error:" in text or "weights only load failed" in text:
        for i, line in enumerate(lines):
            if "WeightsUnpickler error:" in line:
                lines[i] = line.split("WeightsUnpickler error:", 1)[1].strip()
        reasons = [line for line in lines if line and not any(a in line.lower() for a in _TORCH_ADVICE)]
        return clip(f"weights_only refused it: {reasons[0] if reasons else 'a pickled object that is not a tensor'}",
                    limit)
    return clip(lines[0] if lines else type(e).__name__, limit)


def in_chain(e: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first `kind` in e's cause/context chain, or None: torch's C++ file writer turns an OSError or a
    KeyboardInterrupt raised in its Python write callback into a RuntimeError ("unexpected pos ...")."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def raise_if_interrupted(e: BaseException) -> None:
    """Raise again a KeyboardInterrupt (a signal) that C++ code wrapped in another exception, so an `except
    Exception` that reports a failure and goes on does not swallow the user's Ctrl-C."""
    stop = in_chain(e, KeyboardInterrupt)
    if stop is not None:
        raise stop from None

"""Errors the user can fix. The CLI turns each into one line on stderr and exit code 2 (core.text.one_line
quotes a foreign exception in such a line); a signal that C++ code wrapped in its own error is raised again."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: a flag value, a path, a dataset. The message names the value and the fix."""

    exit_code = 2


class DataError(UsageError):
    """Missing, truncated, corrupt or unsafe dataset files."""


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

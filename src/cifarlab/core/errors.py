"""Errors the user can fix. The CLI turns each into one line on stderr and exit code 2."""


class UsageError(Exception):
    """Bad input: a flag value, a path, a dataset. The message names the value and the fix."""

    exit_code = 2


class DataError(UsageError):
    """Missing, truncated, corrupt or unsafe dataset files."""


def one_line(e: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message (torch's span many lines), at most `limit`
    characters: what a recorded fallback or a one-line error quotes after the exception's type name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]

"""Errors the user can fix. The CLI turns each into one line on stderr and exit code 2."""


class UsageError(Exception):
    """Bad input: a flag value, a path, a dataset. The message names the value and the fix."""

    exit_code = 2


class DataError(UsageError):
    """Missing, truncated, corrupt or unsafe dataset files."""

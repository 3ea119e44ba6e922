"""Text for the user: an exception quoted in one line (torch's messages span many)."""


def one_line(e: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message (torch's span many lines), at most `limit`
    characters: what a recorded fallback or a one-line error quotes after the exception's type name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]

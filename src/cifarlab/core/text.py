"""Text for the user: an exception quoted in one line (torch's messages span many), cut at a word."""

from __future__ import annotations

import re

# torch.load's advice to turn weights_only off: never repeated to a user whose file was refused for safety
_TORCH_ADVICE = ("weights only load failed", "re-running `torch.load`", "check the documentation of torch.load",
                 "in pytorch 2.6, we changed", "do it only if you got the file")


def clip(text: str, limit: int = 240) -> str:
    """text cut to at most `limit` characters at a word boundary, with ' ...' when something was cut."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 4].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:(") + " ..."


def one_line(e: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message (torch's span many lines), at most `limit` characters and
    cut at a word: what a recorded fallback or a one-line error quotes after the exception's type name ('' for an
    empty message). A weights_only refusal gives its reason (the blocked global), not torch's advice to switch the
    check off."""
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
    return clip(lines[0], limit) if lines else ""

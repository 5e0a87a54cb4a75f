"""The one exception type a user sees.

Every failure a user can fix (bad config, missing column, unknown run, tampered
checkpoint) is raised as :class:`XAIError` with one line that says what is wrong and
how to fix it. The CLI prints that line and exits non-zero, with no traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class XAIError(Exception):
    """A user-facing error: one line, what is wrong and how to fix it."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would break the CLI's contract.
        super().__init__(" ".join(str(message).split()))


def unknown_choice(kind: str, values: str | Sequence[str], choices: Sequence[str], *, where: str = "",
                   shown: int = 8) -> XAIError:
    """The error for names that are none of ``choices``: what was asked, the closest match
    as a hint, then the valid names (close matches first, so a typo shows its fix, then
    the others in order; at most ``shown``, with the count when there are more).

    Example:
        >>> print(unknown_choice("layer", "layer.0", ["layers.0", "layers.1", "head"], where=" in Net"))
        unknown layer 'layer.0' in Net (did you mean 'layers.0'?); valid layers: layers.0, layers.1, head
    """
    asked = [values] if isinstance(values, str) else list(values)
    names = [str(c) for c in choices]
    close = list(dict.fromkeys(c for v in asked for c in difflib.get_close_matches(str(v), names, n=3)))
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = close + [n for n in names if n not in close][: max(shown - len(close), 0)]
    more = f", ... ({len(names)} in all)" if len(names) > len(listed) else ""
    named = ", ".join(repr(v) for v in asked)
    return XAIError(f"unknown {kind}{'s' if len(asked) > 1 else ''} {named}{where}{hint}; "
                    f"valid {kind}s: {', '.join(listed) or '(none)'}{more}")

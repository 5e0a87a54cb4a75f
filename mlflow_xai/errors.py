"""The one exception type a user sees.

Every failure a user can fix (bad config, missing column, unknown run, tampered
checkpoint) is raised as :class:`XAIError` with one line that says what is wrong and
how to fix it. The CLI prints that line and exits non-zero, with no traceback.
"""

from __future__ import annotations


class XAIError(Exception):
    """A user-facing error: one line, what is wrong and how to fix it."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would break the CLI's contract.
        super().__init__(" ".join(str(message).split()))

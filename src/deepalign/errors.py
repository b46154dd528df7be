"""One exception type for every bad input: the CLI prints its message on one line and exits 2."""

from __future__ import annotations


class DeepAlignError(Exception):
    """A user-facing error: the message says what is wrong and where."""

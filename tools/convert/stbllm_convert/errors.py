"""Errors and warnings the converter raises for problems with its input (not bugs)."""
from __future__ import annotations


class ConvertError(Exception):
    """A user-facing problem (missing file, unsupported architecture, bad option). The CLI prints the message on one
    line and exits with status 2, without a traceback."""


class ConvertWarning(UserWarning):
    """Something the user should know about, but that does not stop the conversion (e.g. no tokenizer found)."""

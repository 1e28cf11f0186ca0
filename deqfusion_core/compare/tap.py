"""Reading an upstream's progress from what it prints, without changing what it prints."""
from __future__ import annotations

import contextlib
import io
import sys
from typing import Callable, Iterator

__all__ = ["LineTap", "tap_stdout"]


class LineTap(io.TextIOBase):
    """A text stream that writes through to ``out`` and calls ``on_line(line)`` for each complete line."""

    def __init__(self, out, on_line: Callable[[str], None]):
        self.out, self.on_line, self.buffer = out, on_line, ""

    def write(self, text):
        self.out.write(text)
        self.buffer += text
        *lines, self.buffer = self.buffer.replace("\r", "\n").split("\n")
        for line in lines:
            self.on_line(line)
        return len(text)

    def flush(self):
        self.out.flush()


@contextlib.contextmanager
def tap_stdout(on_line: Callable[[str], None]) -> Iterator[LineTap]:
    """``sys.stdout`` tapped line by line for the duration."""
    tap = LineTap(sys.stdout, on_line)
    with contextlib.redirect_stdout(tap):
        yield tap

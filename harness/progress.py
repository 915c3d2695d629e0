"""One live progress line: rewritten in place on a terminal, whole lines now and then in a log file.
Used by prepare.py's downloads and train.py's loop."""
import math
import sys
import time


class ProgressLine:
    """One live line on a terminal (rewritten with \\r); whole lines at most every `every_s` otherwise,
    so a log file never holds a megabyte-long line of carriage returns."""

    def __init__(self, every_s=5.0, stream=None):
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self._last = -math.inf
        self._width = 0

    def _rewrite(self, text):
        self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
        self._width = len(text)

    def update(self, text):
        if self.live:
            self._rewrite(text)
        elif time.monotonic() - self._last >= self.every_s:
            self.stream.write(text + "\n")
            self._last = time.monotonic()
        self.stream.flush()

    def done(self, text):
        if self.live:
            self._rewrite(text)
        self.stream.write(("\n" if self.live else text + "\n"))
        self.stream.flush()

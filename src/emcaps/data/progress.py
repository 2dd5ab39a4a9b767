"""A dependency-free text progress bar on stderr (tqdm is not a dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts work done and redraws one line at most every ``interval`` seconds; silent if disabled."""

    def __init__(self, total: int | None, desc: str = "", enabled: bool = True, unit: str = "",
                 stream: TextIO | None = None, interval: float = 0.2, width: int = 30):
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.width = width
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw(end="")

    def close(self) -> None:
        if self.enabled:
            self._draw(end="\n")

    def _draw(self, end: str) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            fraction = min(1.0, self.done / self.total)
            filled = int(round(fraction * self.width))
            bar = "#" * filled + "." * (self.width - filled)
            text = f"{self.desc} [{bar}] {self.done}/{self.total}{self.unit} {elapsed:5.1f}s {rate:,.0f}{self.unit}/s"
        else:
            text = f"{self.desc} {self.done}{self.unit} {elapsed:5.1f}s {rate:,.0f}{self.unit}/s"
        self.stream.write("\r" + text + end)
        self.stream.flush()

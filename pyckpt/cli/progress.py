"""A progress bar on stderr (bytes, GB/s, ETA), drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .._units import human_bytes


class ProgressBar:
    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.started = time.perf_counter()
        self.last_draw = 0.0

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last_draw < 0.1 and done < total:
            return
        self.last_draw = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        fraction = done / total if total else 1.0
        eta = (total - done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * fraction)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {fraction * 100:5.1f}%  {human_bytes(done)}/{human_bytes(total)}  "
            f"{rate / 1e9:.2f} GB/s  ETA {int(eta) // 60}:{int(eta) % 60:02d} "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

"""Live training progress: one refreshing line on a terminal, plain log lines otherwise.

On a terminal the line shows phase, epoch, batch, running loss, images/s and the ETA of the whole
run, redrawn at most a few times a second. When output goes to a file or a pipe (CI, ``nohup``,
torchrun's collected logs) only one line per epoch is printed, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from covid_cxr.fmt import duration
from covid_cxr.train.engine import EpochStats


class Progress:
    """Progress of a run of ``total_epochs`` epochs (counting every phase)."""

    def __init__(
        self,
        total_epochs: int,
        *,
        num_phases: int,
        stream: TextIO | None = None,
        live: bool | None = None,
        enabled: bool = True,
        min_interval: float = 0.2,
    ) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.enabled = enabled
        self.total_epochs = total_epochs
        self.num_phases = num_phases
        self.min_interval = min_interval
        self._epochs_done = 0
        self._epoch_seconds: list[float] = []
        self._last_draw = 0.0
        self._phase = 0
        self._epoch = 0
        self._epochs_per_phase = 1
        self._epoch_start = time.perf_counter()

    def start_epoch(self, phase: int, epoch: int, epochs_per_phase: int, epochs_done: int) -> None:
        """``phase`` and ``epoch`` are 1-based; ``epochs_done`` counts epochs already finished (resume)."""
        self._phase, self._epoch, self._epochs_per_phase = phase, epoch, epochs_per_phase
        self._epochs_done = epochs_done
        self._epoch_start = time.perf_counter()

    def _eta(self, fraction_of_epoch: float) -> float:
        elapsed = time.perf_counter() - self._epoch_start
        per_epoch = (
            sum(self._epoch_seconds) / len(self._epoch_seconds)
            if self._epoch_seconds
            else (elapsed / fraction_of_epoch if fraction_of_epoch > 0 else 0.0)
        )
        remaining_epochs = self.total_epochs - self._epochs_done - fraction_of_epoch
        return max(remaining_epochs, 0.0) * per_epoch

    def on_batch(self, index: int, num_batches: int, loss: float, images: int) -> None:
        if not (self.enabled and self.live):
            return
        now = time.perf_counter()
        last = index + 1 == num_batches
        if now - self._last_draw < self.min_interval and not last:
            return
        self._last_draw = now
        elapsed = now - self._epoch_start
        rate = images / elapsed if elapsed > 0 else 0.0
        fraction = (index + 1) / num_batches if num_batches else 0.0
        line = (
            f"phase {self._phase}/{self.num_phases} epoch {self._epoch}/{self._epochs_per_phase} "
            f"batch {index + 1}/{num_batches} loss {loss:.4f} {rate:.1f} img/s ETA {duration(self._eta(fraction))}"
        )
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()

    def end_epoch(self, train: EpochStats, val: EpochStats, *, best: bool) -> None:
        self._epoch_seconds.append(time.perf_counter() - self._epoch_start)
        self._epochs_done += 1
        if not self.enabled:
            return
        prefix = "\r\x1b[2K" if self.live else ""
        mark = " *best*" if best else ""
        self.stream.write(
            f"{prefix}phase {self._phase}/{self.num_phases} epoch {self._epoch}/{self._epochs_per_phase} "
            f"loss {train.loss:.4f} acc {train.accuracy:.3f} val_loss {val.loss:.4f} val_acc {val.accuracy:.3f} "
            f"{train.images_per_s:.1f} img/s {train.seconds:.1f}s ETA {duration(self._eta(0.0))}{mark}\n"
        )
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\x1b[2K" if self.live else "") + text + "\n")  # over a live batch line
            self.stream.flush()

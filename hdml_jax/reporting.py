"""What a run shows and records: the progress line, ``metrics.jsonl`` and TensorBoard."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax

from hdml_jax import evaluate
from hdml_jax.workdir import storage_errors


class Reporter:
    """Progress line on screen; metrics.jsonl and TensorBoard in the workdir (process 0 only).

    ``record=False`` (``eval_only``) prints without writing anything. ``purge_step``: on resume,
    TensorBoard drops the events at and after it that an earlier attempt wrote.
    """

    def __init__(
        self,
        workdir: Path,
        total_steps: int,
        batch_size: int,
        *,
        record: bool = True,
        purge_step: int | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.record = record and self.enabled
        self.workdir = workdir
        self.total_steps, self.batch_size = total_steps, batch_size
        self.interactive = sys.stderr.isatty()
        self._tb = None
        self._jsonl = None
        self._last = (time.perf_counter(), None)
        self._smoothed: float | None = None
        if self.record:
            self._jsonl = open(workdir / "metrics.jsonl", "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir), purge_step=purge_step)
            except ImportError:
                print("tensorboardX is not installed: no TensorBoard events are written.", file=sys.stderr)

    def restart_clock(self, step: int) -> None:
        """Exclude what happened since the last log (evaluation, checkpointing) from images/s."""
        self._last = (time.perf_counter(), step)

    def train(self, step: int, epoch: float, values: dict[str, float]) -> None:
        now = time.perf_counter()
        last_time, last_step = self._last
        self._last = (now, step)
        speed = (step - last_step) * self.batch_size / (now - last_time) if last_step is not None else 0.0
        if speed > 0:  # the first interval holds compilation: leave it out of the average
            self._smoothed = speed if self._smoothed is None else 0.7 * self._smoothed + 0.3 * speed
        values = {**values, "images_per_second": speed}
        if not self.enabled:
            return
        remaining = (
            (self.total_steps - step) * self.batch_size / self._smoothed if self._smoothed else float("nan")
        )
        eta = "?" if math.isnan(remaining) else time.strftime("%H:%M:%S", time.gmtime(remaining))
        done = int(30 * step / self.total_steps)
        line = (
            f"[{'#' * done}{'.' * (30 - done)}] step {step}/{self.total_steps} epoch {epoch:.1f} "
            f"loss {values['loss']:.4f} {speed:.0f} img/s ETA {eta}"
        )
        if self.interactive:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
        self._write({"kind": "train", "step": step, "epoch": epoch, **values}, "train")

    def eval(self, step: int, epoch: float, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.interactive:
            print(file=sys.stderr)
        print(evaluate.summary_line(step, values), file=sys.stderr, flush=True)
        self._write({"kind": "eval", "step": step, "epoch": epoch, **values}, "eval")

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        if not self.record:
            return
        with storage_errors("writing metrics.jsonl", self.workdir):
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            if self._tb is not None:
                for key, value in record.items():
                    if key not in ("kind", "step") and isinstance(value, (int, float)):
                        # TensorBoard tags allow no "@": recall@1 → recall_at_1.
                        self._tb.add_scalar(f"{prefix}/{key.replace('@', '_at_')}", value, record["step"])
                self._tb.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk was reported already
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()

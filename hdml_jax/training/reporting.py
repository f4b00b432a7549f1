"""What a run shows and records: the progress line, ``metrics.jsonl`` and TensorBoard.

Both logs grow by appending. In a local workdir they are appended there, line by line and event
by event. Object storage has no append (and allows about one write per second to an object), so
for a remote workdir (``hdml_jax.storage``) they grow in a local staging folder instead:
``metrics.jsonl`` is first downloaded from the workdir (a resumed run continues it), and
``sync()`` uploads it and this run's TensorBoard event file whole, each in one atomic upload.
The trainer syncs before every checkpoint is saved, before the final outputs and at the end, so
the workdir's log always holds every record up to its newest checkpoint; records past it (a run
killed between checkpoints) are lost with the staging folder, as is the training they describe.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from hdml_jax import storage
from hdml_jax.evaluation import evaluate
from hdml_jax.workdir import storage_errors

LOG_NAME = "metrics.jsonl"
EVENTS_PREFIX = "events.out.tfevents."


class Reporter:
    """Progress line on screen; metrics.jsonl and TensorBoard in the workdir (process 0 only).

    ``record=False`` (``eval_only``) prints without writing anything. ``purge_step``: on resume,
    TensorBoard drops the events at and after it that an earlier attempt wrote. A remote
    ``workdir`` gets the logs through a local staging folder and ``sync`` (module docstring).
    """

    def __init__(
        self,
        workdir: storage.AnyPath,
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
        # Remote workdir: the logs grow here and sync() uploads them; local: None.
        self.staging: Path | None = None
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._reopen_events: Any = None  # after a remote sync: makes the next events file
        self._events_files = 1
        if self.record:
            logdir = workdir
            if storage.is_remote(workdir):
                self.staging = logdir = Path(tempfile.mkdtemp(prefix="hdml_jax-logs-"))
                remote_log = storage.as_path(workdir) / LOG_NAME
                if storage.download(remote_log, logdir / LOG_NAME):
                    self._uploaded[LOG_NAME] = self._signature(logdir / LOG_NAME)
            self._jsonl = open(logdir / LOG_NAME, "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(logdir), purge_step=purge_step)
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
            if self._tb is None and self._reopen_events is not None:
                self._tb, self._reopen_events = self._reopen_events(), None
            if self._tb is not None:
                for key, value in record.items():
                    if key not in ("kind", "step") and isinstance(value, (int, float)):
                        # TensorBoard tags allow no "@": recall@1 → recall_at_1.
                        self._tb.add_scalar(f"{prefix}/{key.replace('@', '_at_')}", value, record["step"])
                self._tb.flush()

    @staticmethod
    def _signature(path: Path) -> tuple[int, int]:
        info = path.stat()
        return info.st_size, info.st_mtime_ns

    def sync(self) -> None:
        """Remote workdir: upload the staged ``metrics.jsonl`` and event files that changed since
        their last upload, each whole (local workdir: nothing to do). Called before each
        checkpoint, so the workdir's log covers every checkpoint there."""
        if self.staging is None:
            return
        with storage_errors(f"uploading {LOG_NAME}", self.workdir):
            if self._tb is not None:
                # tensorboardX writes its events from a queue in a thread of its own, and its
                # flush() does not wait for that queue; close() does. So the events file is closed
                # here, whole, and the next event starts a new one (TensorBoard reads every file of
                # a run in order; a suffix keeps names apart, as they carry only the second).
                writer_type = type(self._tb)
                self._tb.close()
                self._tb = None
                self._events_files += 1
                suffix = f".{self._events_files}"
                self._reopen_events = lambda: writer_type(str(self.staging), filename_suffix=suffix)
            for local in sorted(self.staging.iterdir()):
                if local.name != LOG_NAME and not local.name.startswith(EVENTS_PREFIX):
                    continue
                signature = self._signature(local)
                if signature[0] and self._uploaded.get(local.name) != signature:  # empty: nothing yet
                    storage.upload(local, storage.as_path(self.workdir) / local.name)
                    self._uploaded[local.name] = signature

    def close(self) -> None:
        """Close the logs; a remote workdir gets their last upload and the staging folder goes."""
        with contextlib.suppress(OSError):  # a full disk was reported already
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
        self._jsonl = self._tb = None
        if self.staging is not None:
            try:
                self.sync()
            except Exception as error:  # closing runs on every way out: say it, do not mask the cause
                print(
                    f"warning: could not upload the logs to {self.workdir} ({error}); the workdir keeps "
                    "those of the last checkpoint.",
                    file=sys.stderr,
                )
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

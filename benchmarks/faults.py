"""Fault injection: does a trainer killed at random moments resume to the same result, bit for bit?

    python benchmarks/faults.py --faults 8
    python benchmarks/faults.py --faults 20 --seed 3 --steps 120 --keep --workdir-root /tmp
    python benchmarks/faults.py --kinds SIGKILL SIGTERM          # leave Ctrl-C out

The trainer CLI (``python -m hdml_jax.main --config configs/synthetic.py``) runs as a subprocess
on a tiny network (ResNet-18 width 4, 16-d embedding, batch 16, ``--steps`` steps, a checkpoint
every ``--checkpoint-every`` steps, a progress line every step, no pictures, no NMI):

1. **Reference**: one uninterrupted run in workdir ``A``.
2. **Faulted**: in workdir ``B`` the same command is started, and at a random moment (uniform over
   the run's expected wall time, estimated from the reference: start-up and compilation, the
   training steps still to do, checkpoint writes, the final evaluation and the output files) it
   gets a SIGKILL, SIGTERM or SIGINT (random, seeded by ``--seed``; sent to its whole process
   group, as a scheduler or Ctrl-C would). Then the same command is started again, which must
   resume, and so on until ``--faults`` signals have landed; then it is rerun without faults until
   a run exits 0 with ``final_metrics.json`` of the last step in the workdir. A run that ends
   before its signal was due is listed as "missed" and does not count. If ``B`` finishes with
   faults still to send, they go to a fresh workdir ``B2`` (a second round), and so on; if it
   finishes before its first fault it is deleted and started again.
3. **Report**: per run: the signal, when it was sent, what the process was doing (start-up, a
   training step, a checkpoint write, the final save/evaluation, output writing, exiting: inferred
   from its output so far), the step it was at (its last ``step N/M`` progress line), the step it
   started from, the last step it reached, the step the next run resumed from (its ``resumed ...
   step N`` line; without one, the largest integer-named folder in ``checkpoints/`` before it
   started, marked ``*``), the steps computed twice, the exit code and whether stderr held a
   Python traceback. Then per round, against ``A``: the largest absolute difference of
   ``test_embeddings.npy``, whether ``final_metrics.json`` agrees (timing fields left out) and
   whether every training record in its ``metrics.jsonl`` has the loss and learning rate of ``A``'s
   record of the same step.

Exit codes accepted after a signal: 0, 130 (SIGINT), 143, -9 and -15 (killed by the signal); a run
without a signal must exit 0. The script exits 1 when any run exits otherwise, prints a traceback,
hangs (``--hang-timeout`` seconds after its signal), never finishes, or when a round differs from
``A`` by more than ``--tolerance`` (default 0: bit-identical).

The trainer runs from a copy of ``hdml_jax/`` and ``configs/`` taken at the start, so that edits to
the working tree during the few minutes of the benchmark cannot make ``A`` and ``B`` differ
(``--in-place`` runs the tree itself, and reports any file that changed meanwhile). Every trainer
process shares the persistent JIT cache ``$JAX_COMPILATION_CACHE_DIR`` (default
``/tmp/hdml_faults_cache``), so restarts do not recompile. A run takes 25-60 s on 2 CPU cores;
8 faults take 5-10 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _timing
import numpy as np

KINDS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
ACCEPTED_AFTER_SIGNAL = frozenset({0, 130, 143, -9, -15})
STEP_RE = re.compile(r"\bstep (\d+)/(\d+)\b")
RESUME_RE = re.compile(r"resum\w*\b.*?\bstep\s+(\d+)", re.IGNORECASE)
STOPPED_RE = re.compile(r"stopp\w*\s+at\s+step\s+(\d+)", re.IGNORECASE)
EVAL_RE = re.compile(r"^\s*eval @ step (\d+)")
NOTE_RE = re.compile(r"damaged|intact|^\s*note:", re.IGNORECASE)  # echoed as they come
TIMING_KEY_RE = re.compile(r"time|second|speed|duration|wall|elapsed|per_s|img/s", re.IGNORECASE)
SOURCE_DIRS = ("hdml_jax", "configs")
MAX_CLEAN_RUNS = 3


# ----------------------------------------------------------------------------- records


@dataclass
class Attempt:
    """One start of the trainer: what was sent to it, what it printed, how it ended."""

    round: int
    index: int  # within its round
    kind: str | None = None  # the signal's name; None: a run without a fault
    planned_s: float | None = None  # when the signal was due (seconds after the start)
    sent_s: float | None = None  # when it went out; None: the process had exited before
    phase: str = "-"
    step_at_signal: int | None = None
    checkpoint_before: int | None = None  # the largest checkpoint folder before the start
    resumed: int | None = None  # parsed from stderr
    reached: int = 0
    exit_code: int | None = None
    traceback: bool = False
    hung: bool = False
    completed: bool = False  # exit 0 and final_metrics.json of the last step in the workdir
    discarded: bool = False  # its workdir was deleted afterwards (it finished before any fault)
    wall_s: float = 0.0
    first_step_s: float | None = None  # seconds until its first progress line
    source: str = ""  # digest of the trainer's source files when it started
    lines: list[tuple[float, str]] = field(default_factory=list)  # stderr
    stdout: list[tuple[float, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "A" if self.round == 0 else f"{self.round}.{self.index}"

    @property
    def resumed_from(self) -> int:
        """The step this run started at: its own message, else the checkpoint folders, else 0."""
        if self.resumed is not None:
            return self.resumed
        return self.checkpoint_before or 0

    @property
    def faulted(self) -> bool:
        return self.sent_s is not None


@dataclass
class Round:
    """A workdir faulted until it finished, and its runs."""

    number: int
    workdir: Path
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def delivered(self) -> int:
        return sum(a.faulted for a in self.attempts)

    @property
    def finished(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].completed


@dataclass
class Settings:
    source_dir: Path  # where the trainer runs from (a snapshot or the repository)
    root: Path
    config: str
    overrides: list[str]
    steps: int
    checkpoint_every: int
    hang_timeout: float
    run_timeout: float
    attempts_left: int


# ----------------------------------------------------------------------------- one trainer process


class LineCapture:
    """Reads a pipe line by line on a thread; keeps (seconds since start, line) and a log file."""

    def __init__(self, stream, start: float, log_path: Path):
        self.lines: list[tuple[float, str]] = []
        self._stream, self._start, self._log_path = stream, start, log_path
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self._log_path, "w") as log:
            for raw in self._stream:
                line = raw.rstrip("\n")
                with self._lock:
                    self.lines.append((time.monotonic() - self._start, line))
                log.write(line + "\n")
                log.flush()

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def join(self) -> list[tuple[float, str]]:
        self._thread.join(timeout=10)
        return self.snapshot()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/hdml_faults_cache")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def trainer_overrides(args: argparse.Namespace) -> list[str]:
    overrides = {
        "model.width": 4,
        "model.embedding_dim": 16,
        "batch_size": 16,
        "num_steps": args.steps,
        "eval_batch_size": 64,
        "log_every_steps": 1,
        "checkpoint_every_steps": args.checkpoint_every,
        "loss.num_coarse_groups": "(3,)",
        "pictures": False,
        "nmi": False,
        "seed": args.config_seed,
    }
    return [f"--config.{key}={value}" for key, value in overrides.items()] + [
        f"--config.{item}" for item in args.override
    ]


def trainer_command(workdir: Path, settings: Settings) -> list[str]:
    command = [sys.executable, "-m", "hdml_jax.main", "--config", settings.config]
    return [*command, "--workdir", str(workdir), *settings.overrides]


def checkpoint_steps(workdir: Path) -> list[int]:
    """The integer-named (finished) checkpoint folders; orbax's temporary ones are skipped."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def final_step(workdir: Path) -> int | None:
    try:
        return json.loads((workdir / "final_metrics.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def kill_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def run_trainer(workdir: Path, attempt: Attempt, settings: Settings) -> Attempt:
    """Start the trainer; send ``attempt.kind`` at ``attempt.planned_s`` unless it ended before."""
    attempt.checkpoint_before = max(checkpoint_steps(workdir), default=None)
    attempt.source = source_digest(source_hashes(settings.source_dir))
    log = settings.root / "logs" / attempt.name.replace(".", "_")
    start = time.monotonic()
    process = subprocess.Popen(
        trainer_command(workdir, settings),
        cwd=settings.source_dir,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group: the signal reaches it (and only it) whole
    )
    stderr = LineCapture(process.stderr, start, log.with_suffix(".stderr"))
    stdout = LineCapture(process.stdout, start, log.with_suffix(".stdout"))
    try:
        if attempt.kind is not None and attempt.planned_s is not None:
            try:
                process.wait(timeout=attempt.planned_s)
            except subprocess.TimeoutExpired:
                attempt.sent_s = time.monotonic() - start
                kill_group(process, KINDS[attempt.kind])
                seen = stderr.snapshot() + stdout.snapshot()
                attempt.phase, step = describe_moment(seen, attempt.sent_s, settings)
                attempt.step_at_signal = (attempt.checkpoint_before or 0) if step is None else step
        try:
            process.wait(timeout=settings.hang_timeout if attempt.faulted else settings.run_timeout)
        except subprocess.TimeoutExpired:
            attempt.hung = True
            kill_group(process, signal.SIGKILL)
            process.wait()
    finally:
        if process.poll() is None:
            kill_group(process, signal.SIGKILL)
            process.wait()
        kill_group(process, signal.SIGKILL)  # anything it started and left behind in its group
    attempt.wall_s = time.monotonic() - start
    attempt.exit_code = process.returncode
    attempt.lines, attempt.stdout = stderr.join(), stdout.join()
    summarise_output(attempt, workdir, settings.steps)
    return attempt


# ----------------------------------------------------------------------------- reading the output


def progress_steps(lines: Sequence[tuple[float, str]]) -> list[tuple[float, int, int]]:
    """(time, step, total) of every ``step N/M`` progress line."""
    found = []
    for t, line in lines:
        for match in STEP_RE.finditer(line):
            found.append((t, int(match.group(1)), int(match.group(2))))
    return found


def parse_resumed(lines: Sequence[tuple[float, str]]) -> int | None:
    for _, line in lines:
        match = RESUME_RE.search(line)
        if match:
            return int(match.group(1))
    return None


def describe_moment(
    lines: Sequence[tuple[float, str]], at: float, settings: Settings
) -> tuple[str, int | None]:
    """What the process was doing ``at`` seconds after its start, judged by its output until then:
    the phase, and the step it was at (None: not known yet, it had not restored)."""
    earlier = sorted((t, line) for t, line in lines if t <= at)
    steps = progress_steps(earlier)
    resumed = parse_resumed(earlier)
    step = steps[-1][1] if steps else resumed
    if step is None:
        return "start-up", None
    if any(line.startswith("done:") for _, line in earlier):
        return "exiting", step
    if step >= settings.steps:
        evaluated = any((m := EVAL_RE.match(line)) and int(m.group(1)) >= step for _, line in earlier)
        return ("outputs" if evaluated else "final save/eval"), step
    if not steps:
        return "start-up", step  # restored; compiling
    return ("checkpoint" if step % settings.checkpoint_every == 0 else "train"), step


def summarise_output(attempt: Attempt, workdir: Path, total: int) -> None:
    lines = attempt.lines
    steps = progress_steps(lines)
    attempt.resumed = parse_resumed(lines)
    attempt.traceback = any("Traceback" in line for _, line in lines)
    stopped = [int(m.group(1)) for _, line in lines if (m := STOPPED_RE.search(line))]
    attempt.reached = max([s for _, s, _ in steps] + stopped + [attempt.resumed_from])
    attempt.first_step_s = steps[0][0] if steps else None
    attempt.completed = attempt.exit_code == 0 and final_step(workdir) == total


def stderr_tail(attempt: Attempt, count: int = 15) -> str:
    return "\n".join(f"    | {line}" for _, line in attempt.lines[-count:])


def problems(attempt: Attempt) -> list[str]:
    found = []
    if attempt.traceback:
        found.append("Traceback in stderr")
    if attempt.hung:
        found.append("did not exit in time (killed)")
    if attempt.faulted and attempt.exit_code not in ACCEPTED_AFTER_SIGNAL:
        found.append(f"exit code {attempt.exit_code} after {attempt.kind}")
    if not attempt.faulted and attempt.exit_code != 0 and not attempt.hung:
        found.append(f"exit code {attempt.exit_code} without a fault")
    return found


# ----------------------------------------------------------------------------- the source tree


def snapshot_source(root: Path) -> Path:
    """Copy ``hdml_jax/`` and ``configs/`` under ``root/src``: the trainer runs from there."""
    target = root / "src"
    for name in SOURCE_DIRS:
        shutil.copytree(_timing.REPO_ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def source_hashes(directory: Path) -> dict[str, str]:
    hashes = {}
    for name in SOURCE_DIRS:
        for path in sorted((directory / name).rglob("*.py")):
            hashes[str(path.relative_to(directory))] = hashlib.sha1(path.read_bytes()).hexdigest()
    return hashes


def source_digest(hashes: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:12]


def describe_checkout() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=_timing.REPO_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    changed = [line for line in git("status", "--porcelain", *SOURCE_DIRS).splitlines() if line]
    return (
        f"git {git('rev-parse', '--short', 'HEAD') or '?'} + {len(changed)} changed file(s) in {SOURCE_DIRS}"
    )


# ----------------------------------------------------------------------------- the schedule


@dataclass
class Profile:
    """Wall-time shape of a run, from the reference: start-up, seconds per step, the tail."""

    startup_s: float
    step_s: float
    tail_s: float
    steps: int

    def expected_s(self, resumed_from: int) -> float:
        remaining = max(self.steps - resumed_from - 1, 0)
        return self.startup_s + remaining * self.step_s + self.tail_s

    def observe_startup(self, attempt: Attempt) -> None:
        """Later starts hit the warm JIT cache: keep the fastest start-up seen."""
        if attempt.first_step_s is not None:
            self.startup_s = min(self.startup_s, attempt.first_step_s)


def profile_from(reference: Attempt, steps: int) -> Profile:
    progress = progress_steps(reference.lines)
    if len(progress) < 2:
        return Profile(reference.wall_s / 2, reference.wall_s / (2 * steps), 0.0, steps)
    (t_first, s_first, _), (t_last, s_last, _) = progress[0], progress[-1]
    step_s = (t_last - t_first) / max(s_last - s_first, 1)
    return Profile(t_first, step_s, max(reference.wall_s - t_last, 0.0), steps)


# ----------------------------------------------------------------------------- the experiment


def run_reference(settings: Settings) -> Attempt:
    workdir = settings.root / "A"
    print(f"[reference] {' '.join(trainer_command(workdir, settings)[1:])}", flush=True)
    attempt = run_trainer(workdir, Attempt(round=0, index=0), settings)
    print(
        f"[reference] exit {attempt.exit_code} after {attempt.wall_s:.1f} s "
        f"(first step at {attempt.first_step_s or math.nan:.1f} s), completed={attempt.completed}",
        flush=True,
    )
    if problems(attempt) or not attempt.completed:
        print(stderr_tail(attempt), flush=True)
    return attempt


def run_faulted(
    settings: Settings, profile: Profile, faults: int, kinds: Sequence[str], rng: random.Random
) -> list[Round]:
    """Rounds of faults (workdirs B, B2, ...) until ``faults`` signals have landed."""
    rounds: list[Round] = []
    delivered = 0
    while delivered < faults and settings.attempts_left > 0:
        number = len(rounds) + 1
        workdir = settings.root / ("B" if number == 1 else f"B{number}")
        current = Round(number, workdir)
        rounds.append(current)
        run_round(settings, profile, current, faults - delivered, kinds, rng)
        delivered += current.delivered
        if current.delivered == 0 or not current.finished:
            break
    return rounds


def run_round(
    settings: Settings,
    profile: Profile,
    current: Round,
    faults: int,
    kinds: Sequence[str],
    rng: random.Random,
) -> None:
    """Fault the workdir until ``faults`` signals landed or it finished, then rerun it to the end."""
    workdir = current.workdir
    while current.delivered < faults and settings.attempts_left > 0:
        if current.finished:
            if current.delivered:
                break
            print("  (it finished before any fault landed: deleting the workdir, starting afresh)")
            current.attempts[-1].discarded = True
            shutil.rmtree(workdir)
        window = profile.expected_s(max(checkpoint_steps(workdir), default=0))
        attempt = Attempt(
            current.number, len(current.attempts) + 1, rng.choice(kinds), rng.uniform(0, window)
        )
        run_one(settings, current, attempt, f"fault {current.delivered + 1}/{faults}", window)
        profile.observe_startup(attempt)
    for clean in range(1, MAX_CLEAN_RUNS + 1):
        if current.finished:
            break
        attempt = Attempt(current.number, len(current.attempts) + 1)
        run_one(settings, current, attempt, f"clean rerun {clean}", None)


def run_one(settings: Settings, current: Round, attempt: Attempt, label: str, window: float | None) -> None:
    head = f"[{current.workdir.name} {label}] run {attempt.name}"
    if attempt.kind is not None:
        head += f": {attempt.kind} due at {attempt.planned_s:.2f} s (window {window:.1f} s)"
    print(head, flush=True)
    settings.attempts_left -= 1
    run_trainer(current.workdir, attempt, settings)
    current.attempts.append(attempt)
    if attempt.kind is not None and not attempt.faulted:
        what = f"missed: exited {attempt.exit_code} after {attempt.wall_s:.1f} s, before the signal"
    elif attempt.faulted:
        what = f"sent at {attempt.sent_s:.2f} s ({attempt.phase}, step {attempt.step_at_signal})"
    else:
        what = f"no fault, {attempt.wall_s:.1f} s"
    print(
        f"  from step {attempt.resumed_from}; {what}; reached step {attempt.reached}; "
        f"exit {attempt.exit_code}{' HUNG' if attempt.hung else ''}"
        f"{' TRACEBACK' if attempt.traceback else ''}; finished={attempt.completed}",
        flush=True,
    )
    for _, line in attempt.lines:
        if NOTE_RE.search(line):
            print(f"    | {line.strip()}", flush=True)
    if problems(attempt):
        print(stderr_tail(attempt), flush=True)


# ----------------------------------------------------------------------------- comparing A and B


def flatten(record: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif not TIMING_KEY_RE.search(key):
            flat[name] = value
    return flat


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def differing_metrics(path_a: Path, path_b: Path, tolerance: float) -> list[str]:
    a, b = load_json(path_a), load_json(path_b)
    if a is None or b is None:
        return [f"missing or unreadable: {p}" for p, v in ((path_a, a), (path_b, b)) if v is None]
    a, b = flatten(a), flatten(b)
    out = []
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key), b.get(key)
        numbers = isinstance(va, (int, float)) and isinstance(vb, (int, float))
        if va != vb and not (numbers and abs(va - vb) <= tolerance):
            out.append(f"{key}: {va!r} vs {vb!r}")
    return out


def embedding_difference(path_a: Path, path_b: Path) -> tuple[float, str]:
    """max |a - b| and a note (why it is inf: a file missing, unreadable, or of another shape)."""
    try:
        a, b = np.load(path_a), np.load(path_b)
    except (OSError, ValueError) as error:
        return math.inf, f"cannot load: {error}"
    if a.shape != b.shape:
        return math.inf, f"shapes {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)), ""


def train_records(path: Path) -> tuple[list[dict], int]:
    """The ``train`` records of metrics.jsonl and the number of lines that were not valid JSON."""
    records, bad = [], 0
    if not path.exists():
        return records, bad
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and record.get("kind") == "train":
            records.append(record)
    return records, bad


def compare_losses(path_a: Path, path_b: Path, tolerance: float) -> tuple[int, list[str], int]:
    """(records of B checked, differences from A, malformed lines in B's metrics.jsonl)."""
    records_a, _ = train_records(path_a)
    records_b, bad = train_records(path_b)
    by_step = {r["step"]: r for r in records_a}
    diffs = []
    for record in records_b:
        ref = by_step.get(record["step"])
        for key in ("loss", "lr"):
            if ref is None or abs(record[key] - ref[key]) > tolerance:
                diffs.append(f"step {record['step']} {key}: {ref and ref[key]!r} vs {record[key]!r}")
    return len(records_b), diffs, bad


def compare_round(workdir_a: Path, current: Round, tolerance: float) -> tuple[float, list[str]]:
    """Print the comparison of a round's workdir with A; return (max |A - B|, failures)."""
    b = current.workdir
    difference, why = embedding_difference(workdir_a / "test_embeddings.npy", b / "test_embeddings.npy")
    metrics_diffs = differing_metrics(workdir_a / "final_metrics.json", b / "final_metrics.json", tolerance)
    checked, loss_diffs, bad_lines = compare_losses(
        workdir_a / "metrics.jsonl", b / "metrics.jsonl", tolerance
    )
    print(f"\nA vs {b.name}:")
    print(f"  test_embeddings.npy: max |A - {b.name}| = {difference!r} {why}".rstrip())
    print(f"  final_metrics.json (timing fields left out): {'DIFFERENT' if metrics_diffs else 'equal'}")
    for line in metrics_diffs[:10]:
        print(f"      {line}")
    print(
        f"  metrics.jsonl: {checked} train records, each against A's of its step: "
        f"{len(loss_diffs)} differ; {bad_lines} malformed lines"
    )
    for line in loss_diffs[:10]:
        print(f"      {line}")
    failures = []
    if not difference <= tolerance:
        failures.append(f"{b.name}: test embeddings differ from A's by {difference!r} {why}".rstrip())
    if metrics_diffs:
        failures.append(f"{b.name}: final_metrics.json differs from A's in {len(metrics_diffs)} fields")
    if loss_diffs:
        failures.append(f"{b.name}: {len(loss_diffs)} train records differ from A's")
    return difference, failures


# ----------------------------------------------------------------------------- the report


def recomputed_steps(attempts: Sequence[Attempt]) -> list[int | None]:
    """Per run: steps it reached that the next run of its round computed again."""
    return [
        None if attempt.discarded else max(attempt.reached - following.resumed_from, 0)
        for attempt, following in itertools.pairwise(attempts)
    ] + [None]


def resumed_label(attempt: Attempt) -> str:
    if attempt.resumed is None:
        return f"{attempt.checkpoint_before or 0}*"
    if attempt.checkpoint_before is not None and attempt.checkpoint_before != attempt.resumed:
        return f"{attempt.resumed}!={attempt.checkpoint_before}"
    return str(attempt.resumed)


def attempt_row(attempt: Attempt, following: Attempt | None, redone: int | None) -> list[object]:
    signal_name = "-" if attempt.kind is None else attempt.kind + ("" if attempt.faulted else " (missed)")
    if attempt.discarded:
        next_from = "(deleted)"
    else:
        next_from = resumed_label(following) if following else "-"
    return [
        attempt.name,
        signal_name,
        f"{attempt.sent_s:.2f}" if attempt.faulted else "-",
        attempt.phase if attempt.faulted else ("finished" if attempt.completed else "-"),
        attempt.step_at_signal if attempt.faulted else "-",
        attempt.resumed_from,
        attempt.reached,
        next_from,
        "-" if redone is None else redone,
        f"{attempt.exit_code}{' hung' if attempt.hung else ''}",
        "yes" if attempt.traceback else "no",
        "FAIL" if problems(attempt) else "ok",
    ]


def print_attempts(rounds: Sequence[Round]) -> None:
    rows = []
    for current in rounds:
        attempts = current.attempts
        for attempt, following, redone in zip(
            attempts, [*attempts[1:], None], recomputed_steps(attempts), strict=True
        ):
            rows.append(attempt_row(attempt, following, redone))
    headers = [
        "run", "signal", "sent s", "phase", "step@sig", "from", "reached", "next from", "redone", "exit",
        "traceback", "",
    ]  # fmt: skip
    _timing.print_table(headers, rows, title="Faulted runs (run = round.index)")
    print(
        "  from / next from: the step this / the next run resumed from ('*': it printed none, the "
        "largest checkpoint folder before it started; 'a!=b': it printed a, the folders said b).\n"
        "  phase: inferred from the output so far; 'checkpoint': its last step was a checkpoint step."
    )


def source_changes(rounds: Sequence[Round], reference: Attempt) -> set[str]:
    return {a.source for r in rounds for a in r.attempts} | {reference.source}


def summarise(
    reference: Attempt, rounds: Sequence[Round], differences: list[float], failures: list[str]
) -> None:
    attempts = [a for r in rounds for a in r.attempts]
    faulted = [a for a in attempts if a.faulted]
    by_kind = ", ".join(f"{k} {sum(a.kind == k for a in faulted)}" for k in KINDS)
    redone = sum(r for rnd in rounds for r in recomputed_steps(rnd.attempts) if r is not None)
    missed = sum(a.kind is not None and not a.faulted for a in attempts)
    print(
        f"\nsummary: {len(faulted)} faults landed ({by_kind}), {missed} missed; {len(attempts)} runs in "
        f"{len(rounds)} round(s); {redone} steps recomputed; reference run {reference.wall_s:.1f} s"
    )
    print(f"max |A - B| of the test embeddings: {max(differences, default=math.nan)!r}")
    if failures:
        print(f"FAILED ({len(failures)}):")
        for failure in failures:
            print(f"  - {failure}")
    else:
        print("PASSED: every run ended as expected and every round matches A")


def collect_failures(reference: Attempt, rounds: Sequence[Round], faults: int) -> list[str]:
    failures = [f"reference run: {p}" for p in problems(reference)]
    if not reference.completed:
        failures.append("the reference run did not finish")
    for current in rounds:
        failures += [f"run {a.name}: {p}" for a in current.attempts for p in problems(a)]
        if not current.finished:
            failures.append(f"{current.workdir.name} never finished ({MAX_CLEAN_RUNS} clean reruns)")
    delivered = sum(r.delivered for r in rounds)
    if delivered < faults:
        failures.append(f"only {delivered} of {faults} faults landed")
    if len(source_changes(rounds, reference)) > 1:
        failures.append("the trainer's source files changed during the benchmark (--in-place)")
    return failures


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=8, help="signals that must land (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the signal kinds and times")
    parser.add_argument("--steps", type=int, default=80, help="training steps (config num_steps)")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="config checkpoint_every_steps")
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS))
    parser.add_argument("--method", default="", help="configs/synthetic.py:method=... (default hpl_pa)")
    parser.add_argument("--config-seed", type=int, default=0, help="the trainer's config.seed")
    parser.add_argument("--override", action="append", default=[], help="FIELD=VALUE, to --config.FIELD")
    parser.add_argument("--tolerance", type=float, default=0.0, help="allowed max |A - B| (default 0)")
    parser.add_argument("--hang-timeout", type=float, default=0.0, help="seconds a signalled run may take")
    parser.add_argument("--keep", action="store_true", help="keep the workdirs, logs and source copy")
    parser.add_argument("--workdir-root", type=Path, default=None, help="where the temporary folder goes")
    parser.add_argument("--in-place", action="store_true", help="run the working tree, not a copy")
    return parser.parse_args(argv)


def make_settings(args: argparse.Namespace, root: Path) -> Settings:
    config = "configs/synthetic.py" + (f":method={args.method}" if args.method else "")
    return Settings(
        source_dir=_timing.REPO_ROOT if args.in_place else snapshot_source(root),
        root=root,
        config=config,
        overrides=trainer_overrides(args),
        steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        hang_timeout=args.hang_timeout or 600.0,
        run_timeout=1800.0,
        attempts_left=3 * args.faults + MAX_CLEAN_RUNS + 10,
    )


def run_benchmark(args: argparse.Namespace, root: Path) -> list[str]:
    settings = make_settings(args, root)
    print(
        _timing.describe_environment(
            [
                f"faults {args.faults} seed {args.seed} kinds {' '.join(args.kinds)} steps {args.steps} "
                f"checkpoint every {args.checkpoint_every}; workdirs in {root}",
                f"trainer source: {settings.source_dir} ({describe_checkout()}, copied at the start)"
                if not args.in_place
                else f"trainer source: {settings.source_dir} in place ({describe_checkout()})",
                f"JAX_COMPILATION_CACHE_DIR={child_env()['JAX_COMPILATION_CACHE_DIR']}",
            ]
        ),
        flush=True,
    )
    reference = run_reference(settings)
    if not args.hang_timeout:
        settings.hang_timeout = max(60.0, 2 * reference.wall_s)
    profile = profile_from(reference, args.steps)
    print(
        f"[schedule] start-up {profile.startup_s:.1f} s, {profile.step_s * 1e3:.0f} ms per step "
        f"(checkpoints included), tail {profile.tail_s:.1f} s",
        flush=True,
    )
    rounds = run_faulted(settings, profile, args.faults, args.kinds, random.Random(args.seed))
    print_attempts(rounds)
    failures = collect_failures(reference, rounds, args.faults)
    differences = []
    for current in rounds:
        difference, round_failures = compare_round(root / "A", current, args.tolerance)
        differences.append(difference)
        failures += round_failures
    summarise(reference, rounds, differences, failures)
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir_root is not None:
        args.workdir_root.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="hdml_faults_", dir=args.workdir_root))
    (root / "logs").mkdir()
    try:
        failures = run_benchmark(args, root)
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The guides cannot go stale silently: every command they show still parses.

Every shell command line of ``README.md`` and ``docs/*.md`` (fenced blocks and inline code) that
runs ``python -m hdml_jax...`` or ``.venv/bin/python ...`` is dry-run by
``tests/docs_commands_check.py``: its module or script exists and its flags parse (the trainer's
config file, method and ``--config.FIELD`` overrides validate), without running anything.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHONS = ("python", "python3", ".venv/bin/python")
# Placeholders a guide writes for "more flags here"; not flags themselves.
ELLIPSES = ("...", "…", "[...]")


def command_lines(text: str) -> list[str]:
    """The shell commands of a Markdown text: fenced ``bash``/``sh``/``console`` or unlabelled
    blocks (continuation lines joined, ``#`` comments dropped) and inline code spans."""
    commands, block, fence_language, pending = [], False, "", ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            block, fence_language = not block, stripped[3:].strip().lower()
            continue
        if block:
            if fence_language not in ("", "bash", "sh", "shell", "console"):
                continue
            if stripped.startswith("#") and not pending:
                continue
            pending += stripped.removesuffix("\\") + " "
            if not stripped.endswith("\\"):
                commands.append(pending.strip())
                pending = ""
        else:
            commands += re.findall(r"`([^`]+)`", line)
    return commands


def python_invocations(command: str) -> list[list[str]]:
    """The argv (after the interpreter) of every ``python`` call of a shell command line."""
    found = []
    for segment in re.split(r"&&|\|\||;|\|", command):
        try:
            words = shlex.split(segment, comments=True)
        except ValueError:  # an unbalanced quote: prose, not a command
            continue
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if len(words) < 2 or words[0] not in PYTHONS:
            continue
        args = [w for w in words[1:] if w not in ELLIPSES]
        if args[:1] == ["-m"] and len(args) < 2:  # "python -m" alone, in prose
            continue
        if (args[0] == "-m" and args[1].startswith("hdml_jax")) or words[0] == ".venv/bin/python":
            found.append(args)
    return found


def guide_commands() -> dict[str, list[str]]:
    """``{"README.md: python -m hdml_jax.embed ...": argv}`` for every command of every guide."""
    result = {}
    for guide in GUIDES:
        for command in command_lines(guide.read_text()):
            for argv in python_invocations(command):
                result[f"{guide.relative_to(ROOT)}: {shlex.join(argv)}"] = argv
    return result


def test_the_extraction_finds_commands_in_blocks_inline_and_chains():
    text = "\n".join([
        "Run `python -m hdml_jax.embed --workdir RUN --images DIR --output e.npz` once.",
        "```bash",
        "# a comment",
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m hdml_jax.main",
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/losses.py \\",
        "    --quick",
        "```",
        "```python",
        "python -m hdml_jax.not_a_command",
        "```",
    ])  # fmt: skip
    argvs = [argv for command in command_lines(text) for argv in python_invocations(command)]
    assert argvs == [
        ["-m", "hdml_jax.embed", "--workdir", "RUN", "--images", "DIR", "--output", "e.npz"],
        ["-m", "hdml_jax.main"],
        ["benchmarks/losses.py", "--quick"],
    ]


# Commands the check must refuse: an unknown flag, config field or module, a missing script.
BROKEN = (
    ["-m", "hdml_jax.embed", "--workdir", "RUN", "--images", "DIR", "--output", "e.npz", "--bogus"],
    ["-m", "hdml_jax.main", "--config", "configs/cub.py:method=hpl_pa", "--config.loss.bogus=1"],
    ["-m", "hdml_jax.main", "--config", "configs/cub.py:method=no_such_method"],
    ["-m", "hdml_jax.no_such_module"],
    ["benchmarks/no_such_script.py"],
)


def test_every_command_in_the_readme_and_guides_parses():
    commands = guide_commands()
    assert len(commands) >= 20, sorted(commands)  # the guides show many; finding none is a bug here
    result = subprocess.run(
        [sys.executable, "-m", "tests.docs_commands_check"],
        input=json.dumps([*commands.values(), *BROKEN]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    refused = errors[len(commands) :]
    assert all(refused), f"the check let broken commands through: {list(zip(BROKEN, refused, strict=True))}"
    errors = errors[: len(commands)]
    failures = [f"{where}\n    {error}" for where, error in zip(commands, errors, strict=True) if error]
    assert not failures, f"{len(failures)} of {len(commands)} guide commands do not parse:\n" + "\n".join(
        failures
    )

"""Subprocesses of a benchmark run under one deadline, killed as a whole process group.

A borrowed GPU machine gives one command a few minutes: every step of ``gpu_bench.py`` is
bounded by what is left of ``--deadline-s``, and a step that hangs (the code under test can)
is killed with everything it started, its last output shown, and the run goes on to print
what was measured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Deadline:
    """``seconds`` from ``start`` (a ``time.monotonic()``): what is left bounds every step, and a
    step starts only with at least ``step_minimums[step]`` seconds left."""

    def __init__(self, seconds: float, start: float, step_minimums: Mapping[str, float]) -> None:
        self.seconds = seconds
        self.end = start + seconds
        self.step_minimums = step_minimums

    def left(self) -> float:
        return self.end - time.monotonic()

    def limit(self, own_limit: float) -> float:
        """A subprocess's timeout: its own limit, or the time left if that is shorter."""
        return max(1.0, min(own_limit, self.left()))

    def allows(self, step: str, indent: str = "") -> bool:
        """Whether ``step`` still fits; prints the SKIPPED line if not."""
        left, needs = self.left(), self.step_minimums[step]
        if left >= needs:
            return True
        print(f"{indent}SKIPPED: deadline ({max(0, int(left))} s left) -- needs >= {needs:.0f} s", flush=True)
        return False


def limit_text(limit: float, own_limit: float) -> str:
    return f"{limit:.0f} s" + (f" (cut from {own_limit:.0f} s by --deadline-s)" if limit < own_limit else "")


def run_bounded(command: Sequence[str], timeout_s: float, **kwargs: Any) -> tuple[int | None, str, str]:
    """Run ``command`` in its own session; the exit status (None on timeout), stdout, stderr.

    On timeout, or if this script is interrupted, SIGKILL goes to the command's whole process
    group: the ranks bench_distributed.py spawns, pytest's gloo workers, ninja's compilers. The
    output the command had produced is returned either way. Children run unbuffered, so a
    killed one's last lines are there."""
    env = {**(kwargs.pop("env", None) or os.environ), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )
    returncode: int | None = None
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, timeout_s))
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        kill_group(process)
        try:  # what was read before the timeout is kept; a process outside the group could hold the pipes
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired as exc:
            stdout, stderr = as_text(exc.stdout), as_text(exc.stderr)
            process.kill()
            process.wait()
    except BaseException:  # KeyboardInterrupt: leave nothing running behind this script
        kill_group(process)
        process.wait()
        raise
    return returncode, stdout or "", stderr or ""


def kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL to the process group the command leads: only before the command is reaped, so
    its id (the group's) cannot have been reused."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone already
        pass


def as_text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def output_tail(stdout: str, stderr: str, lines: int = 40) -> str:
    """The last ``lines`` lines of stdout and of stderr, each under its own heading."""
    parts = [
        f"--- {name} (last {min(lines, len(text.rstrip().splitlines()))} lines) ---\n{tail(text, lines)}"
        for name, text in (("stdout", stdout), ("stderr", stderr))
        if text.strip()
    ]
    return "\n".join(parts) or "(no output)"

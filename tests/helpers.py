"""Running test code in a child Python process, so that a crash, a hang or a memory measurement
is isolated from pytest: a segfault or an abort becomes a test failure with the child's output
instead of killing the whole run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _loaded_libraries() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


# True when the tests run under AddressSanitizer (scripts/sanitize.sh preloads libasan). ASan keeps
# freed memory in quarantine and aborts on impossible allocations, so memory measurements and
# out-of-memory tests are skipped there.
UNDER_ASAN = "libasan" in _loaded_libraries()

# Inputs tried by the fuzz campaigns of this run, by campaign (reported in pytest's summary).
FUZZ_COUNTS: dict[str, int] = {}


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def run_python(
    args: list[str] | str, *, timeout: float = 300, env: dict | None = None, context=None
) -> subprocess.CompletedProcess:
    """Runs `python -X faulthandler <args>` (or `-c <code>` for a string) with tests/ on the path.
    Fails the calling test, with the child's output, unless the child exits with code 0.
    context() (if given) adds a description to that failure, e.g. the input being run."""
    import pytest

    def describe_context() -> str:
        return f"\n{context()}" if context else ""

    if isinstance(args, str):
        args = ["-c", textwrap.dedent(args)]
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), child_env.get("PYTHONPATH")]))
    child_env.update(env or {})
    command = [sys.executable, "-X", "faulthandler", *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env, cwd=TESTS)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"child process hung (no result after {timeout:g} s){describe_context()}\n"
            f"--- stdout\n{_text(e.stdout)[-4000:]}\n--- stderr\n{_text(e.stderr)[-4000:]}",
            pytrace=False,
        )
    if result.returncode != 0:
        pytest.fail(
            f"child process failed: {describe_exit(result.returncode)}{describe_context()}\n"
            f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}",
            pytrace=False,
        )
    return result


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def assert_same_bytes_for_any_thread_count(run, num_threads) -> None:
    """run() returns a list of arrays; they must be byte for byte the same with 1, 2, 3 and again 1
    threads (num_threads: the fixture that sets lingrad's thread count)."""
    num_threads(1)
    first = run()
    for threads in (2, 3, 1):
        num_threads(threads)
        for a, b in zip(first, run()):
            assert a.tobytes() == b.tobytes(), f"results differ with {threads} threads"

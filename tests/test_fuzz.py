"""The property-based campaigns of fuzz.py (see its docstring for what they draw and check), each
in a child process: a crash fails the test with the input that caused it, instead of ending the
run. The campaigns are derandomized, so every run tries the same inputs; LINGRAD_FUZZ_SCALE
multiplies their number (e.g. 20 for a long run by hand)."""

import os
import re

import pytest

from helpers import FUZZ_COUNTS, TESTS, run_python

# examples per campaign: about 15 s in all on 2 cores
CAMPAIGNS = {"linear": 300, "mse": 300, "fused": 150, "errors": 800}


@pytest.mark.parametrize("campaign", CAMPAIGNS)
def test_fuzz_campaign(campaign, tmp_path):
    examples = max(1, round(CAMPAIGNS[campaign] * float(os.environ.get("LINGRAD_FUZZ_SCALE", "1"))))
    trace = tmp_path / "example.txt"

    def last_example():
        text = trace.read_text() if trace.exists() else "(none)\n"
        return f"the example being run: {text}"

    result = run_python(
        ["-W", "error", str(TESTS / "fuzz.py"), campaign, "--examples", str(examples), "--trace", str(trace)],
        timeout=900,
        context=last_example,
    )
    match = re.search(rf"fuzz {campaign}: (\d+) examples", result.stdout)
    assert match, f"no summary line from the campaign:\n{result.stdout[-2000:]}"
    FUZZ_COUNTS[campaign] = int(match.group(1))
    assert FUZZ_COUNTS[campaign] >= examples


def test_a_crash_in_the_child_is_reported():
    """The harness itself: a child that crashes or hangs fails the test, saying so. (Under ASan
    the sanitizer reports the crash and exits with code 1 instead of dying from the signal.)"""
    with pytest.raises(pytest.fail.Exception, match="killed by signal|AddressSanitizer: SEGV"):
        run_python("import ctypes; ctypes.string_at(0)", timeout=60)
    with pytest.raises(pytest.fail.Exception, match="hung"):
        run_python("import time; time.sleep(60)", timeout=1)

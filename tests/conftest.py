import numpy as np
import pytest

import lingrad

ISAS = lingrad.available_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once on every SIMD code path this CPU can run, then restore the default."""
    with lingrad.settings(isa=request.param):
        yield request.param


@pytest.fixture
def num_threads():
    """Lets a test change the thread count; restores it afterwards."""
    with lingrad.settings():
        yield lingrad.set_num_threads


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


def pytest_terminal_summary(terminalreporter):
    """How many inputs the fuzz campaigns tried (tests/test_fuzz.py)."""
    from helpers import FUZZ_COUNTS

    if FUZZ_COUNTS:
        detail = ", ".join(f"{name} {count}" for name, count in FUZZ_COUNTS.items())
        terminalreporter.write_line(f"lingrad fuzz campaigns: {sum(FUZZ_COUNTS.values())} inputs tried ({detail})")

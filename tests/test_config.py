import io
import math

import pytest

import lingrad
from lingrad import _C

from helpers import run_python


def test_config_describes_build_and_choices():
    info = lingrad.config()
    assert info["version"] == lingrad.__version__
    assert info["isa"] == lingrad.get_isa() in info["available_isas"]
    assert "generic" in info["available_isas"]
    assert info["num_threads"] == lingrad.get_num_threads() >= 1
    assert "-ffast-math" not in info["cxx_flags"] and "-Ofast" not in info["cxx_flags"]
    buffer = io.StringIO()
    lingrad.show_config(file=buffer)
    text = buffer.getvalue()
    assert lingrad.__version__ in text and info["isa"] in text and info["compiler"] in text


def test_isa_can_be_forced(isa):
    assert lingrad.get_isa() == isa
    assert lingrad.config()["isa"] == isa


def test_rate_probes_measure_every_isa(isa):
    """The FMA peak and the micro-kernel's rate in L1 (bench/sweep.py's header) run on every ISA and
    report a rate (how fast is the benchmark's business, not a test's)."""
    peak, tile = _C.measure_fma_peak(1, 0.02), _C.measure_tile_rate(1, 0.02)
    assert math.isfinite(peak) and peak > 0 and math.isfinite(tile) and tile > 0, (isa, peak, tile)


def test_import_leaves_ml_dtypes_until_bfloat16_is_used():
    """`import lingrad`, config() and float32 calls do not import ml_dtypes (half a second); the first
    bfloat16 array does, and config() says whether it can."""
    code = """
        import sys
        import numpy as np
        import lingrad
        from lingrad import kernels
        info = lingrad.config()
        kernels.linear_forward(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32))
        assert "ml_dtypes" not in sys.modules, "imported too early"
        try:
            import ml_dtypes
        except ImportError:
            assert not info["bf16_numpy"]
        else:
            assert info["bf16_numpy"]
            y = kernels.linear_forward(np.ones((2, 3), ml_dtypes.bfloat16), np.ones((4, 3), ml_dtypes.bfloat16))
            assert y.dtype == ml_dtypes.bfloat16 and (y.astype(np.float32) == 3).all()
        print("ok")
    """
    assert run_python(code, timeout=120).stdout.strip() == "ok"


# -- lingrad.settings: the ISA and the thread count for a block --------------------------------


def threads_in_force(n: int) -> int:
    """What get_num_threads() says after set_num_threads(n): a build without OpenMP
    (scripts/serial.sh) always computes with one thread."""
    return n if lingrad.config()["openmp"] else 1


def engine_threads() -> int:
    """The team the GEMM engine plans for a product large enough to be threaded (300^3)."""
    return _C._gemm_plan(300, 300, 300, 300, 1, 1, 300, "float32")["threads"]


def test_settings_are_in_force_inside_and_restored_after(num_threads):
    num_threads(2)
    before = lingrad.get_isa(), lingrad.get_num_threads()
    for isa in lingrad.available_isas():
        with lingrad.settings(isa=isa, threads=3):
            assert (lingrad.get_isa(), lingrad.get_num_threads()) == (isa, threads_in_force(3))
            info = lingrad.config()  # what the kernels run with: the ISA's register tile, the engine's team
            assert (info["isa"], info["num_threads"]) == (isa, threads_in_force(3))
            tile = info["tile_float32"]
            assert engine_threads() == threads_in_force(3)
        assert (lingrad.get_isa(), lingrad.get_num_threads()) == before
        lingrad.set_isa(isa)  # the same as the setters give
        assert lingrad.config()["tile_float32"] == tile
        lingrad.set_isa(before[0])
    assert engine_threads() == threads_in_force(2)


def test_settings_none_leaves_a_setting_as_it_is(isa, num_threads):
    num_threads(2)
    with lingrad.settings(threads=1):
        assert (lingrad.get_isa(), lingrad.get_num_threads()) == (isa, 1)
    with lingrad.settings(isa="generic"):
        assert (lingrad.get_isa(), lingrad.get_num_threads()) == ("generic", threads_in_force(2))
    with lingrad.settings():
        lingrad.set_isa("generic")  # changed inside by the setters: restored all the same
        lingrad.set_num_threads(3)
    assert (lingrad.get_isa(), lingrad.get_num_threads()) == (isa, threads_in_force(2))


def test_settings_restored_when_the_block_raises(num_threads):
    num_threads(2)
    before = lingrad.get_isa(), lingrad.get_num_threads()
    with pytest.raises(KeyError, match="inside"):
        with lingrad.settings(isa="generic", threads=1):
            raise KeyError("inside")
    assert (lingrad.get_isa(), lingrad.get_num_threads()) == before


def test_settings_nest(num_threads):
    num_threads(2)
    isas = lingrad.available_isas()
    outer_isa, inner_isa = isas[-1], isas[0]  # "generic" and the best one (the same on a plain CPU)
    before = lingrad.get_isa(), lingrad.get_num_threads()
    with lingrad.settings(isa=outer_isa, threads=1):
        with lingrad.settings(isa=inner_isa, threads=3):
            assert (lingrad.get_isa(), lingrad.get_num_threads()) == (inner_isa, threads_in_force(3))
            with lingrad.settings(threads=2):
                assert (lingrad.get_isa(), lingrad.get_num_threads()) == (inner_isa, threads_in_force(2))
            assert lingrad.get_num_threads() == threads_in_force(3)
        assert (lingrad.get_isa(), lingrad.get_num_threads()) == (outer_isa, 1)
    assert (lingrad.get_isa(), lingrad.get_num_threads()) == before


def raised(call, *args):
    try:
        call(*args)
    except Exception as e:
        return type(e), str(e)
    raise AssertionError(f"{call.__name__}{args} was accepted")


# (isa, threads) with one bad value: out of range or of the wrong type (the other one valid or None)
BAD_SETTINGS = [(None, 0), (None, 5000), (None, 2.0), (None, True), (None, "2")]
BAD_SETTINGS += [("sse9", None), ("", 2), (3, None), ("generic", -1)]


@pytest.mark.parametrize("isa, threads", BAD_SETTINGS, ids=[f"isa={i!r} threads={t!r}" for i, t in BAD_SETTINGS])
def test_settings_reject_what_the_setters_reject_and_change_nothing(num_threads, isa, threads):
    num_threads(2)
    before = lingrad.get_isa(), lingrad.get_num_threads()
    isa_ok = isa is None or isa in lingrad.available_isas()
    want = raised(lingrad.set_num_threads, threads) if isa_ok else raised(lingrad.set_isa, isa)
    assert (lingrad.get_isa(), lingrad.get_num_threads()) == before
    with pytest.raises(want[0]) as e:
        with lingrad.settings(isa=isa, threads=threads):
            raise AssertionError("the block ran")
    assert str(e.value) == want[1]
    assert (lingrad.get_isa(), lingrad.get_num_threads()) == before

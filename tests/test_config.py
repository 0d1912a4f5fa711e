import io

import lingrad

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

"""64-bit sizes: index arithmetic never overflows 32 bits, and shapes beyond 2^31 elements are
handled or rejected clearly. Nothing here allocates more than a few MB: large shapes are
zero-stride views, and large offsets are views into a big mapping that is reserved, not
allocated (MAP_NORESERVE). Each check runs in a child process, so a crash or a hang (the symptom
of an overflowed index) fails its test instead of the whole run."""

import mmap

import numpy as np
import pytest

import lingrad
from lingrad import kernels

from helpers import UNDER_ASAN, run_python

# ---------------------------------------------------------------------------------------------
# Offsets beyond 2^31 and 2^32 elements


def _mapping(size):
    """`size` bytes of address space: pages are allocated only when first written."""
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)  # the Linux value, for Python < 3.12
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve)


class FarViews:
    """Arrays whose elements lie far apart in one mapping of 2^38 bytes (256 GiB)."""

    def __init__(self):
        self.buffer = np.frombuffer(_mapping(1 << 38), dtype=np.uint8)
        self.next_base = 0
        self.rng = np.random.default_rng(64)

    def view(self, dtype, shape, strides, negative=False):
        """An array of `shape` with element `strides` (and negative ones if asked), filled with
        random values. Each array starts at its own base, 1 MiB apart."""
        itemsize = np.dtype(dtype).itemsize
        span = sum((n - 1) * s for n, s in zip(shape, strides)) * itemsize
        base = self.next_base + (span if negative else 0)
        self.next_base += 1 << 20
        sign = -1 if negative else 1
        a = np.lib.stride_tricks.as_strided(
            self.buffer[base:].view(dtype), shape=shape, strides=tuple(sign * s * itemsize for s in strides)
        )
        assert a.ctypes.data + (0 if negative else span) + itemsize <= self.buffer.ctypes.data + self.buffer.size
        a[...] = self.rng.standard_normal(shape)
        return a


def _check_far_offsets():
    """Run in a child: every kernel on views with offsets past 2^31 and 2^32 elements equals the
    same kernel on dense copies, bitwise."""
    try:
        far = FarViews()
    except (OSError, ValueError) as e:  # no overcommit (vm.overcommit_memory = 2), or no 64-bit mmap
        print(f"SKIP: cannot reserve 256 GiB of address space: {e}")
        return
    dense = np.ascontiguousarray
    for isa in lingrad.available_isas():
        lingrad.set_isa(isa)
        for dtype in (np.float32, np.float64):
            per_row = (1 << 32) + 3 if dtype == np.float32 else (1 << 31) + 5  # elements (> 2^32 or > 2^31)
            x = far.view(dtype, (7, 5), (per_row, 1))  # rows 2^32 elements apart
            w = far.view(dtype, (4, 5), (1, (1 << 31) + 1))  # columns 2^31 elements apart
            b = far.view(dtype, (4,), ((1 << 31) + 7,), negative=True)  # negative stride
            t = far.view(dtype, (7, 4), (per_row, 3), negative=True)
            dy = far.view(dtype, (7, 4), (2, (1 << 31) + 11))
            pairs = [
                (kernels.linear_forward(x, w, b), kernels.linear_forward(dense(x), w.copy(), b.copy())),
                (kernels.linear_backward_input(dy, w), kernels.linear_backward_input(dense(dy), w.copy())),
                *zip(kernels.linear_backward_weight(dy, x), kernels.linear_backward_weight(dense(dy), dense(x))),
                *zip(kernels.linear_mse(x, w, b, t), kernels.linear_mse(dense(x), w.copy(), b.copy(), dense(t))),
                (kernels.mse_loss(dy, t), kernels.mse_loss(dense(dy), dense(t))),
                (kernels.mse_loss(dy, t, "none"), kernels.mse_loss(dense(dy), dense(t), "none")),
                (kernels.mse_backward(dy, t), kernels.mse_backward(dense(dy), dense(t))),
            ]
            for i, (got, want) in enumerate(pairs):
                assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), f"{isa} {dtype.__name__}: result {i}"
                assert np.all(np.isfinite(got))
    print("far offsets: ok")


def test_offsets_beyond_32_bits():
    result = run_python("import test_sizes; test_sizes._check_far_offsets()", timeout=300)
    if result.stdout.startswith("SKIP: "):
        pytest.skip(result.stdout[6:].strip())
    assert "far offsets: ok" in result.stdout


# ---------------------------------------------------------------------------------------------
# Shapes beyond 2^31 elements

HUGE = 1 << 40


def zero_stride(shape, value=0.0, dtype=np.float64):
    return np.broadcast_to(np.array(value, dtype), shape)


def _check_huge_empty_shapes():
    """Run in a child: a dimension of 2^40 next to a dimension of 0 is either a quick, correct
    answer (the result is empty or exact) or a MemoryError naming the output that cannot exist."""
    z = zero_stride
    assert kernels.linear_forward(z((HUGE, 0)), z((0, 0))).shape == (HUGE, 0)
    assert kernels.linear_forward(z((0, HUGE)), z((3, HUGE)), z(3)).shape == (0, 3)
    assert kernels.linear_backward_input(z((HUGE, 0)), z((0, 0))).shape == (HUGE, 0)
    assert kernels.linear_backward_input(z((0, 5)), z((5, HUGE))).shape == (0, HUGE)
    dw, db = kernels.linear_backward_weight(z((HUGE, 0)), z((HUGE, 3)))
    assert dw.shape == (0, 3) and db.shape == (0,)
    dw, db = kernels.linear_backward_weight(z((0, 2)), z((0, 3)))
    assert np.all(dw == 0) and np.all(db == 0)
    for shape in [(HUGE, 0), (0, HUGE)]:
        assert kernels.mse_loss(z(shape), z(shape), "sum") == 0.0
        assert np.isnan(kernels.mse_loss(z(shape), z(shape), "mean"))
        assert kernels.mse_loss(z(shape), z(shape), "none").shape == shape
        assert kernels.mse_backward(z(shape), z(shape)).shape == shape
    loss, dx, dw, db = kernels.linear_mse(z((HUGE, 0)), z((0, 0)), z(0), z((HUGE, 0)), "sum")
    assert loss == 0.0 and dx.shape == (HUGE, 0) and dw.shape == (0, 0) and db.shape == (0,)

    # outputs that cannot be allocated: MemoryError, naming the output and its shape
    impossible = [
        ("out", lambda: kernels.linear_forward(z((HUGE, 0)), z((3, 0)))),
        ("out", lambda: kernels.linear_backward_input(z((HUGE, 0)), z((0, 3)))),
        ("out", lambda: kernels.linear_backward_weight(z((0, HUGE)), z((0, 5)))),
        ("out", lambda: kernels.mse_loss(z((HUGE, 4)), z((HUGE, 4)), "none")),
        ("grad_input", lambda: kernels.linear_mse(z((HUGE, 3)), z((1, 3)), None, z((HUGE, 1)))),
        ("grad_weight", lambda: kernels.linear_mse(z((0, 2)), z((HUGE, 2)), None, z((0, HUGE)))),
    ]
    for name, call in impossible:
        try:
            call()
        except MemoryError as e:
            assert name in str(e) and str(HUGE) in str(e), f"unclear MemoryError: {e}"
        else:
            raise AssertionError(f"a {name} of more than 2^40 elements was allocated")
    # and outputs larger than the address space: ValueError
    try:
        kernels.linear_backward_weight(z((0, HUGE)), z((0, HUGE)), bias=False)
    except ValueError as e:
        assert "out" in str(e) and str(HUGE) in str(e), f"unclear ValueError: {e}"
    else:
        raise AssertionError("an out of 2^80 elements was accepted")
    print("huge shapes: ok")


def test_huge_shapes_are_handled_or_rejected():
    result = run_python("import test_sizes; test_sizes._check_huge_empty_shapes()", timeout=120)
    assert "huge shapes: ok" in result.stdout


@pytest.mark.skipif(UNDER_ASAN, reason="ASan's operator new aborts on an impossible allocation")
def test_fused_step_buffer_that_cannot_exist_is_a_memory_error():
    """linear_mse needs a (batch, out) buffer for dY: if it cannot be allocated, MemoryError says so."""
    code = """
        import numpy as np
        from lingrad import kernels
        from test_sizes import zero_stride as z
        n = 1 << 29  # dY would need 2^58 doubles
        try:
            kernels.linear_mse(z((n, 0)), z((n, 0)), None, z((n, n)), input_grad=False)
        except MemoryError as e:
            assert "(batch, out_features)" in str(e) and str(n) in str(e), e
            print("ok")
    """
    assert run_python(code, timeout=120).stdout.strip() == "ok"


@pytest.mark.slow
@pytest.mark.skipif(UNDER_ASAN, reason="2^31 elements take too long under ASan")
def test_more_than_2_31_elements():
    """mse_loss over 46341^2 > 2^31 elements (zero-stride views): the count and the sum are exact."""
    code = """
        import numpy as np
        from lingrad import kernels
        from test_sizes import zero_stride
        n = 46341
        pred, target = zero_stride((n, n), 1.5), zero_stride((n, n), 0.5)
        assert pred.size > 2**31
        assert kernels.mse_loss(pred, target, "sum") == float(n * n)
        assert kernels.mse_loss(pred, target, "mean") == 1.0
        print("ok")
    """
    assert run_python(code, timeout=300).stdout.strip() == "ok"

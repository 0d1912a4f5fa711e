"""Memory: repeated calls do not grow the process, and a call adds no more to the peak than its
outputs plus a bounded scratch space. Measured in a fresh child process each time:
  * VmHWM (peak resident memory) from /proc/self/status, reset before the call by writing 5 to
    /proc/self/clear_refs, against VmRSS just before the call: every byte the call touched,
    C++ scratch included;
  * tracemalloc's peak, which sees NumPy's array allocations: a hidden copy of an input would
    show there.
Skipped under AddressSanitizer, whose quarantine keeps freed memory resident by design."""

import sys
import textwrap

import pytest

from cases import gemm_scratch_bound
from helpers import UNDER_ASAN, run_python

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self"),
    pytest.mark.skipif(UNDER_ASAN, reason="ASan's quarantine keeps freed memory resident"),
]

MiB = 1 << 20


# The float32 tests' scratch: the GEMM's, plus the allocator's and the thread stacks' slack (the mse
# kernels need at most 512 KiB).
SCRATCH = gemm_scratch_bound(4) + 2 * MiB

PRELUDE = """
import re, tracemalloc
import numpy as np
import lingrad
from lingrad import kernels

def status(field):
    text = open("/proc/self/status").read()
    return int(re.search(rf"^{field}:\\s+(\\d+) kB", text, re.M).group(1)) * 1024

def measure(call):
    '''(result, bytes the peak resident memory rose by, peak bytes of traced allocations)'''
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
    except OSError as e:
        print("SKIP: cannot reset the peak resident memory:", e)
        raise SystemExit(0)
    before = status("VmRSS")
    tracemalloc.start()
    result = call()
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, status("VmHWM") - before, traced_peak

def nbytes(result):
    items = result if isinstance(result, tuple) else (result,)
    return sum(a.nbytes for a in items if isinstance(a, np.ndarray))
"""


def run_measurement(body: str) -> str:
    result = run_python(PRELUDE + textwrap.dedent(body), timeout=300)
    if "SKIP:" in result.stdout:
        pytest.skip(result.stdout.split("SKIP:", 1)[1].strip())
    return result.stdout


def test_peak_memory_of_the_weight_gradient():
    """dW of a (60000, 784) batch: the peak grows by its output (and the bounded scratch), never
    by a (batch, out, in) temporary (1.9 GB here) or a copy of X (188 MB): C and Fortran order."""
    out = run_measurement(f"""
        rng = np.random.default_rng(0)
        x = rng.random((60000, 784), dtype=np.float32)
        dy = rng.random((60000, 10), dtype=np.float32)
        for layout in ("C", "F"):
            if layout == "F":
                x = np.asfortranarray(x)
            kernels.linear_backward_weight(dy[:300], x[:300])  # threads and their stacks exist before
            (dw, db), rss, traced = measure(lambda: kernels.linear_backward_weight(dy, x))
            print(layout, rss, traced, nbytes((dw, db)))
            assert rss <= nbytes((dw, db)) + {SCRATCH}, f"{{layout}}: peak rose by {{rss}} bytes"
            assert traced <= nbytes((dw, db)) + 65536, f"{{layout}}: NumPy allocated {{traced}} bytes"
            np.testing.assert_allclose(dw[:2, :50], dy[:, :2].T.astype(np.float64) @ x[:, :50], rtol=1e-4)
        print("ok")
    """)
    assert out.rstrip().endswith("ok")


def test_peak_memory_of_a_float64_product_with_a_large_packed_b():
    """dX (600, 4080) = dY (600, 2048) W (2048, 4080) in float64: B is packed in slabs of K slices,
    each 256 x 4080 doubles (8 MiB); the slab must stay within the engine's stated bound."""
    scratch = gemm_scratch_bound(8) + 2 * MiB
    out = run_measurement(f"""
        rng = np.random.default_rng(0)
        dy = rng.random((600, 2048))
        w = rng.random((2048, 4080))
        kernels.linear_backward_input(dy[:300], w)
        dx, rss, traced = measure(lambda: kernels.linear_backward_input(dy, w))
        print(rss, traced, dx.nbytes)
        assert rss <= dx.nbytes + {scratch}, f"peak rose by {{rss}} bytes, more than {{dx.nbytes}} + {scratch}"
        assert traced <= dx.nbytes + 65536, f"NumPy allocated {{traced}} bytes"
        np.testing.assert_allclose(dx[:3, :5], dy[:3] @ w[:, :5], rtol=1e-12)
        print("ok")
    """)
    assert out.rstrip().endswith("ok")


def test_peak_memory_of_the_fused_step():
    """linear_mse on a (60000, 784) batch adds its outputs and one (batch, out) buffer for dY."""
    out = run_measurement(f"""
        rng = np.random.default_rng(0)
        x = rng.random((60000, 784), dtype=np.float32)
        w = rng.random((10, 784), dtype=np.float32)
        b = rng.random(10, dtype=np.float32)
        t = rng.random((60000, 10), dtype=np.float32)
        dy_bytes = t.nbytes
        for input_grad in (False, True):
            kernels.linear_mse(x[:300], w, b, t[:300], input_grad=input_grad)
            result, rss, traced = measure(lambda: kernels.linear_mse(x, w, b, t, input_grad=input_grad))
            print(input_grad, rss, traced, nbytes(result))
            assert rss <= nbytes(result) + dy_bytes + {SCRATCH}, f"input_grad={{input_grad}}: peak rose by {{rss}}"
            assert traced <= nbytes(result) + 65536, f"input_grad={{input_grad}}: NumPy allocated {{traced}} bytes"
            del result
        print("ok")
    """)
    assert out.rstrip().endswith("ok")


def test_peak_memory_of_the_loss_does_not_grow_with_rows():
    """mse_loss of 2^25 rows (zero-stride views) needs no per-row scratch (it once took 256 MiB)."""
    out = run_measurement(f"""
        pred = np.broadcast_to(np.float32(1.5), (1 << 25, 1))
        target = np.broadcast_to(np.float32(0.5), (1 << 25, 1))
        kernels.mse_loss(pred[:1000], target[:1000])
        for reduction in ("mean", "sum"):
            loss, rss, _ = measure(lambda: kernels.mse_loss(pred, target, reduction))
            assert loss == (1.0 if reduction == "mean" else 2.0 ** 25)
            assert rss <= 2 * {MiB}, f"peak rose by {{rss}} bytes"
        print("ok")
    """)
    assert out.rstrip().endswith("ok")


def test_many_calls_do_not_grow_memory():
    """33,000 calls of every kernel (good and failing, new outputs and `out` arrays, 1 to 3 threads):
    resident memory and NumPy's live allocations stay flat after a warm-up."""
    out = run_measurement("""
        rng = np.random.default_rng(1)
        f32 = np.float32
        x, w, b = rng.random((33, 20), f32), rng.random((7, 20), f32), rng.random(7, f32)
        t, dy = rng.random((33, 7), f32), rng.random((33, 7), f32)
        y = np.empty((33, 7), f32)
        bad = np.empty((33, 7), np.float64)

        def calls(i):
            lingrad.set_num_threads(1 + i % 3)
            kernels.linear_forward(x, w, b)
            kernels.linear_forward(x[::-1], w.T.copy().T, b, out=y)
            kernels.linear_backward_input(dy, w)
            kernels.linear_backward_weight(dy, x)
            kernels.mse_loss(y, t)
            kernels.mse_backward(y, t)
            kernels.linear_mse(x, w, b, t)
            kernels.linear_mse(x, w, None, t, "sum", input_grad=False)
            for call in (lambda: kernels.linear_forward(x, w, out=bad), lambda: kernels.mse_loss(t, x),
                         lambda: kernels.linear_mse(x.astype(np.float64), w, b, t)):
                try:
                    call()
                except (TypeError, ValueError):
                    pass

        for i in range(500):  # warm-up: thread pools, caches, interned strings
            calls(i)
        tracemalloc.start()
        rss = [status("VmRSS")]
        traced = [tracemalloc.get_traced_memory()[0]]
        for chunk in range(3):
            for i in range(1000):
                calls(i)
            rss.append(status("VmRSS"))
            traced.append(tracemalloc.get_traced_memory()[0])
        print("rss", rss, "traced", traced)
        assert rss[-1] - rss[0] <= 1 << 20, f"resident memory grew by {rss[-1] - rss[0]} bytes in 33,000 calls"
        growth = traced[-1] - traced[0]
        assert growth <= 1 << 16, f"live NumPy/Python allocations grew by {growth} bytes"
        print("ok")
    """)
    assert out.rstrip().endswith("ok")

"""pytest-benchmark suite: lingrad against PyTorch's CPU path and NumPy, grouped by case and shape.

    pytest bench/ --benchmark-only                          # everything
    pytest bench/ --benchmark-only -k "numpy and 512"       # a selection
    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group holds lingrad and its baseline at one shape; compare their medians. For ratios measured
interleaved in one process (and GFLOP/s against the measured peak), use bench/sweep.py.
"""

import numpy as np
import pytest

import lingrad.benchmark  # (by its full name: `benchmark` is pytest-benchmark's fixture)

SHAPES = lingrad.benchmark.SWEEP + lingrad.benchmark.ODD


def shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("case", ["forward", "grad input", "grad weight"])
@pytest.mark.parametrize("contestant", ["lingrad", "numpy"])
def test_numpy_kernels(benchmark, shape, case, contestant):
    benchmark.group = f"numpy {case} {shape_id(shape)}"
    benchmark(benchmark_cases("numpy", shape)[case][contestant])


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("case", ["forward no-grad", "step fused", "step drop-in", "mlp mixed"])
@pytest.mark.parametrize("contestant", ["lingrad", "torch"])
def test_training_step(benchmark, shape, case, contestant):
    pytest.importorskip("torch")
    benchmark.group = f"torch {case} {shape_id(shape)}"
    benchmark(benchmark_cases("torch", shape)[case][contestant])


_cache = {}


def benchmark_cases(kind, shape, dtype=np.float32):
    """The same callables bench/sweep.py times (lingrad.benchmark), built once per shape."""
    key = (kind, shape, dtype)
    if key not in _cache:
        _cache.clear()  # keep one shape's arrays alive at a time
        make = lingrad.benchmark.numpy_cases if kind == "numpy" else lingrad.benchmark.torch_cases
        _cache[key] = make(shape, dtype)
    return _cache[key]

"""Bitwise identical results for any number of threads, run to run, on every SIMD path."""

import numpy as np
import pytest

import lingrad
from lingrad import kernels
from lingrad import reference as ref

from cases import shape_id
from helpers import assert_same_bytes_for_any_thread_count


def all_results(rng, dtype, batch, n_in, n_out):
    x, w, b, t, dy = ref.arrays((batch, n_in, n_out), dtype, rng)

    def run():
        loss, dx, dw, db = kernels.linear_mse(x, w, b, t)
        return [
            kernels.linear_forward(x, w, b),
            kernels.linear_backward_input(dy, w),
            *kernels.linear_backward_weight(dy, x),
            np.array(kernels.mse_loss(dy, t)),
            kernels.mse_backward(dy, t),
            np.array(loss),
            dx,
            dw,
            db,
        ]

    return run


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 1),
        (300, 257, 70),
        (2000, 100, 3),
        pytest.param((37, 3000, 500), marks=pytest.mark.slow),
        (9000, 20, 1),
        (3000, 800, 3),
        (300, 300, 300),
    ],
    ids=shape_id,
)
def test_same_bytes_for_any_thread_count(isa, num_threads, dtype, shape):
    assert_same_bytes_for_any_thread_count(all_results(np.random.default_rng(7), dtype, *shape), num_threads)


def test_thread_setting_round_trips(num_threads):
    num_threads(3)
    # a build without OpenMP (scripts/serial.sh) always computes with one thread
    assert lingrad.get_num_threads() == (3 if lingrad.config()["openmp"] else 1)
    num_threads(1)
    assert lingrad.get_num_threads() == 1


RUN_TO_RUN_SHAPES = [(1, 3, 1), (300, 257, 70), (37, 3000, 50)]


def results_digest(isa, threads):
    """SHA-256 of every kernel's results on RUN_TO_RUN_SHAPES, both dtypes."""
    import hashlib

    digest = hashlib.sha256()
    with lingrad.settings(isa=isa, threads=threads):
        for dtype in (np.float32, np.float64):
            for shape in RUN_TO_RUN_SHAPES:
                for result in all_results(np.random.default_rng(7), dtype, *shape)():
                    digest.update(result.tobytes())
    return digest.hexdigest()


def test_same_bytes_run_to_run(isa, num_threads):
    """Fresh processes (other addresses, another thread count) compute the same bytes as this one."""
    from helpers import run_python

    here = results_digest(isa, 2)
    for threads in (1, 3):
        child = run_python(f"import test_determinism as t; print(t.results_digest({isa!r}, {threads}))", timeout=300)
        assert child.stdout.strip() == here, f"a fresh process with {threads} threads computed other bytes"

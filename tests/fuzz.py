"""Property-based fuzzing of lingrad.kernels with hypothesis, one campaign per process.

    python tests/fuzz.py CAMPAIGN [--examples N] [--seed S] [--max-work W] [--trace FILE]

Campaigns:
  linear   linear_forward, linear_backward_input, linear_backward_weight on valid arguments
  mse      mse_loss, mse_backward on valid arguments
  fused    linear_mse on valid arguments
  errors   every function with exactly one bad argument

A valid call draws the shapes (0, 1, primes, the edges of the register tiles and cache blocks,
large odd sizes), the dtype, the memory layout of every argument (C or Fortran order, the latter
being what a transposed C array is; sliced, negative steps, broadcast with zero strides,
read-only, odd strides on length-1 dimensions; inputs that are the same array), an `out` array or
none, the ISA and the number of threads. Gaps of sliced buffers and fresh `out` arrays hold NaN,
so a stray read or a missed write shows. The result must
  * agree with the float64 reference (lingrad.reference) within its rigorous error bound,
  * be bitwise identical to the same call on C-contiguous copies with one thread,
  * leave every input unchanged, and fill and return `out` when one is given.
A bad call must raise exactly the expected TypeError or ValueError, with a message naming the bad
argument, and leave every `out` untouched. Anything else fails the campaign, a crash included:
tests/test_fuzz.py runs each campaign in a child process, and --trace names a file that always
holds the example being run, so the input that crashed the process is known.

Without --seed the campaign is derandomized (the same examples every run); with --seed S it
explores other examples, for long runs by hand (e.g. --examples 20000 --seed 1).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import lingrad
from lingrad import kernels
from lingrad import reference as ref

DTYPES = [np.float32, np.float64]
ISAS = lingrad.available_isas()

# Sizes: zero, one, primes and small numbers; the edges of the register tiles (MR = 6,
# NR = 4..32) and of the cache blocks (MC = 72..168, KC = 256); large odd sizes beyond NC = 4080/4096.
SMALL = [0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 15, 16, 17, 23, 31, 32, 33, 47, 64]
EDGES = [71, 72, 73, 95, 96, 97, 143, 144, 145, 167, 168, 169, 255, 256, 257, 263]
LARGE = [509, 512, 1021, 4079, 4080, 4081, 4095, 4096, 4097, 4099, 8191]

LAYOUTS_2D = [
    "c",
    "c",
    "fortran",
    "sliced",
    "negative",
    "negative_sliced",
    "broadcast_rows",
    "broadcast_cols",
    "broadcast_all",
    "readonly",
    "odd_length1",
]
LAYOUTS_1D = ["c", "c", "strided", "negative", "broadcast", "readonly", "odd_length1"]

examples_run = 0
trace_fd: int | None = None
max_work = 3_000_000


def trace(text: str) -> None:
    """Keeps the example being run in the trace file, for the parent to show after a crash."""
    global examples_run
    examples_run += 1
    if trace_fd is not None:
        data = f"example {examples_run}: {text}\n".encode()
        os.ftruncate(trace_fd, 0)
        os.pwrite(trace_fd, data, 0)


# ---------------------------------------------------------------------------------------------
# Shapes, values and layouts


@st.composite
def sizes(draw, count: int):
    """`count` dimensions; at most one large, and the product bounded by max_work."""
    large = draw(st.sampled_from([None] * count + list(range(count))))
    dims = []
    for i in range(count):
        if i == large:
            dims.append(draw(st.sampled_from(LARGE + EDGES)))
        else:
            dims.append(draw(st.one_of(st.sampled_from(SMALL + EDGES), st.integers(0, 80))))
    while np.prod(dims, dtype=np.int64) > max_work:
        i = int(np.argmax(dims))
        dims[i] = max(1, max_work // max(1, int(np.prod(dims[:i] + dims[i + 1 :], dtype=np.int64))))
    return dims


def values(rng, shape, kind: str, dtype):
    if kind == "zeros":
        return np.zeros(shape, dtype)
    if kind == "integers":  # exact in any summation order at these sizes
        return rng.integers(-3, 4, shape).astype(dtype)
    scale = 2.0 ** rng.integers(-8, 9)
    return (rng.standard_normal(shape) * scale).astype(dtype)


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype)


def lay_out_2d(rng, dense, layout: str):
    """A view with dense's values (or, for broadcast layouts, values repeated from it)."""
    r, c = dense.shape
    dtype = dense.dtype
    if layout == "fortran":
        return np.asfortranarray(dense)
    if layout in ("sliced", "negative", "negative_sliced"):
        sr, sc = (1, 1) if layout == "negative" else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        o = int(rng.integers(0, 3))
        big = poisoned((r * sr + o, c * sc + o), dtype)
        view = big[o::sr, o::sc][:r, :c] if layout == "sliced" else big[::-sr, ::-sc][:r, :c]
        view[...] = dense
        return view
    if layout == "broadcast_rows" and r > 0:
        return np.broadcast_to(dense[0], (r, c))
    if layout == "broadcast_cols" and c > 0:
        return np.broadcast_to(dense[:, :1], (r, c))
    if layout == "broadcast_all" and dense.size > 0:
        return np.broadcast_to(dense[0, 0], (r, c))
    if layout == "readonly":
        dense.flags.writeable = False
        return dense
    if layout == "odd_length1" and (r == 1 or c == 1):
        odd = 3 if dtype == np.float32 else 5  # bytes: not a multiple of the element size
        strides = (odd if r == 1 else dense.strides[0], odd if c == 1 else dense.strides[1])
        return np.lib.stride_tricks.as_strided(dense, shape=(r, c), strides=strides)
    return dense


def lay_out_1d(rng, dense, layout: str):
    (n,) = dense.shape
    if layout in ("strided", "negative"):
        step = int(rng.integers(2, 4)) * (1 if layout == "strided" else -1)
        big = poisoned(n * abs(step) + 1, dense.dtype)
        view = big[1::step][:n] if step > 0 else big[::step][:n]
        view[...] = dense
        return view
    if layout == "broadcast" and n > 0:
        return np.broadcast_to(dense[0], (n,))
    if layout == "readonly":
        dense.flags.writeable = False
        return dense
    if layout == "odd_length1" and n == 1:
        return np.lib.stride_tricks.as_strided(dense, shape=(1,), strides=(3,))
    return dense


def draw_array(data, rng, shape, dtype, label):
    kind = data.draw(st.sampled_from(["normal", "normal", "normal", "integers", "zeros"]), label=f"{label} values")
    dense = values(rng, shape, kind, dtype)
    if len(shape) == 1:
        return lay_out_1d(rng, dense, data.draw(st.sampled_from(LAYOUTS_1D), label=f"{label} layout"))
    return lay_out_2d(rng, dense, data.draw(st.sampled_from(LAYOUTS_2D), label=f"{label} layout"))


def draw_out(data, rng, shape, dtype, label):
    """None, a fresh array full of NaN, or a C-contiguous window of a larger NaN buffer."""
    choice = data.draw(st.sampled_from(["none", "fresh", "window"]), label=f"{label} kind")
    if choice == "none":
        return None
    if choice == "fresh":
        return poisoned(shape, dtype)
    size = int(np.prod(shape))
    start = int(rng.integers(0, 4))
    return poisoned(size + 6, dtype)[start : start + size].reshape(shape)


def alias_inputs(data, arrays: dict) -> dict:
    """Sometimes pass one array for two inputs of the same shape and dtype (read-only overlap)."""
    if not data.draw(st.booleans(), label="alias same-shape inputs"):
        return arrays
    names = [n for n, a in arrays.items() if isinstance(a, np.ndarray)]
    for i, later in enumerate(names):
        for earlier in names[:i]:
            if arrays[later].shape == arrays[earlier].shape and arrays[later].dtype == arrays[earlier].dtype:
                arrays[later] = arrays[earlier]
                break
    return arrays


def describe(arrays: dict) -> str:
    parts = []
    for name, a in arrays.items():
        if isinstance(a, np.ndarray):
            parts.append(
                f"{name}={a.dtype.str}{a.shape} strides={a.strides} writeable={a.flags.writeable} "
                f"addr%64={a.ctypes.data % 64}"
            )
        else:
            parts.append(f"{name}={a!r}"[:80])
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Valid calls


def check_valid_call(data, function: str, arrays: dict, options: dict, outs: dict, compare):
    """Calls function(**arrays, **options, **outs) and checks it as the module docstring says.
    compare(result, arrays) checks the result against the reference."""
    isa = data.draw(st.sampled_from(ISAS), label="isa")
    threads = data.draw(st.sampled_from([1, 2, 3]), label="threads")
    fn = getattr(kernels, function)
    snapshots = {n: np.array(a, copy=True) for n, a in arrays.items() if isinstance(a, np.ndarray)}
    given_outs = {n: o for n, o in outs.items() if o is not None}
    trace(f"{function}({describe({**arrays, **given_outs})}, {options}) isa={isa} threads={threads}")

    with lingrad.settings(isa=isa, threads=threads):
        result = fn(**arrays, **options, **given_outs)
    with lingrad.settings(isa=isa, threads=1):
        dense = {n: (np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a) for n, a in arrays.items()}
        dense_result = fn(**dense, **options)

    for name, before in snapshots.items():
        np.testing.assert_array_equal(arrays[name], before, err_msg=f"{function} changed its input {name}")
    flat = result if isinstance(result, tuple) else (result,)
    flat_dense = dense_result if isinstance(dense_result, tuple) else (dense_result,)
    for i, (got, want) in enumerate(zip(flat, flat_dense)):
        if got is None or want is None:
            assert got is None and want is None, f"{function}: result {i} is None only in one call"
            continue
        got_bytes, want_bytes = np.asarray(got).tobytes(), np.asarray(want).tobytes()
        assert got_bytes == want_bytes, (
            f"{function}: result {i} differs bitwise from the call on C-contiguous copies with 1 thread"
        )
    for name, out in given_outs.items():
        position = {"out": 0, "bias_out": 1}[name]
        assert flat[position] is out, f"{function} did not return the {name} array it was given"
    compare(result, arrays)


@st.composite
def dtype_and_rng(draw):
    return draw(st.sampled_from(DTYPES)), np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def campaign_linear(data):
    dtype, rng = data.draw(dtype_and_rng())
    batch, n_in, n_out = data.draw(sizes(3), label="(batch, in, out)")
    function = data.draw(st.sampled_from(["linear_forward", "linear_backward_input", "linear_backward_weight"]))
    if function == "linear_forward":
        arrays = {
            "x": draw_array(data, rng, (batch, n_in), dtype, "x"),
            "weight": draw_array(data, rng, (n_out, n_in), dtype, "weight"),
        }
        if data.draw(st.booleans(), label="bias"):
            arrays["bias"] = draw_array(data, rng, (n_out,), dtype, "bias")
        arrays = alias_inputs(data, arrays)
        outs = {"out": draw_out(data, rng, (batch, n_out), dtype, "out")}

        def compare(y, a):
            ref.assert_within(y, *ref.linear_forward(a["x"], a["weight"], a.get("bias")), "y")

        check_valid_call(data, function, arrays, {}, outs, compare)
    elif function == "linear_backward_input":
        arrays = alias_inputs(
            data,
            {
                "grad_out": draw_array(data, rng, (batch, n_out), dtype, "grad_out"),
                "weight": draw_array(data, rng, (n_out, n_in), dtype, "weight"),
            },
        )
        outs = {"out": draw_out(data, rng, (batch, n_in), dtype, "out")}

        def compare(dx, a):
            ref.assert_within(dx, *ref.linear_backward_input(a["grad_out"], a["weight"]), "dx")

        check_valid_call(data, function, arrays, {}, outs, compare)
    else:
        arrays = alias_inputs(
            data,
            {
                "grad_out": draw_array(data, rng, (batch, n_out), dtype, "grad_out"),
                "x": draw_array(data, rng, (batch, n_in), dtype, "x"),
            },
        )
        bias = data.draw(st.booleans(), label="bias")
        outs = {
            "out": draw_out(data, rng, (n_out, n_in), dtype, "out"),
            "bias_out": draw_out(data, rng, (n_out,), dtype, "bias_out") if bias else None,
        }

        def compare(result, a):
            dw, db = result
            want_dw, dw_bound, want_db, db_bound = ref.linear_backward_weight(a["grad_out"], a["x"])
            ref.assert_within(dw, want_dw, dw_bound, "dw")
            if bias:
                ref.assert_within(db, want_db, db_bound, "db")
            else:
                assert db is None

        check_valid_call(data, function, arrays, {"bias": bias}, outs, compare)


def campaign_mse(data):
    dtype, rng = data.draw(dtype_and_rng())
    rows, cols = data.draw(sizes(2), label="(rows, cols)")
    shape = (rows * cols,) if data.draw(st.booleans(), label="1-D") and rows < 8 else (rows, cols)
    arrays = alias_inputs(
        data,
        {"pred": draw_array(data, rng, shape, dtype, "pred"), "target": draw_array(data, rng, shape, dtype, "target")},
    )
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    if data.draw(st.booleans(), label="mse_loss"):

        def compare(loss, a):
            want, bound, _, _ = ref.mse(a["pred"], a["target"], reduction)
            if reduction == "none":
                assert loss.shape == shape and loss.dtype == dtype
            else:
                assert isinstance(loss, float)
            ref.assert_within(loss, want, bound, "loss")

        check_valid_call(data, "mse_loss", arrays, {"reduction": reduction}, {}, compare)
    else:
        outs = {"out": draw_out(data, rng, shape, dtype, "out")}

        def compare(grad, a):
            _, _, want, bound = ref.mse(a["pred"], a["target"], reduction)
            ref.assert_within(grad, want, bound, "grad")

        check_valid_call(data, "mse_backward", arrays, {"reduction": reduction}, outs, compare)


def campaign_fused(data):
    dtype, rng = data.draw(dtype_and_rng())
    batch, n_in, n_out = data.draw(sizes(3), label="(batch, in, out)")
    arrays = {
        "x": draw_array(data, rng, (batch, n_in), dtype, "x"),
        "weight": draw_array(data, rng, (n_out, n_in), dtype, "weight"),
        "bias": draw_array(data, rng, (n_out,), dtype, "bias") if data.draw(st.booleans(), label="bias") else None,
        "target": draw_array(data, rng, (batch, n_out), dtype, "target"),
    }
    arrays = alias_inputs(data, arrays)
    options = {
        "reduction": data.draw(st.sampled_from(["mean", "sum"]), label="reduction"),
        "input_grad": data.draw(st.booleans(), label="input_grad"),
    }

    def compare(result, a):
        loss, dx, dw, db = result
        want_loss, want_dx, want_dw, want_db = ref.linear_mse(
            a["x"], a["weight"], a["bias"], a["target"], options["reduction"]
        )
        assert isinstance(loss, float)
        ref.assert_within(loss, *want_loss, "loss")
        if options["input_grad"]:
            ref.assert_within(dx, *want_dx, "dx")
        else:
            assert dx is None
        ref.assert_within(dw, *want_dw, "dw")
        if a["bias"] is None:
            assert db is None
        else:
            ref.assert_within(db, *want_db, "db")

    check_valid_call(data, "linear_mse", arrays, options, {}, compare)


# ---------------------------------------------------------------------------------------------
# Calls with one bad argument

# Each function's array arguments with their dimensions (B batch, I in, O out), the optional
# ones, its `out` arguments and its reductions.
SIGNATURES = {
    "linear_forward": dict(
        inputs={"x": "BI", "weight": "OI", "bias": "O"}, optional={"bias"}, outs={"out": "BO"}, reductions=None
    ),
    "linear_backward_input": dict(
        inputs={"grad_out": "BO", "weight": "OI"}, optional=set(), outs={"out": "BI"}, reductions=None
    ),
    "linear_backward_weight": dict(
        inputs={"grad_out": "BO", "x": "BI"}, optional=set(), outs={"out": "OI", "bias_out": "O"}, reductions=None
    ),
    "mse_loss": dict(
        inputs={"pred": "BO", "target": "BO"}, optional=set(), outs={}, reductions=["mean", "sum", "none"]
    ),
    "mse_backward": dict(
        inputs={"pred": "BO", "target": "BO"}, optional=set(), outs={"out": "BO"}, reductions=["mean", "sum", "none"]
    ),
    "linear_mse": dict(
        inputs={"x": "BI", "weight": "OI", "bias": "O", "target": "BO"},
        optional={"bias"},
        outs={},
        reductions=["mean", "sum"],
    ),
}
BAD_DTYPES = [np.int32, np.int64, np.uint8, np.float16, np.complex64, np.complex128, np.bool_, object, np.longdouble]


def names(message: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message) is not None


def misaligned(a):
    raw = np.zeros(a.nbytes + a.itemsize, np.uint8)[1 : 1 + a.nbytes]
    view = raw.view(a.dtype).reshape(a.shape)
    view[...] = a
    return view


def overlapping_out(rng, source, shape, dtype):
    """An `out` of `shape` that shares memory with a C-contiguous copy of `source`."""
    size = int(np.prod(shape))
    buffer = np.zeros(source.size + size, dtype)
    start = int(rng.integers(0, source.size))
    copy = buffer[: source.size].reshape(source.shape)
    copy[...] = source
    return copy, buffer[start : start + size].reshape(shape)


def draw_valid_arguments(data, rng, function: str, dtype):
    """A valid call of `function`: its dimensions (B, I, O from 0 to 7), input arrays (an optional
    one sometimes None), options (reduction, bias) and `out` arrays (each passed or not, full of 7)."""
    sig = SIGNATURES[function]
    dims = dict(zip("BIO", data.draw(st.lists(st.integers(0, 7), min_size=3, max_size=3), label="(B, I, O)")))
    shape_of = {n: tuple(dims[d] for d in spec) for n, spec in {**sig["inputs"], **sig["outs"]}.items()}
    arrays = {n: draw_array(data, rng, shape_of[n], dtype, n) for n in sig["inputs"]}
    for n in sig["optional"]:
        if data.draw(st.booleans(), label=f"{n} is None"):
            arrays[n] = None
    options = {}
    if sig["reductions"]:
        options["reduction"] = data.draw(st.sampled_from(sig["reductions"]), label="reduction")
    if function == "linear_backward_weight":
        options["bias"] = data.draw(st.booleans(), label="bias")
    outs = {}
    for n in sig["outs"]:
        if n == "bias_out" and not options["bias"]:
            continue
        if data.draw(st.booleans(), label=f"pass {n}"):
            outs[n] = np.full(shape_of[n], 7.0, dtype)
    return dims, arrays, options, outs


# The faults of each kind of argument, as (argument, description, exception, builder): build() gives
# the bad value, or the builder is ("overlap", input) for an `out` overlapping that input.


def input_faults(function: str, n: str, a, present: list[str]) -> list:
    """Faults of the input array `n` (given as `a`; `present`: the inputs that are not None)."""
    sig = SIGNATURES[function]
    faults = [
        (n, "a list", TypeError, lambda a=a: a.tolist()),
        (n, "a float", TypeError, lambda: 1.0),
        (n, "a string", TypeError, lambda: "x"),
        (n, "a masked array", TypeError, lambda a=a: np.ma.masked_array(a)),
        (n, "non-native byte order", TypeError, lambda a=a: a.astype(a.dtype.newbyteorder())),
        (
            n,
            "the other float dtype",
            TypeError,
            lambda a=a: a.astype(np.float64 if a.dtype == np.float32 else np.float32),
        ),
        (n, "a 0-D array", ValueError, lambda a=a: np.array(1.0, a.dtype)),
        (n, "a 3-D array", ValueError, lambda a=a: a.reshape((1,) * (3 - a.ndim) + a.shape)),
    ]
    faults += [(n, f"dtype {np.dtype(d).name}", TypeError, lambda a=a, d=d: a.astype(d)) for d in BAD_DTYPES]
    if n not in sig["optional"]:
        faults.append((n, "None", TypeError, lambda: None))
    if a.size > 0:
        faults.append((n, "misaligned", ValueError, lambda a=a: misaligned(a)))
    if a.ndim == 2 and function not in ("mse_loss", "mse_backward"):
        faults.append((n, "a 1-D array", ValueError, lambda a=a: a.ravel()))
    if a.ndim == 1:
        faults.append((n, "a 2-D array", ValueError, lambda a=a: a[None]))
    # a dimension that another argument must match
    for axis, d in enumerate(sig["inputs"][n]):
        if any(d in sig["inputs"][m] for m in present if m != n):
            faults.append(
                (
                    n,
                    f"dimension {d} + 1",
                    ValueError,
                    lambda a=a, axis=axis: np.zeros(
                        a.shape[:axis] + (a.shape[axis] + 1,) + a.shape[axis + 1 :], a.dtype
                    ),
                )
            )
    return faults


def out_faults(n: str, o, dtype, arrays: dict, present: list[str]) -> list:
    """Faults of the `out` array `n` (given as `o`), overlaps with the `present` inputs included."""
    shape = o.shape
    faults = [
        (n, "a list", TypeError, lambda o=o: o.tolist()),
        (n, "a masked array", TypeError, lambda o=o: np.ma.masked_array(o)),
        (
            n,
            "the other float dtype",
            ValueError,
            lambda o=o: o.astype(np.float64 if o.dtype == np.float32 else np.float32),
        ),
        (n, "int64", ValueError, lambda o=o: o.astype(np.int64)),
        (n, "non-native byte order", ValueError, lambda o=o: o.astype(o.dtype.newbyteorder())),
        (n, "a wrong shape", ValueError, lambda shape=shape: np.zeros(shape[:-1] + (shape[-1] + 1,), dtype)),
        (n, "a wrong rank", ValueError, lambda o=o: o[None]),
    ]
    ro = np.zeros(shape, dtype)
    ro.flags.writeable = False
    faults.append((n, "read-only", ValueError, lambda ro=ro: ro))
    if o.size > 0:
        faults.append((n, "misaligned", ValueError, lambda o=o: misaligned(o)))
    if len(shape) == 2 and shape[0] > 1 and shape[1] > 1:
        faults.append((n, "Fortran order", ValueError, lambda o=o: np.asfortranarray(o)))
    if shape[0] > 1 and o.size > 1:
        faults.append((n, "strided", ValueError, lambda shape=shape: np.zeros((2 * shape[0],) + shape[1:], dtype)[::2]))
    if o.size > 1:
        faults.append(
            (n, "a broadcast view", ValueError, lambda shape=shape: np.broadcast_to(np.zeros(1, dtype), shape))
        )
        for m in present:
            if arrays[m].size > 0:
                faults.append((n, f"overlapping {m}", ValueError, ("overlap", m)))
    return faults


def switch_faults(function: str, dtype) -> list:
    """Faults of the switch (bias, input_grad) a function has: something other than True, False or None."""
    flag = {"linear_backward_weight": "bias", "linear_mse": "input_grad"}.get(function)
    if not flag:
        return []
    return [
        (flag, repr(bad), TypeError, lambda bad=bad: bad)
        for bad in [np.ones(2, dtype), np.zeros(1, dtype), "yes", 1, 0.0]
    ]


def unwanted_bias_out_faults(function: str, options: dict, dims: dict, dtype) -> list:
    """linear_backward_weight's bias_out given with bias=False."""
    if function == "linear_backward_weight" and not options["bias"]:
        return [("bias_out", "given with bias=False", ValueError, lambda: np.zeros(dims["O"], dtype))]
    return []


def reduction_faults(function: str) -> list:
    """Faults of `reduction`: an unknown name (or "none" where it is not allowed), or not a str."""
    reductions = SIGNATURES[function]["reductions"]
    if not reductions:
        return []
    faults = []
    for bad in ["avg", "MEAN", "", "mean "] + ([] if "none" in reductions else ["none"]):
        faults.append(("reduction", repr(bad), ValueError, lambda bad=bad: bad))
    for bad in [1, None, b"mean", ["mean"]]:
        faults.append(("reduction", repr(bad), TypeError, lambda bad=bad: bad))
    return faults


def check_rejected(function: str, call: dict, name: str, what: str, expected, outs: dict) -> None:
    """The call with `name` = `what` must raise exactly `expected`, naming `name`, and write to none
    of the other `out` arrays."""
    untouched = {n: o.copy() for n, o in outs.items() if n != name}
    trace(f"{function}({describe(call)}) with {name} = {what}: expect {expected.__name__}")
    try:
        getattr(kernels, function)(**call)
    except (TypeError, ValueError) as e:
        assert type(e) is expected, (
            f"{function} with {name} = {what}: {type(e).__name__} ({e}), expected {expected.__name__}"
        )
        assert names(str(e), name), f"{function} with {name} = {what}: the message does not name {name}: {e}"
    else:
        raise AssertionError(f"{function} with {name} = {what} was accepted; expected {expected.__name__}")
    for n, before in untouched.items():
        np.testing.assert_array_equal(outs[n], before, err_msg=f"a failed {function} call wrote to {n}")


def campaign_errors(data):
    """A valid call with one argument broken: hypothesis picks the fault among all that apply to
    the call, by the argument they break (inputs, outs, the switch, bias_out, the reduction)."""
    dtype, rng = data.draw(dtype_and_rng())
    function = data.draw(st.sampled_from(sorted(SIGNATURES)), label="function")
    dims, arrays, options, outs = draw_valid_arguments(data, rng, function, dtype)
    present = [n for n, a in arrays.items() if a is not None]
    faults = [fault for n in present for fault in input_faults(function, n, arrays[n], present)]
    faults += [fault for n, o in outs.items() for fault in out_faults(n, o, dtype, arrays, present)]
    faults += switch_faults(function, dtype)
    faults += unwanted_bias_out_faults(function, options, dims, dtype)
    faults += reduction_faults(function)

    name, what, expected, build = data.draw(st.sampled_from(faults), label="fault")
    call = {**arrays, **options, **outs}
    if isinstance(build, tuple):  # out overlapping an input
        call[build[1]], call[name] = overlapping_out(rng, np.asarray(arrays[build[1]]), outs[name].shape, dtype)
    else:
        call[name] = build()
    check_rejected(function, call, name, what, expected, outs)


CAMPAIGNS = {"linear": campaign_linear, "mse": campaign_mse, "fused": campaign_fused, "errors": campaign_errors}


def main() -> int:
    global trace_fd, max_work
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("campaign", choices=sorted(CAMPAIGNS))
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-work", type=int, default=max_work, help="bound on batch*in*out")
    parser.add_argument("--trace", default=None)
    args = parser.parse_args()
    max_work = args.max_work
    if args.trace:
        trace_fd = os.open(args.trace, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    test = given(st.data())(CAMPAIGNS[args.campaign])
    test = settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        derandomize=args.seed is None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )(test)
    if args.seed is not None:
        test = seed(args.seed)(test)
    test()
    print(f"fuzz {args.campaign}: {examples_run} examples, ISAs {', '.join(ISAS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

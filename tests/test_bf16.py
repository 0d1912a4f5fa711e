"""bfloat16 products (the Linear layer's four kernels) against the float64 reference, on every SIMD
path: operands rounded to bfloat16, float32 sums (the bound of a float32 product of the rounded
values), results rounded to bfloat16 where asked. The paths compute the same bits: the widened
ones are the portable emulation of vdpbf16ps's pair-wise arithmetic, checked here against a
step-by-step model of it, and, on a CPU with AVX512-BF16, against the instruction itself."""

from pathlib import Path

import numpy as np
import pytest

import lingrad
from lingrad import kernels
from lingrad import reference as ref

from cases import KERNEL_SHAPES, shape_id

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)

# (x, weight) dtypes: both bfloat16, and bfloat16 activations with float32 master weights (and back)
OPERANDS = [(BF16, BF16), (BF16, F32), (F32, BF16)]
SHAPES = [s for s in KERNEL_SHAPES if s[0] * s[1] * s[2] <= 3_000_000]


def intel_cpu() -> bool:
    try:
        return "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def make(rng, *shapes_and_dtypes):
    return [rng.standard_normal(shape).astype(np.float32).astype(dtype) for shape, dtype in shapes_and_dtypes]


def exact_path(isa):
    """Whether the bitwise claims are checked on this ISA: always for the widened paths (software);
    for the vdpbf16ps path where its arithmetic was verified to be the model's (Intel's manual and
    an Intel CPU; elsewhere, AMD, only the bound is asserted); never for AMX, which adds in its own
    order (its results are checked against the bound, and across thread counts)."""
    if isa == "amx_bf16":
        return False
    return isa != "avx512_bf16" or intel_cpu()


@pytest.mark.parametrize("operands", OPERANDS, ids=lambda o: f"{o[0].name}-{o[1].name}")
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_products_within_the_bound(isa, rng, shape, operands):
    batch, n_in, n_out = shape
    x_dtype, w_dtype = operands
    x, w, dy = make(rng, ((batch, n_in), x_dtype), ((n_out, n_in), w_dtype), ((batch, n_out), BF16))
    bias = rng.standard_normal(n_out).astype(np.float32).astype(x_dtype)
    xr, wr, dyr = map(ref.bf16_values, (x, w, dy))

    want, bound = ref.linear_forward(xr, wr, bias.astype(np.float32))
    y = kernels.linear_forward(x, w, bias)
    assert y.dtype == (BF16 if x_dtype == w_dtype == BF16 else F32)
    y_bound = ref.bf16_output_bound(want, bound) if y.dtype == BF16 else bound
    ref.assert_within(y.astype(np.float64), want, y_bound, "y")
    y32 = kernels.linear_forward(x, w, bias, out=np.empty((batch, n_out), np.float32))
    ref.assert_within(y32, want, bound, "y (float32 out)")

    want_dx, dx_bound = ref.linear_backward_input(dyr, wr)
    dx = kernels.linear_backward_input(dy, w, out=np.empty((batch, n_in), BF16))
    ref.assert_within(dx.astype(np.float64), want_dx, ref.bf16_output_bound(want_dx, dx_bound), "dx")

    want_dw, dw_bound, want_db, db_bound = ref.linear_backward_weight(dyr, xr)
    dw, db = kernels.linear_backward_weight(dy, x, out=np.empty((n_out, n_in), np.float32))
    assert db.dtype == (BF16 if x_dtype == BF16 else F32)  # bfloat16 when every input of the call is
    ref.assert_within(dw, want_dw, dw_bound, "dw")
    db_bound = ref.bf16_output_bound(want_db, db_bound) if db.dtype == BF16 else db_bound
    ref.assert_within(db.astype(np.float64), want_db, db_bound, "db")


def pair_model(a, b):
    """vdpbf16ps's arithmetic, step by step in float32 (Intel's manual): C[i, j] starts at 0 and takes
    K in pairs (k, k + 1) from k = 0, the odd element first: c = c + a[i, k+1] b[k+1, j], then
    c = c + a[i, k] b[k, j], each rounded to float32 (the products are exact)."""
    a, b = ref.bf16_values(a), ref.bf16_values(b)
    k = a.shape[1]
    if k % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    c = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for p in range(0, a.shape[1], 2):
        c = c + np.outer(a[:, p + 1], b[p + 1])  # float32 + (exact) float32 product: one rounding
        c = c + np.outer(a[:, p], b[p])
    return c


def test_every_path_computes_the_pair_model_bitwise(isa, rng):
    if not exact_path(isa):
        pytest.skip(f"{isa}: not the pair model's order here (see exact_path); the bound tests run")
    # Magnitudes spread over 2^-12 .. 2^12, so that the order of the additions shows in the bits;
    # K = 101 (odd, one K slice), 13 x 37: edge tiles in both directions.
    scale = lambda shape: 2.0 ** rng.integers(-12, 13, size=shape)  # noqa: E731
    x = (rng.standard_normal((13, 101)) * scale((13, 101))).astype(BF16)
    w = (rng.standard_normal((37, 101)) * scale((37, 101))).astype(BF16)
    want = pair_model(x, w.T)
    # The same sums with each pair's even element first must differ somewhere, or this test could not fail.
    xs, ws = ref.bf16_values(x), ref.bf16_values(w)
    swapped = np.zeros_like(want)
    for p in range(0, 100, 2):
        swapped = swapped + np.outer(xs[:, p], ws[:, p])
        swapped = swapped + np.outer(xs[:, p + 1], ws[:, p + 1])
    swapped = swapped + np.outer(xs[:, 100], ws[:, 100])
    assert not np.array_equal(swapped, want)
    got = kernels.linear_forward(x, w, out=np.empty((13, 37), np.float32))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(300, 513, 77), (64, 784, 50), (9, 3000, 800)], ids=shape_id)
def test_paths_and_thread_counts_agree_bitwise(rng, shape):
    batch, n_in, n_out = shape
    x, w, dy = make(rng, ((batch, n_in), BF16), ((n_out, n_in), F32), ((batch, n_out), BF16))
    results = {}
    for isa in lingrad.available_isas():
        for threads in (1, 2, 3):
            with lingrad.settings(isa=isa, threads=threads):
                results[isa, threads] = (
                    kernels.linear_forward(x, w),
                    kernels.linear_backward_input(dy, w),
                    *kernels.linear_backward_weight(dy, x, out=np.empty((n_out, n_in), np.float32)),
                )
    for isa in {isa for isa, _ in results}:  # every thread count alike on each path
        for threads in (2, 3):
            for name, a, b in zip(("y", "dx", "dw", "db"), results[isa, 1], results[isa, threads]):
                assert a.tobytes() == b.tobytes(), f"{name} on {isa}: {threads} threads differ from 1"
    exact = [key for key in results if exact_path(key[0])]  # and the pair model's paths with each other
    for key in exact:
        for name, a, b in zip(("y", "dx", "dw", "db"), results[exact[0]], results[key]):
            assert a.tobytes() == b.tobytes(), f"{name}: {key} differs from {exact[0]}"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_step(isa, rng, reduction):
    """linear_mse with bfloat16 activations and float32 master weights: the loss and dY from float32
    sums, dX and dW from dY rounded to bfloat16; each gradient in its input's dtype."""
    batch, n_in, n_out = 37, 300, 45
    x, w, t = make(rng, ((batch, n_in), BF16), ((n_out, n_in), F32), ((batch, n_out), F32))
    bias = rng.standard_normal(n_out).astype(np.float32)
    dy_out = np.empty((batch, n_out), np.float32)
    loss, dx, dw, db = kernels.linear_mse(x, w, bias, t, reduction, grad_output=dy_out)
    assert (dx.dtype, dw.dtype, db.dtype) == (BF16, F32, F32)
    xr, wr = ref.bf16_values(x), ref.bf16_values(w)
    (want_loss, loss_bound), *_ = ref.linear_mse(xr, wr, bias, t, reduction)
    ref.assert_within(loss, want_loss, loss_bound, "loss")
    y, y_bound = ref.linear_forward(xr, wr, bias)
    scale, e = (2.0 / t.size if reduction == "mean" else 2.0), ref.eps(np.float32)
    want_dy = scale * (y - t)
    dy_bound = scale * (y_bound + e * (np.abs(y) + np.abs(t))) + e * np.abs(want_dy)
    ref.assert_within(dy_out, want_dy, dy_bound, "dY")
    # dX and dW are products of dY as the kernel rounded it: compare with the reference of those.
    dyr = ref.bf16_values(dy_out)
    want_dx, dx_bound = ref.linear_backward_input(dyr, wr)
    ref.assert_within(dx.astype(np.float64), want_dx, ref.bf16_output_bound(want_dx, dx_bound), "dx")
    want_dw, dw_bound, want_db, db_bound = ref.linear_backward_weight(dyr, xr)
    ref.assert_within(dw, want_dw, dw_bound, "dw")
    # db sums dY as rounded to bfloat16 too
    ref.assert_within(db, want_db, db_bound, "db")


def test_nan_inf_and_denormals(isa):
    x = np.array([[np.nan, 1.0], [np.inf, 1.0], [1e-40, 1.0]], np.float32).astype(BF16)
    w = np.array([[1.0, 2.0]], np.float32).astype(BF16)
    y = kernels.linear_forward(x, w, out=np.empty((3, 1), np.float32))
    assert np.isnan(y[0, 0]) and y[1, 0] == np.inf
    assert y[2, 0] == 2.0  # a denormal operand counts as zero


def special_floats(rng, shape):
    """float32 values that test rounding to bfloat16 as the engine packs them: ties (to even), carries
    into the exponent, denormals (flushed to zero) and the largest denormal (which rounds up to the
    smallest normal), each sign, among normal values of every magnitude."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F7FFFFF, 0x007FFFFF, 0x00000001, 0x00400000, 0x7F7F0000], np.uint32)
    specials = np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)
    a = (rng.standard_normal(shape) * 2.0 ** rng.integers(-60, 60, size=shape)).astype(np.float32)
    a.flat[rng.choice(a.size, size=3 * specials.size, replace=False)] = np.tile(specials, 3)
    return a


def test_float32_operands_are_rounded_as_packed(isa, rng):
    # A product with an identity reads out each packed float32 operand: exactly its bfloat16 value.
    # Every operand position (X, W, dY), rows and K pairs of both parities (37 and 45 wide).
    n_in, n_out = 37, 45
    eye = lambda n: np.eye(n, dtype=np.float32).astype(BF16)  # noqa: E731
    w = special_floats(rng, (n_out, n_in))
    x, dy = special_floats(rng, (n_in, n_out)), special_floats(rng, (n_in, n_out))
    out = lambda *shape: np.empty(shape, np.float32)  # noqa: E731
    np.testing.assert_array_equal(kernels.linear_forward(eye(n_in), w, out=out(n_in, n_out)), ref.bf16_values(w).T)
    dx = kernels.linear_backward_input(eye(n_out), w, out=out(n_out, n_in))
    np.testing.assert_array_equal(dx, ref.bf16_values(w))
    dw, _ = kernels.linear_backward_weight(eye(n_in), x, out=out(n_in, n_out))
    np.testing.assert_array_equal(dw, ref.bf16_values(x))
    dw, _ = kernels.linear_backward_weight(dy, eye(n_in), out=out(n_out, n_in))
    np.testing.assert_array_equal(dw, ref.bf16_values(dy).T)


def float_to_bf16_bits(a):
    """float32 values rounded to bfloat16 bits as lingrad rounds a result: to nearest even (denormals
    too), a NaN made quiet."""
    u = a.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, rounded).astype(np.uint16)


def test_bfloat16_results_are_the_float32_results_rounded(isa, rng):
    # The same product with a float32 and a bfloat16 result: the second is the first rounded, bit for
    # bit, whatever the values. Rows with x = 0 give y = bias: denormals, ties, carries, infinities
    # and NaNs reach the rounding (among groups of 32 columns with and without them, and a tail).
    batch, n_in, n_out = 40, 37, 77
    x, w = make(rng, ((batch, n_in), BF16), ((n_out, n_in), BF16))
    x[::3] = 0
    bias = special_floats(rng, (n_out,))
    bias[[5, 40]] = np.inf, np.nan
    bias[64:77] = np.array([0x00400001, 0x00000003] * 6 + [0x80012345], np.uint32).view(np.float32)  # denormals
    y32 = kernels.linear_forward(x, w, bias, out=np.empty((batch, n_out), np.float32))
    y16 = kernels.linear_forward(x, w, bias, out=np.empty((batch, n_out), BF16))
    np.testing.assert_array_equal(y16.view(np.uint16), float_to_bf16_bits(y32))
    assert (y32[::3] == bias)[:, np.isfinite(bias)].all()  # (x = 0: the bias itself was rounded)


def aligned_bf16(a, offset):
    """a as a bfloat16 array whose data starts offset bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start : start + a.nbytes].view(BF16).reshape(a.shape)
    out[...] = a
    return out


def test_amx_reads_rows_in_place_or_packed_alike(rng):
    # AMX tiles read rows of X in place (whole cache lines apart, 64-byte aligned) or pack them
    # (another alignment, or another stride): the same products in the same order, the same bits.
    if "amx_bf16" not in lingrad.available_isas():
        pytest.skip("this CPU has no AMX")
    x, w = make(rng, ((300, 96), BF16), ((200, 96), F32))
    padded = np.zeros((300, 100), BF16)
    padded[:, :96] = x
    with lingrad.settings(isa="amx_bf16"):
        ys = [kernels.linear_forward(a, w) for a in (aligned_bf16(x, 0), aligned_bf16(x, 16), padded[:, :96])]
    assert ys[0].tobytes() == ys[1].tobytes() == ys[2].tobytes()


def test_empty_and_zero_k(isa):
    x = np.zeros((0, 5), BF16)
    assert kernels.linear_forward(x, np.zeros((3, 5), BF16)).shape == (0, 3)
    dw, db = kernels.linear_backward_weight(np.ones((4, 0), BF16), np.ones((4, 3), BF16))
    assert dw.shape == (0, 3) and db.shape == (0,)
    y = kernels.linear_forward(np.zeros((2, 0), BF16), np.zeros((3, 0), F32), np.ones(3, np.float32))
    np.testing.assert_array_equal(y, np.ones((2, 3), np.float32))
    _, db = kernels.linear_backward_weight(np.ones((4, 3), BF16), np.ones((4, 0), BF16))
    np.testing.assert_array_equal(db.astype(np.float32), np.full(3, 4.0, np.float32))


def test_errors_name_the_argument():
    x = np.zeros((2, 3), BF16)
    with pytest.raises(TypeError, match="weight has dtype float64 but x has dtype bfloat16"):
        kernels.linear_forward(x, np.zeros((4, 3)))
    with pytest.raises(TypeError, match="pred has dtype bfloat16; of lingrad's kernels"):
        kernels.mse_loss(x, x)
    with pytest.raises(TypeError, match=r"x has dtype bfloat16"):
        kernels.mlp_forward(x, [np.zeros((4, 3), BF16)], None, ["relu"])
    with pytest.raises(ValueError, match="out has dtype float64 but must be float32 or bfloat16"):
        kernels.linear_forward(x, np.zeros((4, 3), BF16), out=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="grad_output has dtype bfloat16 but must be float32"):
        kernels.linear_mse(x, np.zeros((4, 3), BF16), None, np.zeros((2, 4), BF16), grad_output=np.zeros((2, 4), BF16))
    with pytest.raises(ValueError, match="not aligned"):
        raw = np.zeros(13, np.uint8)[1:].view(BF16).reshape(2, 3)
        kernels.linear_forward(raw, np.zeros((4, 3), BF16))


def test_config_names_the_bfloat16_kernel():
    info = lingrad.config()
    assert info["bf16_kernel"] == {"amx_bf16": "amx", "avx512_bf16": "vdpbf16ps"}.get(info["isa"], "widened")
    assert info["bf16_numpy"] is True


# ---------------------------------------------------------------------------------------------
# PyTorch: bfloat16 tensors and torch.autocast to bfloat16 on lingrad's kernels

torch = pytest.importorskip("torch")
import copy  # noqa: E402
import warnings  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from lingrad import functional as LF  # noqa: E402


def magnitude(t) -> np.ndarray:
    return t.detach().abs().double().numpy()


def bf16_bound(a, b) -> np.ndarray:
    """A bound between two bfloat16 computations of a @ b (float32 sums, rounding the result or the
    operands to bfloat16 at different places): a bfloat16 ulp of |a| @ |b|, in float64."""
    return 2.0**-7 * (magnitude(a) @ magnitude(b))


def assert_close_bf16(got, want, bound, name):
    err = (got.detach().double() - want.detach().double()).abs().numpy()
    assert (err <= bound).all(), f"{name}: error {err.max():.3g} beyond the bfloat16 bound"


def test_bfloat16_modules_run_lingrads_kernels():
    torch.manual_seed(0)
    ours = lingrad.Linear(96, 40, dtype=torch.bfloat16)
    theirs = torch.nn.Linear(96, 40, dtype=torch.bfloat16)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(33, 96, dtype=torch.bfloat16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LF.FallbackWarning)  # lingrad's kernels, not PyTorch's
        y = ours(x)
    y_ref = theirs(x)
    assert y.dtype == torch.bfloat16
    assert_close_bf16(y, y_ref, bf16_bound(x, ours.weight.T) + 2.0**-7 * magnitude(y_ref), "y")
    g = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, ours.weight, ours.bias), g)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, theirs.weight, theirs.bias), g)
    assert dx.dtype == dw.dtype == db.dtype == torch.bfloat16
    assert_close_bf16(dx, dx_ref, 2 * bf16_bound(g, ours.weight), "dx")
    assert_close_bf16(dw, dw_ref, 2 * bf16_bound(g.T, x), "dw")
    assert_close_bf16(db, db_ref, 2 * bf16_bound(g.T, torch.ones(33, 1)).ravel(), "db")


def test_autocast_bfloat16_on_lingrads_kernels():
    """Under autocast, as nn.Linear: a bfloat16 output from float32 parameters, which receive float32
    gradients; lingrad's are summed in float32 (PyTorch's pass through bfloat16), so they agree within
    a bfloat16 rounding, and lingrad's are the closer to the float64 product of the rounded operands."""
    torch.manual_seed(1)
    ours, theirs = lingrad.Linear(300, 20), torch.nn.Linear(300, 20)
    theirs.load_state_dict(ours.state_dict())
    head = lingrad.LinearMSELoss(300, 20)
    head.load_state_dict(ours.state_dict())
    x, t = torch.randn(64, 300), torch.randn(64, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("error", LF.FallbackWarning)
            y = ours(x)
            loss = head(x, t)
        y_ref = theirs(x)
        loss_ref = F.mse_loss(theirs(x), t)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert loss.dtype == loss_ref.dtype == torch.float32
    xb, wb = x.bfloat16(), ours.weight.detach().bfloat16()
    assert_close_bf16(y, y_ref, bf16_bound(xb, wb.T) + 2.0**-7 * magnitude(y_ref), "y")
    # the fused loss keeps y in float32 where PyTorch rounds it to bfloat16 first
    torch.testing.assert_close(loss, loss_ref, rtol=2**-6, atol=0)

    g = torch.randn(64, 20).bfloat16()
    (dw,) = torch.autograd.grad(y, ours.weight, g)
    (dw_ref,) = torch.autograd.grad(y_ref, theirs.weight, g)
    assert dw.dtype == dw_ref.dtype == torch.float32
    assert_close_bf16(dw, dw_ref, bf16_bound(g.T, xb), "dW against PyTorch")
    exact = g.double().T @ xb.double()
    assert (dw.double() - exact).abs().max() < (dw_ref.double() - exact).abs().max()

    loss.backward()
    assert head.weight.grad.dtype == torch.float32 and head.bias.grad.dtype == torch.float32
    loss_ref.backward()
    # dY = 2 (y - t) / N from y in float32 (lingrad) or rounded to bfloat16 (PyTorch): they differ by
    # up to 2/N ulps of y; each dW then rounds dY (and PyTorch dW) to bfloat16.
    scale = 2.0 / t.numel()
    dy = scale * (y_ref.float() - t)
    bound = 2 * bf16_bound(dy.T, xb) + scale * bf16_bound(y_ref.float().T, xb)
    assert_close_bf16(head.weight.grad, theirs.weight.grad, bound, "fused dW")


def test_fuse_under_autocast_and_compile():
    torch.manual_seed(2)
    seq = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    fused = lingrad.fuse(copy.deepcopy(seq))
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("error", LF.FallbackWarning)
            y = fused(x)
        y_ref = seq(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2**-5, atol=2**-5)
    layer = lingrad.Linear(16, 8, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xb = x.bfloat16()
    assert torch.equal(compiled(xb), layer(xb))


def test_mixed_dtypes_outside_autocast_are_a_type_error():
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but input has dtype torch.bfloat16"):
        LF.linear(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 3))


def test_what_is_not_a_tensor_is_pytorchs_type_error():
    with pytest.raises(TypeError, match="must be Tensor, not list"):
        LF.linear([[1.0]], torch.ones(1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="must be Tensor, not list"):
        LF.linear([[1.0]], torch.ones(1, 1))

"""Per-sample gradients and DP-SGD (issue 15): the kernels against float64 references, the
weighted weight gradient's thread-count determinism, errors, and lingrad.privacy.clip_and_accumulate
against torch.func per-sample gradients (and Opacus, where it is installed).

Float32 results are compared with bounds that grow with the reduction length (lingrad.reference);
float64 ones to rounding. Shapes are small: the whole file runs in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

import lingrad
from lingrad import kernels
from lingrad import reference as ref

from helpers import assert_same_bytes_for_any_thread_count

try:
    import torch
except ImportError:  # the kernels' tests run without torch (scripts/serial.sh, sanitize.sh)
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch")
DTYPES = [np.float32, np.float64]


def make(rng, dtype, *shapes):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# ---------------------------------------------------------------------------------------------
# Kernels

# (batch, in, out) of 2-D inputs; and (batch, steps, in, out) of 3-D ones, which take the Gram form
# when T (T + 1) / 2 (in + out) <= T in out, else the row form (the docstring's rule).
SHAPES_2D = [(1, 1, 1), (7, 13, 5), (37, 3, 50), (64, 100, 1), (33, 257, 70), (0, 4, 3), (5, 0, 3)]
SHAPES_3D = [
    (5, 1, 7, 3),  # Gram (T = 1)
    (6, 4, 20, 10),  # Gram: 10 * 30 <= 4 * 200
    (4, 30, 5, 3),  # rows: 465 * 8 > 30 * 15
    (3, 9, 8, 1),  # rows: 45 * 9 > 9 * 8
]


def shape_id(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_2D, ids=shape_id)
def test_norms_2d(rng, dtype, shape):
    batch, n_in, n_out = shape
    dy, x = make(rng, dtype, (batch, n_out), (batch, n_in))
    for bias in (True, False):
        got = kernels.linear_per_sample_grad_norms(dy, x, bias=bias)
        assert got.dtype == np.float64 and got.shape == (batch,)
        ref.assert_within(got, *ref.per_sample_grad_norms(dy, x, bias), "norms")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_3D, ids=shape_id)
def test_norms_3d(rng, dtype, shape):
    batch, steps, n_in, n_out = shape
    dy, x = make(rng, dtype, (batch, steps, n_out), (batch, steps, n_in))
    for bias in (True, False):
        got = kernels.linear_per_sample_grad_norms(dy, x, bias=bias)
        ref.assert_within(got, *ref.per_sample_grad_norms(dy, x, bias), "norms")
    # strided views are read in place and give the same bits
    dy_t = np.ascontiguousarray(dy.transpose(2, 1, 0)).transpose(2, 1, 0)
    np.testing.assert_array_equal(
        kernels.linear_per_sample_grad_norms(dy_t, x[:, :, ::-1].copy()[:, :, ::-1]),
        kernels.linear_per_sample_grad_norms(dy, x),
    )


def test_norms_of_a_one_step_sequence_are_the_2d_norms(rng):
    dy, x = make(rng, np.float64, (9, 5), (9, 7))
    np.testing.assert_array_equal(
        kernels.linear_per_sample_grad_norms(dy[:, None], x[:, None]), kernels.linear_per_sample_grad_norms(dy, x)
    )


# Weighted dW: the scaled products always take the GEMM engine's packed path; these shapes would
# otherwise take the narrow (in <= 4) and small-M (out <= 8) paths, and the packed one's edges.
WEIGHTED_SHAPES = [(1, 1, 1), (300, 3, 50), (500, 64, 1), (200, 30, 8), (17, 255, 15), (169, 100, 47), (0, 5, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WEIGHTED_SHAPES, ids=shape_id)
def test_weighted_backward_weight(isa, rng, dtype, shape):
    batch, n_in, n_out = shape
    dy, x = make(rng, dtype, (batch, n_out), (batch, n_in))
    s = rng.random(batch).astype(dtype)
    want_dw, dw_bound, want_db, db_bound = ref.weighted_backward_weight(dy, x, s)
    dw, db = kernels.linear_backward_weight(dy, x, sample_weights=s)
    assert dw.dtype == dtype and dw.shape == (n_out, n_in) and db.shape == (n_out,)
    ref.assert_within(dw, want_dw, dw_bound, "dw")
    ref.assert_within(db, want_db, db_bound, "db")
    dw2, none = kernels.linear_backward_weight(dy, x, sample_weights=s, bias=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)
    # any layout of dy, x and the weights: the same bits
    s_strided = np.repeat(s, 2)[::2]
    dw3, db3 = kernels.linear_backward_weight(np.asfortranarray(dy), np.asfortranarray(x), sample_weights=s_strided)
    np.testing.assert_array_equal(dw3, dw)
    np.testing.assert_array_equal(db3, db)


def test_unit_weights_and_zero_weights(rng):
    dy, x = make(rng, np.float64, (50, 6), (50, 9))
    dw, db = kernels.linear_backward_weight(dy, x, sample_weights=np.ones(50))
    want_dw, _, want_db, _ = ref.linear_backward_weight(dy, x)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(db, want_db, rtol=1e-13, atol=1e-13)
    # a weight of 0 drops the sample, even one holding infinities
    s = np.ones(50)
    s[3] = 0
    dw0, _ = kernels.linear_backward_weight(dy, x, sample_weights=s)
    keep = np.arange(50) != 3
    np.testing.assert_allclose(dw0, dy[keep].T @ x[keep], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_grads(rng, dtype):
    dy, x = make(rng, dtype, (10, 6), (10, 11))
    got = kernels.linear_per_sample_grads(dy, x)
    assert got.shape == (10, 6, 11) and got.dtype == dtype
    ref.assert_within(got, *ref.per_sample_grads(dy, x), "grads")
    # in caller-sized chunks, into one reused out array
    out = np.empty((4, 6, 11), dtype)
    for i in range(0, 8, 4):
        r = kernels.linear_per_sample_grads(dy[i : i + 4], x[i : i + 4], out=out)
        assert r is out
        np.testing.assert_array_equal(out, got[i : i + 4])
    # 3-D: summed over the steps
    dy3, x3 = make(rng, dtype, (3, 20, 6), (3, 20, 11))
    ref.assert_within(kernels.linear_per_sample_grads(dy3, x3), *ref.per_sample_grads(dy3, x3), "grads")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 257, 70), (2000, 3, 100), (700, 100, 5), (100, 50, 64, 32)], ids=shape_id)
def test_same_bytes_for_any_thread_count(isa, num_threads, dtype, shape):
    rng = np.random.default_rng(3)
    if len(shape) == 3:
        batch, n_in, n_out = shape
        dy, x = make(rng, dtype, (batch, n_out), (batch, n_in))
    else:
        batch, steps, n_in, n_out = shape
        dy, x = make(rng, dtype, (batch, steps, n_out), (batch, steps, n_in))
    s = rng.random(batch).astype(dtype)

    def run():
        results = [kernels.linear_per_sample_grad_norms(dy, x), kernels.linear_per_sample_grads(dy[:20], x[:20])]
        if dy.ndim == 2:
            results += kernels.linear_backward_weight(dy, x, sample_weights=s)
        return results

    assert_same_bytes_for_any_thread_count(run, num_threads)


def test_errors():
    f32 = np.float32
    dy, x = np.zeros((4, 3), f32), np.zeros((4, 5), f32)
    with pytest.raises(ValueError, match=r"sample_weights must be 1-D \(batch,\), got shape \(4, 1\)"):
        kernels.linear_backward_weight(dy, x, sample_weights=np.ones((4, 1), f32))
    with pytest.raises(ValueError, match=r"sample_weights has shape \(3,\) but grad_out has shape \(4, 3\)"):
        kernels.linear_backward_weight(dy, x, sample_weights=np.ones(3, f32))
    with pytest.raises(TypeError, match="sample_weights has dtype float64 but grad_out has dtype float32"):
        kernels.linear_backward_weight(dy, x, sample_weights=np.ones(4))
    with pytest.raises(TypeError, match="sample_weights must be a numpy.ndarray, got list"):
        kernels.linear_backward_weight(dy, x, sample_weights=[1.0] * 4)
    for fn in (kernels.linear_per_sample_grad_norms, kernels.linear_per_sample_grads):
        with pytest.raises(ValueError, match=r"grad_out must be 2-D \(batch, out_features\) or 3-D"):
            fn(np.zeros(4, f32), x)
        with pytest.raises(ValueError, match=r"x must be 2-D \(batch, in_features\) or 3-D"):
            fn(dy, np.zeros((1, 4, 5, 1), f32))
        with pytest.raises(ValueError, match=r"grad_out has shape \(4, 3\) but x has shape \(5, 5\)"):
            fn(dy, np.zeros((5, 5), f32))
        with pytest.raises(ValueError, match=r"grad_out has shape \(4, 2, 3\) but x has shape \(4, 5\)"):
            fn(np.zeros((4, 2, 3), f32), x)
        with pytest.raises(ValueError, match=r"with the same batch and steps"):
            fn(np.zeros((4, 2, 3), f32), np.zeros((4, 3, 5), f32))
        with pytest.raises(TypeError, match="x has dtype float64 but grad_out has dtype float32"):
            fn(dy, np.zeros((4, 5)))
    with pytest.raises(TypeError, match="bias must be True or False, got ndarray"):
        kernels.linear_per_sample_grad_norms(dy, x, bias=np.ones(3))
    with pytest.raises(ValueError, match=r"out has shape \(4, 5, 3\) but must be \(4, 3, 5\)"):
        kernels.linear_per_sample_grads(dy, x, out=np.empty((4, 5, 3), f32))
    with pytest.raises(ValueError, match="out has dtype float64 but must be float32"):
        kernels.linear_per_sample_grads(dy, x, out=np.empty((4, 3, 5)))
    with pytest.raises(ValueError, match="out is read-only"):
        out = np.empty((4, 3, 5), f32)
        out.flags.writeable = False
        kernels.linear_per_sample_grads(dy, x, out=out)
    with pytest.raises(ValueError, match="must be C-contiguous"):
        kernels.linear_per_sample_grads(dy, x, out=np.empty((4, 5, 3), f32).transpose(0, 2, 1))


# ---------------------------------------------------------------------------------------------
# lingrad.privacy.clip_and_accumulate


def _per_sample_loss(out, target):
    r = (out - target) ** 2
    return r.reshape(r.shape[0], -1).sum(1)


def _models(dtype):
    torch.manual_seed(0)
    body = torch.nn.Sequential(lingrad.Linear(7, 6), torch.nn.Tanh(), lingrad.Linear(6, 3)).to(dtype)
    gelu = torch.nn.Sequential(lingrad.Linear(7, 6), torch.nn.GELU(), lingrad.Linear(6, 3)).to(dtype)
    return {
        "linear": body,
        "fused-tanh": lingrad.fuse(body),
        "fused-gelu": lingrad.fuse(gelu),
        "fused-relu": lingrad.FusedMLP([7, 6, 5, 3], "relu", dtype=dtype),
        "no-bias": torch.nn.Sequential(lingrad.Linear(7, 6, bias=False), torch.nn.ReLU(), lingrad.Linear(6, 3)).to(
            dtype
        ),
    }


def _reference(model, x, target, max_grad_norm):
    """torch.func per-sample gradients, clipped jointly and summed, over the batch size."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xb, tb):
        return _per_sample_loss(functional_call(model, p, (xb[None],)), tb[None]).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    batch = x.shape[0]
    norms = torch.sqrt(sum((v.reshape(batch, -1).double() ** 2).sum(1) for v in g.values()))
    clip = torch.clamp(max_grad_norm / norms, max=1.0)
    grads = {k: (clip.to(v.dtype).reshape(-1, *[1] * (v.dim() - 1)) * v).sum(0) / batch for k, v in g.items()}
    return norms, grads


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["linear", "fused-tanh", "fused-gelu", "fused-relu", "no-bias", "sequence"])
def test_clip_and_accumulate_equals_torch_func(dtype, kind):
    dtype = getattr(torch, dtype)
    model = _models(dtype)["linear" if kind == "sequence" else kind]
    torch.manual_seed(1)
    shape = (16, 4, 7) if kind == "sequence" else (16, 7)
    x = torch.randn(*shape, dtype=dtype)
    target = torch.randn(*shape[:-1], 3, dtype=dtype)
    c = float(_reference(model, x, target, 1.0)[0].median())  # half the samples clipped, half not
    want_norms, want = _reference(model, x, target, c)
    assert (want_norms > c).any() and (want_norms < c).any()
    norms = lingrad.privacy.clip_and_accumulate(model, _per_sample_loss(model(x), target), c)
    assert norms.dtype == torch.float64 and norms.shape == (16,)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    torch.testing.assert_close(norms, want_norms, **tol)
    for name, p in model.named_parameters():
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, want[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_torch
def test_a_layer_used_twice_adds_its_uses_per_sample():
    torch.manual_seed(2)
    layer = lingrad.Linear(5, 5).double()
    model = torch.nn.Sequential(layer)
    x, target = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    twice = Twice()
    assert model is not None
    want_norms, want = _reference(twice, x, target, 1.0)
    norms = lingrad.privacy.clip_and_accumulate(twice, _per_sample_loss(twice(x), target), 1.0)
    torch.testing.assert_close(norms, want_norms, rtol=1e-12, atol=1e-14)
    for name, p in twice.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-12, atol=1e-14)


@needs_torch
def test_frozen_layers():
    torch.manual_seed(4)
    model = _models(torch.float64)["linear"]
    model[0].weight.requires_grad_(False)  # a trainable bias under a frozen weight
    model[2].requires_grad_(False)
    x, target = torch.randn(12, 7, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    norms = lingrad.privacy.clip_and_accumulate(model, _per_sample_loss(model(x), target), 1.0)
    # the reference: torch.func's per-sample gradient of the one trainable parameter
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(b, xb, tb):
        return _per_sample_loss(functional_call(model, {**params, "0.bias": b}, (xb[None],)), tb[None]).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params["0.bias"], x, target)
    want = g.norm(dim=1)
    torch.testing.assert_close(norms, want, rtol=1e-12, atol=1e-14)
    clip = (1.0 / want).clamp(max=1.0)
    torch.testing.assert_close(model[0].bias.grad, (clip[:, None] * g).sum(0) / 12, rtol=1e-12, atol=1e-14)
    assert model[0].weight.grad is None and model[2].weight.grad is None


@needs_torch
def test_noise_is_reproducible_and_scaled():
    model = _models(torch.float64)["linear"]
    x, target = torch.randn(32, 7, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)

    def step(noise, seed):
        g = torch.Generator().manual_seed(seed)
        lingrad.privacy.clip_and_accumulate(model, _per_sample_loss(model(x), target), 0.7, noise, g)
        return [p.grad.clone() for p in model.parameters()]

    clean = step(0.0, 0)
    a, b, c = step(1.3, 5), step(1.3, 5), step(1.3, 6)
    for ga, gb, gc in zip(a, b, c):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)  # same generator seed: same bits
        assert not torch.equal(ga, gc)
    # the noise is N(0, (noise * C)^2) / B, drawn from the generator in parameters() order, in chunks
    g = torch.Generator().manual_seed(5)
    for p, g0, ga in zip(model.parameters(), clean, a):
        noise = torch.cat([torch.randn(n, generator=g, dtype=p.dtype) for n in _chunks(p.numel())])
        torch.testing.assert_close(ga, g0 + noise.reshape(p.shape) * (1.3 * 0.7 / 32), rtol=1e-12, atol=1e-15)


def _chunks(n):
    chunk = lingrad.privacy.NOISE_CHUNK
    return [min(chunk, n - i) for i in range(0, n, chunk)]


@needs_torch
def test_noise_in_chunks(monkeypatch):
    monkeypatch.setattr(lingrad.privacy, "NOISE_CHUNK", 7)
    grad = torch.zeros(5, 4, dtype=torch.float64)
    lingrad.privacy.add_noise(grad, 2.0, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    want = torch.cat([torch.randn(n, generator=g, dtype=torch.float64) for n in (7, 7, 6)]) * 2.0
    torch.testing.assert_close(grad.reshape(-1), want, rtol=0, atol=0)


@needs_torch
def test_one_backward_and_no_weight_gradient_product(monkeypatch):
    """The backward pass computes no weight gradient (one weighted product per layer after it)."""
    model = _models(torch.float32)["linear"]
    x, target = torch.randn(16, 7), torch.randn(16, 3)
    loss = _per_sample_loss(model(x), target)
    calls = []
    real = kernels.linear_backward_weight
    monkeypatch.setattr(kernels, "linear_backward_weight", lambda *a, **k: calls.append(k) or real(*a, **k))
    lingrad.privacy.clip_and_accumulate(model, loss, 1.0)
    assert len(calls) == 2 and all(k["sample_weights"] is not None for k in calls)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.sum().backward()  # the graph was used (and freed) by the one backward pass


@needs_torch
def test_clip_and_accumulate_errors():
    privacy = lingrad.privacy
    x, target = torch.randn(4, 7), torch.randn(4, 3)
    plain = torch.nn.Sequential(lingrad.Linear(7, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with pytest.raises(TypeError, match=r"module '2' \(Linear\) has trainable parameters"):
        privacy.clip_and_accumulate(plain, _per_sample_loss(plain(x), target), 1.0)
    norm = torch.nn.Sequential(lingrad.Linear(7, 3), torch.nn.LayerNorm(3))
    with pytest.raises(TypeError, match=r"module '1' \(LayerNorm\)"):
        privacy.clip_and_accumulate(norm, _per_sample_loss(norm(x), target), 1.0)
    norm[1].requires_grad_(False)  # frozen: fine
    privacy.clip_and_accumulate(norm, _per_sample_loss(norm(x), target), 1.0)
    mse = lingrad.FusedMLP([7, 3], loss="mse")
    with pytest.raises(TypeError, match="loss='mse'"):
        privacy.clip_and_accumulate(mse, mse(x, target).reshape(1), 1.0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        privacy.clip_and_accumulate(3, target, 1.0)
    model = torch.nn.Sequential(lingrad.Linear(7, 3))
    with pytest.raises(ValueError, match=r"per_sample_loss must be a 1-D tensor \(batch,\).*\(\)"):
        privacy.clip_and_accumulate(model, _per_sample_loss(model(x), target).sum(), 1.0)
    with pytest.raises(ValueError, match="per_sample_loss has no graph"):
        privacy.clip_and_accumulate(model, torch.zeros(4), 1.0)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_grad_norm must be a positive number"):
            privacy.clip_and_accumulate(model, _per_sample_loss(model(x), target), bad)
    with pytest.raises(ValueError, match="noise_multiplier must be a number >= 0"):
        privacy.clip_and_accumulate(model, _per_sample_loss(model(x), target), 1.0, -0.5)
    with pytest.raises(ValueError, match="not a multiple of the batch size 3"):
        privacy.clip_and_accumulate(model, _per_sample_loss(model(x), target)[:3], 1.0)


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_equals_opacus(dtype):
    opacus = pytest.importorskip("opacus")
    import warnings

    dtype = getattr(torch, dtype)
    model = _models(dtype)["linear"]
    twin = torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)
    twin.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    x, target = torch.randn(16, 7, dtype=dtype), torch.randn(16, 3, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's own warnings (secure RNG, hooks)
        gs = opacus.GradSampleModule(twin, loss_reduction="sum")
        optimizer = opacus.optimizers.DPOptimizer(
            torch.optim.SGD(twin.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=0.5,
            expected_batch_size=16,
            loss_reduction="sum",
        )
        _per_sample_loss(gs(x), target).sum().backward()
        batch = x.shape[0]
        norms = torch.sqrt(sum((p.grad_sample.reshape(batch, -1).double() ** 2).sum(1) for p in twin.parameters()))
        optimizer.pre_step()  # Opacus's clipping (factor C / (norm + 1e-6), at most 1), sum, noise and scaling
    # (with loss_reduction="sum" Opacus leaves out the division by the batch size)
    opacus_grads = {n: p.grad / batch for n, p in twin.named_parameters()}
    got_norms = lingrad.privacy.clip_and_accumulate(model, _per_sample_loss(model(x), target), 0.5)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float64 else {"rtol": 3e-5, "atol": 1e-6}
    torch.testing.assert_close(got_norms, norms, **tol)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, opacus_grads[name], **tol)

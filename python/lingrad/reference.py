"""Float64 references for every kernel, with rigorous error bounds for the fast results.

Used by the test suite and by ``lingrad check``, which runs them against the installed build;
``arrays`` makes the inputs of a Linear layer that they, and ``lingrad bench``, run on.

A float32 (or float64) dot product of length K carries a rounding error of at most about
K * eps * (|a| . |b|), whatever the summation order. Each bound below follows that rule through
the computation, so tolerances grow with the reduction length and a wrong answer (a missing or
doubled term is an error of order |a_k b_k|, far above K * eps * sum) cannot hide inside them.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "arrays",
    "eps",
    "f64",
    "linear_forward",
    "linear_backward_input",
    "linear_backward_weight",
    "per_sample_grads",
    "per_sample_grad_norms",
    "weighted_backward_weight",
    "mse",
    "linear_mse",
    "mlp_forward",
    "mlp_mse",
    "bf16_values",
    "bf16_output_bound",
    "error_ratio",
    "assert_within",
]


def arrays(shape, dtype, seed=0, *, scale_weight=False):
    """The inputs of a Linear layer of shape (batch, in, out) with its loss: x (batch, in),
    w (out, in), b (out,), the target t (batch, out) and an output gradient dy (batch, out).
    Standard normal values, drawn in that order from ``np.random.default_rng(seed)`` and rounded to
    dtype; `seed` may be a Generator, which is drawn from (and so advanced). scale_weight: w divided
    by sqrt(in) (the size of torch.nn.Linear's initial weights), so that y stays near 1 at any width."""
    batch, n_in, n_out = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n_in)).astype(dtype)
    w = rng.standard_normal((n_out, n_in))
    w = (w / np.sqrt(max(n_in, 1)) if scale_weight else w).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype)
    t = rng.standard_normal((batch, n_out)).astype(dtype)
    dy = rng.standard_normal((batch, n_out)).astype(dtype)
    return x, w, b, t, dy


def eps(dtype) -> float:
    # eps = 2u; the factor 2 also covers the float64 reference's own rounding for float64 inputs.
    return float(np.finfo(dtype).eps)


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def bf16_values(a):
    """The values a bfloat16 product of lingrad's computes with, as a float32 array: a rounded to
    bfloat16 (to nearest even; needs ml_dtypes), a denormal flushed to (signed) zero. A product of
    two is exact in float32, so the float32 references above, given these, bound a bfloat16
    product's float32 sums."""
    import ml_dtypes

    rounded = np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32)
    tiny = np.abs(rounded) < np.finfo(np.float32).tiny
    return np.where(tiny, np.copysign(np.float32(0), rounded), rounded).astype(np.float32)


def bf16_output_bound(want, bound):
    """A bound for a result rounded to bfloat16: the float32 result's bound plus half an ulp of
    bfloat16 (8 significant bits) of its magnitude."""
    return bound + 2.0**-8 * (np.abs(want) + bound)


def linear_forward(x, w, b=None):
    """y = x w^T + b in float64, and the bound on |y_fast - y| for x's dtype."""
    e = eps(x.dtype)
    y = f64(x) @ f64(w).T
    magnitude = np.abs(f64(x)) @ np.abs(f64(w)).T
    if b is not None:
        y = y + f64(b)
        magnitude = magnitude + np.abs(f64(b))
    return y, (x.shape[1] + 2) * e * magnitude


def linear_backward_input(dy, w):
    e = eps(dy.dtype)
    return f64(dy) @ f64(w), (dy.shape[1] + 1) * e * (np.abs(f64(dy)) @ np.abs(f64(w)))


def linear_backward_weight(dy, x):
    """(dW, its bound, db, its bound)."""
    e = eps(dy.dtype)
    batch = dy.shape[0]
    dw = f64(dy).T @ f64(x)
    dw_bound = (batch + 1) * e * (np.abs(f64(dy)).T @ np.abs(f64(x)))
    db = f64(dy).sum(axis=0)
    db_bound = (batch + 1) * e * np.abs(f64(dy)).sum(axis=0)
    return dw, dw_bound, db, db_bound


def per_sample_grads(dy, x):
    """Every sample's weight gradient in float64, (B, out, in) (the lesson's broadcast, without the
    .sum(0)): dy (B, out) and x (B, in), or (B, T, out) and (B, T, in) summed over T; and the bound
    for results in dy's dtype (one rounding per product, T + 1 per sum)."""
    e = eps(dy.dtype)
    if dy.ndim == 2:
        g = np.einsum("bo,bi->boi", f64(dy), f64(x))
        return g, e * np.abs(g)
    g = np.einsum("bto,bti->boi", f64(dy), f64(x))
    return g, (dy.shape[1] + 1) * e * np.einsum("bto,bti->boi", np.abs(f64(dy)), np.abs(f64(x)))


def per_sample_grad_norms(dy, x, bias=True):
    """sqrt(||G_b||^2 + ||g_b||^2) per sample in float64, from the materialised per-sample
    gradients, and a bound for the kernel's double accumulation of inputs exact in double."""
    g, _ = per_sample_grads(dy, x)
    squares = (g**2).sum(axis=(1, 2))
    k = g.shape[1] * g.shape[2]
    if bias:
        gb = f64(dy) if dy.ndim == 2 else f64(dy).sum(axis=1)
        squares = squares + (gb**2).sum(axis=1)
        k += gb.shape[1]
    steps = 1 if dy.ndim == 2 else dy.shape[1]
    norms = np.sqrt(squares)
    # every square and cross term is a product of sums of at most max(in, out, T) terms, added up in
    # fewer than k + T^2 steps; magnitudes at most those of |G_b| computed from |dY|, |X|
    mag = np.sqrt((per_sample_grads(np.abs(f64(dy)), np.abs(f64(x)))[0] ** 2).sum(axis=(1, 2)))
    terms = k + steps * steps + max(dy.shape[-1], x.shape[-1])
    return norms, 4 * terms * eps(np.float64) * (mag + norms) + 1e-300


def weighted_backward_weight(dy, x, s):
    """(dW, its bound, db, its bound) of the weighted sums (s * dy)^T x and s @ dy: the kernels
    round s * dy once, then sum as linear_backward_weight does."""
    e = eps(dy.dtype)
    sdy = f64(s)[:, None] * f64(dy)
    batch = dy.shape[0]
    dw = sdy.T @ f64(x)
    db = sdy.sum(axis=0)
    return dw, (batch + 2) * e * (np.abs(sdy).T @ np.abs(f64(x))), db, (batch + 2) * e * np.abs(sdy).sum(axis=0)


def mse(pred, target, reduction="mean"):
    """(loss or elementwise squares, bound) and (gradient, bound)."""
    e = eps(pred.dtype)
    r = f64(pred) - f64(target)
    count = r.size
    r_bound = e * np.abs(r)  # the residual is formed in the input dtype
    squares = r * r
    sq_bound = 3 * e * squares
    if reduction == "none":
        loss, loss_bound = squares, sq_bound
    else:
        # the squares are summed in double: count roundings of at most eps(float64) * the sum
        loss = squares.sum()
        loss_bound = (4 * e + (count + 1) * eps(np.float64)) * squares.sum() + 1e-300
        if reduction == "mean":
            loss, loss_bound = loss / max(count, 1) if count else np.nan, loss_bound / max(count, 1)
    scale = 2.0 / count if reduction == "mean" and count else 2.0
    grad = scale * r
    grad_bound = scale * r_bound + 2 * e * np.abs(grad)
    return loss, loss_bound, grad, grad_bound


def linear_mse(x, w, b, t, reduction="mean"):
    """The fused step: loss, dX, dW, db with their bounds, following the error through y -> dY."""
    e = eps(x.dtype)
    y, y_bound = linear_forward(x, w, b)
    r = y - f64(t)
    count = r.size
    scale = 2.0 / count if reduction == "mean" and count else 2.0
    r_bound = y_bound + e * (np.abs(y) + np.abs(f64(t)))
    dy = scale * r
    dy_bound = scale * r_bound + e * np.abs(dy)
    loss = (r * r).sum()
    loss_bound = (2 * np.abs(r) * r_bound).sum() + (4 * e + (count + 1) * eps(np.float64)) * loss
    if reduction == "mean":
        loss, loss_bound = (loss / count, loss_bound / count) if count else (np.nan, 0.0)
    batch = x.shape[0]
    out = w.shape[0]
    dx = dy @ f64(w)
    dx_bound = dy_bound @ np.abs(f64(w)) + (out + 1) * e * (np.abs(dy) @ np.abs(f64(w)))
    dw = dy.T @ f64(x)
    dw_bound = dy_bound.T @ np.abs(f64(x)) + (batch + 1) * e * (np.abs(dy).T @ np.abs(f64(x)))
    db = dy.sum(axis=0)
    db_bound = dy_bound.sum(axis=0) + (batch + 1) * e * np.abs(dy).sum(axis=0)
    return (loss, loss_bound), (dx, dx_bound), (dw, dw_bound), (db, db_bound)


# ---------------------------------------------------------------------------------------------
# Whole networks (kernels.mlp_forward, mlp_mse). The bounds carry each layer's error forward to the
# next (through the activation's Lipschitz constant) and back (through act' and, for the error in
# the saved pre-activation, a bound on act''). Kinks (ReLU, LeakyReLU at 0) are not bounded this way:
# tests run them in float64, where a pre-activation within rounding of 0 does not occur.

_erf = np.vectorize(__import__("math").erf, otypes=[np.float64])


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _activation(name, slope):
    """(act, act', Lipschitz constant of act, bound on |act''|) in float64."""
    c = np.sqrt(2.0 / np.pi)
    table = {
        "identity": (lambda z: z, lambda z: np.ones_like(z), 1.0, 0.0),
        "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64), 1.0, 0.0),
        "leaky_relu": (
            lambda z: np.where(z > 0, z, slope * z),
            lambda z: np.where(z > 0, 1.0, slope),
            max(1.0, abs(slope)),
            0.0,
        ),
        "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2, 1.0, 1.0),
        "sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1.0 - _sigmoid(z)), 0.25, 1.0),
        "gelu": (
            lambda z: 0.5 * z * (1.0 + _erf(z / np.sqrt(2.0))),
            lambda z: 0.5 * (1.0 + _erf(z / np.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi),
            1.2,
            1.0,
        ),
        "gelu_tanh": (
            lambda z: 0.5 * z * (1.0 + np.tanh(c * (z + 0.044715 * z**3))),
            lambda z: (
                0.5 * (1.0 + np.tanh(c * (z + 0.044715 * z**3)))
                + 0.5 * z * (1.0 - np.tanh(c * (z + 0.044715 * z**3)) ** 2) * c * (1.0 + 3 * 0.044715 * z * z)
            ),
            1.2,
            1.0,
        ),
        "silu": (lambda z: z * _sigmoid(z), lambda z: _sigmoid(z) * (1.0 + z * (1.0 - _sigmoid(z))), 1.2, 1.0),
    }
    return table[name]


def _mlp_forward(x, weights, biases, activations, slopes):
    """Every layer's (z, z bound, h, h bound) and the activations' tables, in float64."""
    e = eps(x.dtype)
    h, h_bound = f64(x), np.zeros(x.shape)
    layers = []
    for w, b, name, slope in zip(weights, biases, activations, slopes):
        act, dact, lip, _ = _activation(name, slope)
        w64 = f64(w)
        z = h @ w64.T
        magnitude = np.abs(h) @ np.abs(w64).T
        if b is not None:
            z, magnitude = z + f64(b), magnitude + np.abs(f64(b))
        z_bound = h_bound @ np.abs(w64).T + (w.shape[1] + 2) * e * magnitude
        h = act(z)
        h_bound = lip * z_bound + 4 * e * np.abs(h)  # the activation's own rounding: a few ulps
        layers.append((z, z_bound, h, h_bound))
    return layers


def mlp_forward(x, weights, biases, activations, slopes=None):
    """The network's output in float64 and the bound on the fast result's error."""
    slopes = slopes or [0.01] * len(weights)
    biases = biases if biases is not None else [None] * len(weights)
    _, _, y, y_bound = _mlp_forward(x, weights, biases, activations, slopes)[-1]
    return y, y_bound


def mlp_mse(x, weights, biases, activations, target, reduction="mean", slopes=None):
    """The whole step: (loss, bound), (dX, bound), [(dW_l, bound)], [(db_l, bound) or None]."""
    e = eps(x.dtype)
    slopes = slopes or [0.01] * len(weights)
    biases = biases if biases is not None else [None] * len(weights)
    layers = _mlp_forward(x, weights, biases, activations, slopes)
    z, z_bound, y, y_bound = layers[-1]
    r = y - f64(target)
    count = r.size
    scale = 2.0 / count if reduction == "mean" and count else 2.0
    r_bound = y_bound + e * (np.abs(y) + np.abs(f64(target)))
    loss = (r * r).sum()
    loss_bound = (2 * np.abs(r) * r_bound).sum() + (4 * e + (count + 1) * eps(np.float64)) * loss
    if reduction == "mean":
        loss, loss_bound = (loss / count, loss_bound / count) if count else (np.nan, 0.0)
    _, dact, _, curve = _activation(activations[-1], slopes[-1])
    dz = scale * r * dact(z)
    dz_bound = scale * (r_bound * np.abs(dact(z)) + np.abs(r) * curve * z_bound) + 3 * e * np.abs(dz)
    batch = x.shape[0]
    grad_w, grad_b = [None] * len(weights), [None] * len(weights)
    for layer in range(len(weights) - 1, -1, -1):
        h, h_bound = (f64(x), np.zeros(x.shape)) if layer == 0 else layers[layer - 1][2:]
        w64 = np.abs(f64(weights[layer]))
        grad_w[layer] = (
            dz.T @ h,
            dz_bound.T @ np.abs(h) + np.abs(dz).T @ h_bound + (batch + 1) * e * (np.abs(dz).T @ np.abs(h)),
        )
        if biases[layer] is not None:
            grad_b[layer] = (dz.sum(axis=0), dz_bound.sum(axis=0) + (batch + 1) * e * np.abs(dz).sum(axis=0))
        dh = dz @ f64(weights[layer])
        dh_bound = dz_bound @ w64 + (weights[layer].shape[0] + 1) * e * (np.abs(dz) @ w64)
        if layer == 0:
            return (loss, loss_bound), (dh, dh_bound), grad_w, grad_b
        z, z_bound = layers[layer - 1][:2]
        _, dact, _, curve = _activation(activations[layer - 1], slopes[layer - 1])
        dz = dh * dact(z)
        dz_bound = dh_bound * np.abs(dact(z)) + np.abs(dh) * curve * z_bound + 3 * e * np.abs(dz)
    raise AssertionError("unreachable")


def _errors(got, want, bound):
    """|got - want| elementwise (0 where both are NaN) and the bound broadcast to its shape, for
    got and want of one shape (in float64)."""
    both_nan = np.isnan(got) & np.isnan(want)
    err = np.where(both_nan, 0.0, np.abs(got - want))
    return err, np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)


def error_ratio(got, want, bound) -> float:
    """The worst |got - want| / bound over all elements: <= 1 means within the bound (0 / 0 and
    NaN where want is NaN count as 0; an error where the bound is 0 is inf, as is a shape mismatch)."""
    got = f64(got)
    want = f64(want)
    if got.shape != want.shape:
        return float("inf")
    err, bound = _errors(got, want, bound)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound)  # err > 0 with bound 0 is inf
    ratio = np.where(np.isnan(ratio), np.inf, ratio)  # NaN against a number
    return float(ratio.max()) if ratio.size else 0.0


def assert_within(got, want, bound, name="result"):
    """|got - want| <= bound elementwise (NaN where want is NaN), with a helpful message."""
    got = f64(got)
    want = f64(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err, bound = _errors(got, want, bound)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape) if err.ndim else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.size} elements outside the error bound; worst at {i}: "
            f"got {got[i]!r}, want {want[i]!r}, error {err[i]:.3g} > bound {bound[i]:.3g}"
        )

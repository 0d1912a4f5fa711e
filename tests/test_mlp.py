"""Whole networks in one call: lingrad.kernels.mlp_forward / mlp_backward / mlp_mse against the
float64 reference with propagated bounds (lingrad.reference.mlp_*), every activation, layouts,
thread counts; and lingrad.fuse / FusedMLP against the torch.nn.Sequential they replace."""

from __future__ import annotations

import numpy as np
import pytest

from lingrad import kernels
from lingrad import reference as ref

ACTIVATIONS = ["identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu"]
SMOOTH = ["identity", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu"]  # no kink: float32 bounds hold


def network(rng, widths, dtype, bias=(True, False, True)):
    weights = [(rng.standard_normal((b, a)) / np.sqrt(a)).astype(dtype) for a, b in zip(widths, widths[1:])]
    biases = [rng.standard_normal(b).astype(dtype) if bias[i % len(bias)] else None for i, b in enumerate(widths[1:])]
    return weights, biases


def check_step(x, weights, biases, acts, t, reduction="mean", slopes=None):
    loss, gx, gw, gb = kernels.mlp_mse(x, weights, biases, acts, t, reduction, negative_slopes=slopes)
    (want_loss, loss_bound), (want_gx, gx_bound), want_gw, want_gb = ref.mlp_mse(
        x, weights, biases, acts, t, reduction, slopes
    )
    ref.assert_within(loss, want_loss, loss_bound, "loss")
    ref.assert_within(gx, want_gx, gx_bound, "grad_input")
    for layer, (got, (want, bound)) in enumerate(zip(gw, want_gw)):
        ref.assert_within(got, want, bound, f"grad_weights[{layer}]")
    for layer, (got, want) in enumerate(zip(gb, want_gb)):
        assert (got is None) == (want is None)
        if got is not None:
            ref.assert_within(got, want[0], want[1], f"grad_biases[{layer}]")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_against_the_reference(act, dtype, isa):
    if act not in SMOOTH and dtype == np.float32:
        pytest.skip("a kink within float32 rounding of 0 has no first-order bound (float64 runs it)")
    rng = np.random.default_rng(1)
    weights, biases = network(rng, [7, 33, 17, 3], dtype)
    x, t = rng.standard_normal((41, 7)).astype(dtype), rng.standard_normal((41, 3)).astype(dtype)
    acts = [act, act, "identity"]
    slopes = [0.2, -0.3, 0.01] if act == "leaky_relu" else None  # a negative slope keeps the pre-activation
    y = kernels.mlp_forward(x, weights, biases, acts, negative_slopes=slopes)
    ref.assert_within(y, *ref.mlp_forward(x, weights, biases, acts, slopes), "y")
    check_step(x, weights, biases, acts, t, "mean", slopes)
    check_step(x, weights, biases, [act] * 3, t, "sum", slopes)  # an activation on the output too


@pytest.mark.parametrize(
    "shape",
    [(1, [8, 64, 64, 2]), (64, [784, 50, 1]), (300, [32, 128, 128, 1]), (0, [5, 4, 3])],
    ids=["batch 1", "lesson", "tabular", "empty batch"],
)
def test_shapes_of_the_target_models(shape):
    batch, widths = shape
    rng = np.random.default_rng(2)
    weights, biases = network(rng, widths, np.float64, bias=(True,))
    x, t = rng.standard_normal((batch, widths[0])), rng.standard_normal((batch, widths[-1]))
    acts = ["relu"] * (len(widths) - 2) + ["identity"]
    ref.assert_within(kernels.mlp_forward(x, weights, biases, acts), *ref.mlp_forward(x, weights, biases, acts))
    if batch:
        check_step(x, weights, biases, acts, t)
    else:
        loss, gx, gw, gb = kernels.mlp_mse(x, weights, biases, acts, t)
        assert np.isnan(loss) and gx.shape == (0, widths[0]) and all(not g.any() for g in gw + gb)


def test_backward_matches_the_fused_step():
    """mlp_forward(save=True) + mlp_backward of dY = 2 (y - t) / N gives mlp_mse's gradients."""
    rng = np.random.default_rng(3)
    cases = [  # activations, and which layers keep their pre-activation for backward
        (["gelu", "relu", "sigmoid"], [True, False, False]),
        (["silu", "leaky_relu", "identity"], [True, True, False]),  # a negative slope: the output says too little
    ]
    for acts, keeps_pre in cases:
        weights, biases = network(rng, [6, 20, 10, 4], np.float64)
        x, t = rng.standard_normal((25, 6)), rng.standard_normal((25, 4))
        slopes = [0.01, -0.5, 0.01]
        y, hidden, pre = kernels.mlp_forward(x, weights, biases, acts, negative_slopes=slopes, save=True)
        assert [p is not None for p in pre] == keeps_pre
        gx, gw, gb = kernels.mlp_backward(
            2 * (y - t) / y.size, x, weights, biases, acts, y, hidden, pre, negative_slopes=slopes
        )
        _, fx, fw, fb = kernels.mlp_mse(x, weights, biases, acts, t, negative_slopes=slopes)
        np.testing.assert_allclose(gx, fx, rtol=1e-12, atol=1e-15)
        for a, b in zip(gw + [g for g in gb if g is not None], fw + [g for g in fb if g is not None]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_layouts_and_threads_give_the_same_bits(num_threads):
    rng = np.random.default_rng(4)
    weights, biases = network(rng, [96, 130, 70, 5], np.float32)
    x, t = rng.standard_normal((200, 96)).astype(np.float32), rng.standard_normal((200, 5)).astype(np.float32)
    acts = ["gelu", "tanh", "identity"]
    num_threads(1)
    base = kernels.mlp_mse(x, weights, biases, acts, t)
    for threads in (2, 3):
        num_threads(threads)
        for xs, ws in ((x, weights), (np.asfortranarray(x), [np.asfortranarray(w) for w in weights])):
            got = kernels.mlp_mse(xs, ws, biases, acts, t)
            assert got[0] == base[0]
            for a, b in zip([got[1], *got[2]], [base[1], *base[2]]):
                assert a.tobytes() == b.tobytes()


def test_errors_name_the_argument():
    x = np.zeros((4, 3))
    w = [np.zeros((5, 3)), np.zeros((2, 5))]
    with pytest.raises(ValueError, match=r"weights\[1\] has shape \(2, 4\) but its layer's input has 5 features"):
        kernels.mlp_forward(x, [w[0], np.zeros((2, 4))], None, ["relu", "identity"])
    with pytest.raises(ValueError, match=r"activations\[0\] must be one of 'identity', 'relu'.*got 'swish'"):
        kernels.mlp_forward(x, w, None, ["swish", "identity"])
    with pytest.raises(ValueError, match="activations has 1 entries but there are 2 layers"):
        kernels.mlp_forward(x, w, None, ["relu"])
    with pytest.raises(TypeError, match=r"weights\[1\] has dtype float32 but x has dtype float64"):
        kernels.mlp_forward(x, [w[0], w[1].astype(np.float32)], None, ["relu", "identity"])
    with pytest.raises(ValueError, match=r"biases\[0\] has shape \(4,\)"):
        kernels.mlp_forward(x, w, [np.zeros(4), None], ["relu", "identity"])
    with pytest.raises(ValueError, match=r"target has shape \(4, 3\) but must be \(batch, out_features\) = \(4, 2\)"):
        kernels.mlp_mse(x, w, None, ["relu", "identity"], np.zeros((4, 3)))
    with pytest.raises(TypeError, match="weights must be a list"):
        kernels.mlp_forward(x, w[0], None, ["relu"])
    y, hidden, pre = kernels.mlp_forward(x, w, None, ["gelu", "identity"], save=True)
    with pytest.raises(ValueError, match=r"pre\[0\] is None but its layer's activation needs the pre-activation"):
        kernels.mlp_backward(y, x, w, None, ["gelu", "identity"], y, hidden, [None, None])
    with pytest.raises(ValueError, match=r"hidden\[0\] has shape \(4, 4\) but must be \(4, 5\)"):
        kernels.mlp_backward(y, x, w, None, ["gelu", "identity"], y, [np.zeros((4, 4))], pre)


# ---------------------------------------------------------------------------------------------
# lingrad.fuse and FusedMLP


torch = pytest.importorskip("torch")
import copy  # noqa: E402
import warnings  # noqa: E402

import torch.nn.functional as F  # noqa: E402

import lingrad  # noqa: E402
from lingrad import functional as LF  # noqa: E402
from lingrad.torch import _bridge  # noqa: E402

D = torch.float64
MODULES = {
    "relu": torch.nn.ReLU,
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.2),
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "gelu": torch.nn.GELU,
    "gelu_tanh": lambda: torch.nn.GELU("tanh"),
    "silu": torch.nn.SiLU,
    "identity": torch.nn.Identity,
}


def sequential(act="relu", widths=(8, 16, 12, 2), dtype=D, bias=True, last=None):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b, bias=bias, dtype=dtype))
        if i < len(widths) - 2:
            layers.append(MODULES[act]())
    if last:
        layers.append(MODULES[last]())
    return torch.nn.Sequential(*layers)


def grads(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_fused_mlp_matches_the_sequential(act):
    reference = sequential(act, last="sigmoid")
    fused, fused_mse = lingrad.fuse(copy.deepcopy(reference)), lingrad.fuse(copy.deepcopy(reference), loss="mse")
    x, t = torch.randn(20, 8, dtype=D), torch.randn(20, 2, dtype=D)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    y, y_ref = fused(xs[0]), reference(xs[1])
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    assert all(torch.allclose(a, b) for a, b in zip(grads(fused), grads(reference)))
    reference.zero_grad()
    loss, loss_ref = fused_mse(xs[2], t), F.mse_loss(reference(xs[1].detach().requires_grad_()), t)
    torch.testing.assert_close(loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    assert all(torch.allclose(a, b) for a, b in zip(grads(fused_mse), grads(reference)))


def test_fuse_keeps_parameters_state_dict_and_optimizer():
    model = sequential("relu")
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fused = lingrad.fuse(model, loss="mse")
    assert all(a is b for a, b in zip(fused.parameters(), params))
    assert fused.state_dict().keys() == model.state_dict().keys()
    reference = copy.deepcopy(model)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, t = torch.randn(10, 8, dtype=D), torch.randn(10, 2, dtype=D)
    for _ in range(3):
        for opt, step in ((optimizer, lambda: fused(x, t)), (ref_optimizer, lambda: F.mse_loss(reference(x), t))):
            opt.zero_grad()
            step().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    fresh = sequential("relu")
    fresh.load_state_dict(fused.state_dict())  # checkpoints load both ways
    fused.load_state_dict(reference.state_dict())


def test_fused_mlp_from_widths():
    torch.manual_seed(0)
    model = lingrad.FusedMLP([784, 50, 1], activation="relu", loss="mse")
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.ReLU(), torch.nn.Linear(50, 1))
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))  # nn.Linear's init
    x, t = torch.rand(64, 784), torch.randn(64, 1)
    torch.testing.assert_close(model(x, t), F.mse_loss(reference(x), t))
    assert "loss='mse'" in repr(model)


def test_fuse_rejects_other_layers_naming_them():
    with pytest.raises(TypeError, match="layer 1 is Dropout"):
        lingrad.fuse(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(), torch.nn.Linear(4, 1)))
    with pytest.raises(TypeError, match=r"layer 0 \(ReLU\) comes before the first Linear"):
        lingrad.fuse(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(4, 1)))
    with pytest.raises(TypeError, match=r"layer 2 \(Tanh\) follows another activation"):
        lingrad.fuse(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Tanh()))
    with pytest.raises(TypeError, match="must be a torch.nn.Sequential"):
        lingrad.fuse(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="loss must be None or 'mse'"):
        lingrad.fuse(sequential(), loss="l1")
    model = lingrad.fuse(sequential(), loss="mse")
    with pytest.raises(TypeError, match=r"call it with \(input, target\)"):
        model(torch.randn(2, 8, dtype=D))


def test_gradcheck_and_gradgradcheck():
    model = lingrad.fuse(sequential("gelu", widths=(3, 5, 2)))
    mse = lingrad.fuse(sequential("tanh", widths=(3, 5, 2)), loss="mse")
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    t = torch.randn(4, 2, dtype=D)
    assert torch.autograd.gradcheck(lambda x: model(x), (x,))
    assert torch.autograd.gradgradcheck(lambda x: model(x), (x,))
    assert torch.autograd.gradcheck(lambda x: mse(x, t), (x,))
    assert torch.autograd.gradgradcheck(lambda x: mse(x, t), (x,))


def test_no_grad_is_one_native_call(monkeypatch):
    calls = []
    for name in ("mlp_forward", "mlp_mse", "mlp_backward", "linear_forward"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _k=kernel, _n=name, **kw: calls.append((_n, kw.get("save"))) or _k(*a, **kw)
        )
    model = lingrad.fuse(sequential("relu"))
    x = torch.randn(5, 8, dtype=D)
    with torch.no_grad():
        model(x)
    with torch.inference_mode():
        model(x)
    assert calls == [("mlp_forward", None), ("mlp_forward", None)]  # nothing saved
    calls.clear()
    model(x.requires_grad_()).sum().backward()
    assert calls == [("mlp_forward", True), ("mlp_backward", None)]  # one call each way


def test_leading_dims_no_bias_and_torch_func():
    reference = sequential("silu", bias=False)
    model = lingrad.fuse(copy.deepcopy(reference))
    x = torch.randn(2, 3, 8, dtype=D)
    torch.testing.assert_close(model(x), reference(x))
    # torch.func runs the layers one by one (each through lingrad's operators' rules)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = lambda m: lambda p, x: torch.func.functional_call(m, p, (x,)).square().sum()  # noqa: E731
    got = torch.func.vmap(torch.func.grad(loss(model)), in_dims=(None, 0))(params, x)
    want = torch.func.vmap(torch.func.grad(loss(reference)), in_dims=(None, 0))(params, x)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.filterwarnings(
    r"ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning"
)
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    reference = sequential("relu", dtype=torch.float32)
    model = lingrad.fuse(copy.deepcopy(reference), loss="mse")
    step = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, t = torch.randn(6, 8), torch.randn(6, 2)
    loss = step(x, t)
    torch.testing.assert_close(loss, F.mse_loss(reference(x), t))
    loss.backward()
    F.mse_loss(reference(x), t).backward()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(model), grads(reference)))


def test_other_dtypes_fall_back(monkeypatch):
    monkeypatch.setattr(_bridge, "fallback_warned", False)
    reference = sequential("relu", dtype=torch.float16)
    model = lingrad.fuse(copy.deepcopy(reference))
    x = torch.randn(4, 8, dtype=torch.float16)
    with pytest.warns(LF.FallbackWarning):
        y = model(x)
    assert torch.equal(y, reference(x))


def test_bfloat16_runs_layer_by_layer_on_lingrads_products():
    pytest.importorskip("ml_dtypes")
    reference = sequential("relu", dtype=torch.bfloat16)  # torch.nn.Linear layers
    model = lingrad.fuse(copy.deepcopy(reference))
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FallbackWarning
        y = model(x)
    h = x
    for m in reference:
        h = LF.linear(h, m.weight, m.bias) if isinstance(m, torch.nn.Linear) else m(h)
    assert y.dtype == torch.bfloat16 and torch.equal(y, h)


def test_retain_graph_and_no_aliasing():
    model = lingrad.fuse(sequential("tanh"), loss="mse")
    x, t = torch.randn(6, 8, dtype=D), torch.randn(6, 2, dtype=D)
    loss = model(x, t)
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
        assert a.data_ptr() != b.data_ptr()


def test_one_list_of_activations():
    # The kernels' names (kActivationNames beside the C++ enum, exported as lingrad._C.ACTIVATIONS) are
    # the ones FusedMLP builds and fuse recognises.
    from lingrad import _C
    from lingrad.torch import mlp

    assert sorted(mlp._ACTIVATION_MODULES) == sorted(_C.ACTIVATIONS)
    for name in _C.ACTIVATIONS:
        module = mlp._ACTIVATION_MODULES[name]()
        assert mlp._activation_of(module)[0] == name

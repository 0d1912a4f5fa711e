"""lingrad under the PyTorch tools a user reaches for: torch.func transforms, forward-mode AD, autocast,
type promotion, hooks, checkpointing, parametrizations, compile with dynamic shapes, export in a
fresh process, the profiler. Each case runs lingrad beside nn.Linear / F.mse_loss and compares.

Comparisons are in float64 unless the case is about another dtype: lingrad and PyTorch sum in
different orders, which in float64 differs by about K * 1e-16 relative for reductions of length K
(here K <= 8), far inside assert_close's float64 tolerance (1e-7) and far below any wrong term.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.autograd import forward_ad  # noqa: E402
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap  # noqa: E402

import lingrad  # noqa: E402
from lingrad import functional as LF  # noqa: E402
from lingrad import kernels  # noqa: E402
from lingrad.torch import _bridge, ops_linear, ops_mse  # noqa: E402

D = torch.float64

# PyTorch's own code warns on first use of forward-mode AD and of torch.compile (it calls
# torch.jit.script and instantiates torch.autograd.Function internally); neither comes from lingrad.
# (torch.jit's warning is a DeprecationWarning in 2.13, a FutureWarning from 2.14: Warning matches both.)
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`torch.jit.script` is deprecated:Warning"),
    pytest.mark.filterwarnings(r"ignore:`torch.jit.script_method` is deprecated:Warning"),
    pytest.mark.filterwarnings(
        r"ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning"
    ),
]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(20261202)


def pair(in_features=4, out_features=3, bias=True, dtype=D):
    """lingrad.Linear and nn.Linear with the same parameters."""
    ours = lingrad.Linear(in_features, out_features, bias=bias, dtype=dtype)
    theirs = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def assert_trees_close(got, want, **kwargs):
    got_leaves, want_leaves = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for a, b in zip(got_leaves, want_leaves):
        torch.testing.assert_close(a, b, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.func and forward-mode AD: lingrad.Linear, the fused LinearMSELoss, the operators

TRANSFORMS = {
    "grad": lambda f, p, x, t: grad(f)(p, x, t),
    "vmap(grad) per sample": lambda f, p, x, t: vmap(grad(f), in_dims=(None, 0, 0))(p, x.unsqueeze(1), t.unsqueeze(1)),
    "jacrev": lambda f, p, x, t: jacrev(f)(p, x, t),
    "jacfwd": lambda f, p, x, t: jacfwd(f)(p, x, t),
    "hessian": lambda f, p, x, t: hessian(f)(p, x, t),
    "jacrev wrt input": lambda f, p, x, t: jacrev(f, argnums=1)(p, x, t),
    "hessian wrt input": lambda f, p, x, t: hessian(f, argnums=1)(p, x, t),
    "jvp": lambda f, p, x, t: jvp(lambda x: f(p, x, t), (x,), (torch.ones_like(x),)),
    "vmap(jacfwd)": lambda f, p, x, t: vmap(jacfwd(f, argnums=1), in_dims=(None, 0, 0))(p, x, t),
    "grad of grad": lambda f, p, x, t: grad(lambda x: grad(f, argnums=1)(p, x, t).square().sum())(x),
}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("module", ["Linear", "LinearMSELoss"])
def test_torch_func_transforms_match_nn_linear(module, transform):
    ours, theirs = pair()
    x, t = torch.randn(6, 4, dtype=D), torch.randn(6, 3, dtype=D)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    if module == "Linear":
        loss = lambda p, x, t: F.mse_loss(functional_call(ours, p, (x,)), t)  # noqa: E731
    else:
        head = lingrad.LinearMSELoss(4, 3, dtype=D)
        loss = lambda p, x, t: functional_call(head, p, (x, t))  # noqa: E731
    reference = lambda p, x, t: F.mse_loss(functional_call(theirs, p, (x,)), t)  # noqa: E731
    assert_trees_close(TRANSFORMS[transform](loss, params, x, t), TRANSFORMS[transform](reference, params, x, t))


def test_vmap_over_a_batch_runs_one_kernel_call(monkeypatch):
    """vmap of a layer over a batch of inputs: the kernel takes all the rows at once."""
    calls = []
    forward = kernels.linear_forward

    def recorded(*args, **kwargs):
        y = forward(*args, **kwargs)
        calls.append(y.shape)
        return y

    monkeypatch.setattr(kernels, "linear_forward", recorded)
    ours, theirs = pair()
    x = torch.randn(5, 2, 4, dtype=D)
    torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x))
    assert calls == [(10, 3)]  # all 5 x 2 rows in one call


def test_vmap_over_weights_matches(monkeypatch):
    """A batch of weights (an ensemble) goes through batched matmul and agrees."""
    x = torch.randn(3, 4, dtype=D)
    w, b = torch.randn(5, 2, 4, dtype=D), torch.randn(5, 2, dtype=D)
    torch.testing.assert_close(
        vmap(LF.linear, in_dims=(None, 0, 0))(x, w, b), vmap(F.linear, in_dims=(None, 0, 0))(x, w, b)
    )


def test_forward_mode_ad_with_dual_tensors():
    ours, theirs = pair()
    head = lingrad.LinearMSELoss(4, 3, dtype=D)
    head.load_state_dict(ours.state_dict())
    x, t, tangent = torch.randn(6, 4, dtype=D), torch.randn(6, 3, dtype=D), torch.randn(6, 4, dtype=D)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        y, y_ref = forward_ad.unpack_dual(ours(dual)), forward_ad.unpack_dual(theirs(dual))
        torch.testing.assert_close(y.primal, y_ref.primal)
        torch.testing.assert_close(y.tangent, y_ref.tangent)
        loss = forward_ad.unpack_dual(head(dual, t)).tangent
        torch.testing.assert_close(loss, forward_ad.unpack_dual(F.mse_loss(theirs(dual), t)).tangent)


def test_jacobian_vectorized_uses_the_legacy_vmap():
    ours, theirs = pair()
    x = torch.randn(3, 4, dtype=D)
    for vectorize in (False, True):
        torch.testing.assert_close(
            torch.autograd.functional.jacobian(ours, x, vectorize=vectorize),
            torch.autograd.functional.jacobian(theirs, x, vectorize=vectorize),
        )


# The operators themselves, against their definitions in PyTorch ops.
OPERATORS = {
    "linear": (lambda x, w, b, g: ops_linear.linear.overload(x, w, b), lambda x, w, b, g: F.linear(x, w, b)),
    "linear_backward_input": (
        lambda x, w, b, g: ops_linear.linear_backward_input.overload(g, w),
        lambda x, w, b, g: g @ w,
    ),
    "linear_backward_weight": (
        lambda x, w, b, g: ops_linear.linear_backward_weight.overload(g, x, True),
        lambda x, w, b, g: (g.T @ x, g.sum(0)),
    ),
    "mse_loss": (
        lambda x, w, b, g: ops_mse.mse_loss.overload(x @ w.T, g, "mean"),
        lambda x, w, b, g: F.mse_loss(x @ w.T, g),
    ),
    "mse_backward": (
        lambda x, w, b, g: ops_mse.mse_backward.overload(x @ w.T, g, "sum"),
        lambda x, w, b, g: 2 * (x @ w.T - g),
    ),
    "linear_mse": (
        lambda x, w, b, g: ops_mse.linear_mse.overload(x, w, b, g, "mean", True)[0],
        lambda x, w, b, g: F.mse_loss(F.linear(x, w, b), g),
    ),
}


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "hessian", "vmap"])
@pytest.mark.parametrize("name", OPERATORS)
def test_torch_func_on_the_operators(name, transform):
    ours, theirs = OPERATORS[name]
    x, w, b, g = (
        torch.randn(5, 4, dtype=D),
        torch.randn(3, 4, dtype=D),
        torch.randn(3, dtype=D),
        torch.randn(5, 3, dtype=D),
    )

    def scalar(op):
        return lambda w: sum(o.square().sum() for o in torch.utils._pytree.tree_leaves(op(x, w, b, g)))

    if transform == "vmap":
        batched = lambda op: vmap(lambda x, g: op(x, w, b, g))(x.unsqueeze(1), g.unsqueeze(1))  # noqa: E731
        assert_trees_close(batched(ours), batched(theirs))
        return
    apply = {"grad": grad, "jacrev": jacrev, "jacfwd": jacfwd, "hessian": hessian}[transform]
    assert_trees_close(apply(scalar(ours))(w), apply(scalar(theirs))(w))


# ---------------------------------------------------------------------------------------------
# autocast, type promotion, broadcasting, overflow


@pytest.fixture
def fresh_fallback_warning(monkeypatch):
    monkeypatch.setattr(_bridge, "fallback_warned", False)


def test_autocast_float16_gives_what_nn_linear_gives(fresh_fallback_warning):
    ours, theirs = pair(dtype=torch.float32)
    x = torch.randn(6, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.warns(LF.FallbackWarning, match="autocast to torch.float16"):
            y = ours(x)
        y_ref = theirs(x)
    assert y.dtype == y_ref.dtype == torch.float16
    assert torch.equal(y, y_ref)  # PyTorch's own computation under autocast
    y.float().sum().backward()
    (grad_w,) = torch.autograd.grad(y_ref.float().sum(), theirs.weight)
    assert ours.weight.grad.dtype == torch.float32 and torch.equal(ours.weight.grad, grad_w)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mixed_dtypes_promote_as_pytorch(reduction):
    pred = torch.randn(5, 3, requires_grad=True)  # float32
    target = torch.randn(5, 3, dtype=D)
    loss, loss_ref = LF.mse_loss(pred, target, reduction), F.mse_loss(pred, target, reduction=reduction)
    assert loss.dtype == loss_ref.dtype == D
    torch.testing.assert_close(loss, loss_ref)
    (g,) = torch.autograd.grad(loss.sum(), pred)
    # The gradient of the promoted loss, from pred promoted first: the same formula, which torch
    # 2.6-2.8's own mixed-dtype mse_loss backward fails to run ("Found dtype Double but expected Float").
    (g_ref,) = torch.autograd.grad(F.mse_loss(pred.to(D), target, reduction=reduction).sum(), pred)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, g_ref)


def test_fused_block_with_a_float64_target_promotes():
    ours, theirs = pair(dtype=torch.float32)
    head = lingrad.LinearMSELoss(4, 3)
    head.load_state_dict(ours.state_dict())
    x, t = torch.randn(6, 4), torch.randn(6, 3, dtype=D)
    loss, loss_ref = head(x, t), F.mse_loss(theirs(x).to(D), t)  # (promoted first: see the test above)
    assert loss.dtype == F.mse_loss(theirs(x), t).dtype == D
    torch.testing.assert_close(loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(head.weight.grad, theirs.weight.grad)


def test_broadcasting_target_warns_and_agrees():
    pred, target = torch.randn(5, 3, dtype=D, requires_grad=True), torch.randn(3, dtype=D, requires_grad=True)
    with pytest.warns(UserWarning, match="different to the input size"):
        loss = LF.mse_loss(pred, target)
    with pytest.warns(UserWarning, match="different to the input size"):
        loss_ref = F.mse_loss(pred, target)
    torch.testing.assert_close(loss, loss_ref)
    grads = torch.autograd.grad(loss, (pred, target))
    grads_ref = torch.autograd.grad(loss_ref, (pred, target))
    assert_trees_close(grads, grads_ref)


def test_float32_loss_beyond_range_is_inf_as_in_pytorch():
    pred, target = torch.full((4, 2), 3e38), torch.full((4, 2), -3e38)
    head = lingrad.LinearMSELoss(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    for loss, loss_ref in [
        (LF.mse_loss(pred, target), F.mse_loss(pred, target)),
        (LF.mse_loss(pred, target, "sum"), F.mse_loss(pred, target, reduction="sum")),
        (head(pred, target), F.mse_loss(F.linear(pred, head.weight, head.bias), target)),
    ]:
        assert torch.isinf(loss) and torch.isinf(loss_ref)


# ---------------------------------------------------------------------------------------------
# Tensors the kernels cannot read in place fall back to PyTorch


UNREADABLE = {
    "sparse COO": lambda x: x.to_sparse(),
    "nested": lambda x: torch.nested.nested_tensor([x[:2], x[2:]], layout=torch.jagged),
}


@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_inputs_fall_back(kind, fresh_fallback_warning):
    ours, theirs = pair()
    x = UNREADABLE[kind](torch.randn(5, 4, dtype=D))
    with pytest.warns(LF.FallbackWarning, match="once per process"):
        y = ours(x)
    y_ref = theirs(x)
    if y.is_nested:
        y, y_ref = torch.cat(y.unbind()), torch.cat(y_ref.unbind())
    torch.testing.assert_close(y.to_dense() if y.is_sparse else y, y_ref.to_dense() if y_ref.is_sparse else y_ref)


def test_negative_views_are_resolved(fresh_fallback_warning):
    ours, theirs = pair()
    x = torch._neg_view(torch.randn(5, 4, dtype=D))  # what conj() of a real-valued view chain can give
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # computed by lingrad, no FallbackWarning
        y = ours(x)
    torch.testing.assert_close(y, theirs(x))
    torch.testing.assert_close(ops_linear.linear.overload(x, ours.weight, ours.bias), theirs(x))


# ---------------------------------------------------------------------------------------------
# Results are ordinary tensors; gradients never alias; only needed tensors are saved


def test_outputs_are_resizable_and_usable_as_out():
    ours, theirs = pair()
    x = torch.randn(5, 4, dtype=D)
    with torch.no_grad():
        for y in (ours(x), LF.mse_loss(x, x, "none"), theirs(x)):
            y.resize_(0)
            torch.add(x, 1, out=y)  # out= resizes an empty tensor
            assert y.shape == x.shape
            y.resize_(30, 30)  # beyond its storage
    for tensor in (x, ours.weight, ours.bias):  # nor does lingrad fix the inputs' storage
        tensor.detach().resize_(50, 50)


def test_returned_gradients_never_alias():
    head = lingrad.LinearMSELoss(4, 3, dtype=D)
    x, t = torch.randn(5, 4, dtype=D, requires_grad=True), torch.randn(5, 3, dtype=D, requires_grad=True)
    loss = head(x, t)
    first = torch.autograd.grad(loss, (x, head.weight, head.bias, t), retain_graph=True)
    second = torch.autograd.grad(loss, (x, head.weight, head.bias, t))
    for a, b in zip(first, second):
        assert a.data_ptr() != b.data_ptr()
        torch.testing.assert_close(a, b)
        before = b.clone()
        a.add_(1.0)  # changing one result changes no other
        assert torch.equal(b, before)


INPLACE = {  # which tensor is updated in place after the forward pass, which need gradients
    "bias, everything trained": ("bias", (True, True, True)),
    "x, only x trained": ("x", (True, False, False)),
    "weight, only the weight trained": ("weight", (False, True, True)),
    "bias, only x trained": ("bias", (True, False, False)),
    "target, everything trained": ("target", (True, True, True)),
    "target, only the weight trained": ("target", (False, True, True)),
}


@pytest.mark.parametrize("case", INPLACE)
def test_inplace_update_after_forward_behaves_as_pytorch(case):
    """nn.Linear + F.mse_loss save x if the weight needs a gradient and the weight if x does, never
    the bias, and F.mse_loss saves the target; where PyTorch allows an in-place update before
    backward, lingrad allows it and computes the same gradients; where PyTorch raises, so does
    lingrad."""
    which, (need_x, need_w, need_b) = INPLACE[case]
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        x, w, b, t = (
            torch.randn(5, 4, dtype=D),
            torch.randn(3, 4, dtype=D),
            torch.randn(3, dtype=D),
            torch.randn(5, 3, dtype=D),
        )
        for tensor, need in zip((x, w, b), (need_x, need_w, need_b)):
            tensor.requires_grad_(need)
        leaf = {"x": x, "weight": w, "bias": b, "target": t}[which]
        loss = LF.linear_mse_loss(x, w, b, t) if fused else F.mse_loss(F.linear(x, w, b), t)
        with torch.no_grad():
            leaf.add_(1.0)
        try:
            loss.backward()
            results.append(("ok", [None if a.grad is None else a.grad.clone() for a in (x, w, b)]))
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e)
            results.append(("raised", None))
    (ours, ours_grads), (theirs, their_grads) = results
    assert ours == theirs
    if ours == "ok":
        assert_trees_close(ours_grads, their_grads)


# ---------------------------------------------------------------------------------------------
# Modules: LazyLinear, hooks, checkpointing, parametrizations


def test_swap_linear_on_a_lazy_linear():
    model = torch.nn.Sequential(torch.nn.LazyLinear(3, dtype=D), torch.nn.ReLU())
    lingrad.swap_linear(model)
    x = torch.randn(5, 4, dtype=D)
    y = model(x)
    assert type(model[0]) is lingrad.Linear
    torch.testing.assert_close(y, torch.relu(F.linear(x, model[0].weight, model[0].bias)))


def test_hooks_see_what_nn_linear_hooks_see():
    ours, theirs = pair()
    seen = {"ours": [], "theirs": []}
    for name, m in (("ours", ours), ("theirs", theirs)):
        m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(("pre", args[0].clone())))
        m.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(("fwd", out.clone())))
        m.register_full_backward_hook(
            lambda mod, gin, gout, name=name: seen[name].append(("bwd", gin[0].clone(), gout[0].clone()))
        )
        m.weight.register_hook(lambda g, name=name: seen[name].append(("weight grad", g.clone())))
    x = torch.randn(5, 4, dtype=D, requires_grad=True)
    for m in (ours, theirs):
        m(x).square().sum().backward()
    assert [s[0] for s in seen["ours"]] == [s[0] for s in seen["theirs"]]
    for a, b in zip(seen["ours"], seen["theirs"]):
        assert_trees_close(a[1:], b[1:])


def test_activation_checkpointing():
    ours, theirs = pair()
    x = torch.randn(5, 4, dtype=D, requires_grad=True)
    grads = []
    for m in (ours, theirs):
        for reentrant in (False, True):
            x.grad = None
            m.zero_grad()
            y = torch.utils.checkpoint.checkpoint(lambda x, m=m: torch.tanh(m(x)), x, use_reentrant=reentrant)
            y.sum().backward()
            grads.append((x.grad.clone(), m.weight.grad.clone()))
    for g in grads[1:]:
        assert_trees_close(g, grads[0])


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "spectral_norm", "custom"])
def test_parametrizations(kind):
    class Symmetric(torch.nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).T

    modules = pair(4, 4)
    for m in modules:
        torch.manual_seed(1)
        if kind == "custom":
            torch.nn.utils.parametrize.register_parametrization(m, "weight", Symmetric())
        else:
            getattr(torch.nn.utils.parametrizations, kind)(m)
    x = torch.randn(5, 4, dtype=D)
    outs = []
    for m in modules:
        y = m(x)
        y.square().sum().backward()
        outs.append((y, [p.grad for p in m.parameters()]))
    assert_trees_close(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------
# compile with dynamic shapes, export in a fresh process, the profiler, settings


def test_torch_compile_with_dynamic_shapes():
    torch._dynamo.reset()
    ours, theirs = pair()
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (3, 5, 8):
        x = torch.randn(batch, 4, dtype=D)
        torch.testing.assert_close(compiled(x), theirs(x))


def test_exported_program_loads_in_a_fresh_process_after_import_torch_lingrad(tmp_path):
    model = lingrad.swap_linear(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    x = torch.randn(3, 4)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    torch.save(x, tmp_path / "x.pt")
    expected = model(x)
    code = f"""
        import torch, lingrad
        program = torch.export.load({str(path)!r})
        x = torch.load({str(tmp_path / "x.pt")!r})
        torch.save(program.module()(x), {str(tmp_path / "y.pt")!r})
        """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_profiler_names_lingrad():
    ours, _ = pair()
    x = torch.randn(5, 4, dtype=D, requires_grad=True)
    with torch.profiler.profile() as prof:
        ours(x).sum().backward()
        with torch.no_grad():
            ours(x)
    names = {e.name for e in prof.events()}
    assert {"LinearFunction", "LinearFunctionBackward", "lingrad::linear"} <= names


def test_set_num_threads_takes_numpy_integers(num_threads):
    num_threads(np.int64(2))
    assert lingrad.get_num_threads() == (2 if lingrad.config()["openmp"] else 1)
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        lingrad.set_num_threads(True)


def test_misspelt_isa_warns_naming_the_valid_ones():
    code = "import warnings; warnings.simplefilter('error'); import lingrad"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"LINGRAD_ISA": "avx3"}
    )
    assert out.returncode != 0
    assert "LINGRAD_ISA='avx3' is not an instruction set name" in out.stderr and "'generic'" in out.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"LINGRAD_ISA": "generic"}
        )
    assert ok.returncode == 0, ok.stderr

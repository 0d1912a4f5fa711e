"""lingrad.train_step (and kernels.MlpTrainStep): the whole training step in one native call, against
PyTorch's own loop (model, loss, backward, optimizer.step()) with every optimizer option, both
losses and reductions, float32 and float64; each update rule bitwise against torch.optim; alternation
with optimizer.step(), checkpoints both ways, schedulers, frozen layers; bad calls that change
nothing; the same bits for any thread count."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import lingrad
from lingrad import kernels

torch = pytest.importorskip("torch")
F = torch.nn.functional

# name: (optimizer class, keyword arguments); every option of SGD, Adam and AdamW at least once
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.05}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.25, "weight_decay": 0.01}),
    "sgd-nesterov-maximize": (
        torch.optim.SGD,
        {"lr": 0.002, "momentum": 0.8, "nesterov": True, "weight_decay": 0.001, "maximize": True},
    ),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adam-decay-amsgrad": (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.05, "amsgrad": True, "eps": 1e-6}),
    "adam-betas-maximize": (torch.optim.Adam, {"lr": 0.003, "betas": (0.3, 0.95), "maximize": True}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01}),
    "adamw-amsgrad": (torch.optim.AdamW, {"lr": 0.02, "weight_decay": 0.1, "amsgrad": True, "betas": (0.8, 0.99)}),
}
LOSSES = [("mse", "mean"), ("mse", "sum"), ("cross_entropy", "mean"), ("cross_entropy", "sum")]
DTYPES = [torch.float32, torch.float64]


def model_of(widths=(7, 37, 21, 5), dtype=torch.float64, seed=0, acts=(torch.nn.Tanh, torch.nn.ReLU)):
    """Linear layers of the widths (the second without bias), an activation after each hidden one."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b, bias=i != 1, dtype=dtype))
        if i < len(widths) - 2:
            layers.append(acts[i % len(acts)]())
    return torch.nn.Sequential(*layers)


def batch_of(widths, loss, dtype, batch=19, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, widths[0], dtype=dtype, generator=g)
    if loss == "cross_entropy":
        return x, torch.randint(0, widths[-1], (batch,), generator=g)
    if loss == "bce_with_logits":  # probabilities
        return x, torch.rand(batch, widths[-1], dtype=dtype, generator=g)
    scale = 2 if loss == "huber" else 1  # (residuals on both sides of delta)
    return x, scale * torch.randn(batch, widths[-1], dtype=dtype, generator=g)


LOSS_FUNCTIONS = {
    "mse": F.mse_loss,
    "cross_entropy": F.cross_entropy,
    "huber": lambda y, t, reduction: F.huber_loss(y, t, reduction=reduction, delta=0.7),
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}


def torch_step(model, optimizer, loss, reduction):
    loss_fn = LOSS_FUNCTIONS[loss]

    def step(x, t):
        optimizer.zero_grad(set_to_none=True)
        value = loss_fn(model(x), t, reduction=reduction)
        value.backward()
        optimizer.step()
        return value.detach()

    return step


def tolerance(dtype, widths, batch):
    """Bound on the parameters' difference after a few steps: float64 tight; float32 growing with the
    longest reduction (the batch for the weight gradients, a layer's width for the products)."""
    eps = torch.finfo(dtype).eps
    length = max(batch, *widths)
    return (64 if dtype == torch.float64 else 8) * length * eps


def state_arrays(optimizer):
    """Every state tensor of the optimizer, as bytes (to compare bitwise)."""
    return [
        (key, value.clone() if torch.is_tensor(value) else value)
        for state in optimizer.state.values()
        for key, value in sorted(state.items())
    ]


def assert_same_tensors(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert x[0] == y[0]
            x, y = x[1], y[1]
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss,reduction", LOSSES, ids=lambda v: v)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matches_the_pytorch_loop(name, loss, reduction, dtype):
    check_against_the_loop(name, loss, reduction, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["huber", "bce_with_logits"])
@pytest.mark.parametrize("name", ["sgd-momentum", "adamw-amsgrad"])
def test_other_losses_match_the_pytorch_loop(name, loss, reduction, dtype):
    check_against_the_loop(name, loss, reduction, dtype)


def check_against_the_loop(name, loss, reduction, dtype):
    widths = (7, 37, 21, 5)
    kind, options = OPTIMIZERS[name]
    ours = model_of(widths, dtype)
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = kind(ours.parameters(), **options), kind(theirs.parameters(), **options)
    step = lingrad.train_step(ours, opt_ours, loss, reduction=reduction, delta=0.7)
    reference = torch_step(theirs, opt_theirs, loss, reduction)
    tol = tolerance(dtype, widths, 19)
    for i in range(4):
        x, t = batch_of(widths, loss, dtype, seed=i)
        got, want = step(x, t), reference(x, t)
        assert got.shape == () and got.dtype == dtype and not got.requires_grad and got.grad_fn is None
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    for p, q in zip(opt_ours.state.values(), opt_theirs.state.values()):
        assert p.keys() == q.keys()
        for key in p:
            torch.testing.assert_close(p[key], q[key], rtol=tol, atol=tol)
            assert p[key].dtype == q[key].dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_update_is_torch_optims(name, dtype):
    """From the same gradients (the kernels' own, as mlp_mse computes them), an update of every
    parameter equals torch.optim's step: SGD bit for bit; Adam's state bit for bit and its parameters
    within one rounding of the update, because torch's sqrt (MKL's vectorised one) is not always
    correctly rounded (1 ulp off for about 17% of float32 values here) and lingrad's is. Three
    steps (the later ones from state), widths that leave tails after any vector length."""
    widths = (13, 37, 5)
    kind, options = OPTIMIZERS[name]
    ours = model_of(widths, dtype, acts=(torch.nn.Tanh,))
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = kind(ours.parameters(), **options), kind(theirs.parameters(), **options)
    step = lingrad.train_step(ours, opt_ours, "mse")
    eps = torch.finfo(dtype).eps
    for i in range(3):
        x, t = batch_of(widths, "mse", dtype, seed=i)
        linears = [theirs[0], theirs[2]]
        _, _, grad_w, grad_b = kernels.mlp_mse(
            x.numpy(),
            [m.weight.detach().numpy() for m in linears],
            [None if m.bias is None else m.bias.detach().numpy() for m in linears],
            ["tanh", "identity"],
            t.numpy(),
            input_grad=False,
        )
        for m, gw, gb in zip(linears, grad_w, grad_b):
            m.weight.grad = torch.from_numpy(gw)
            if m.bias is not None:
                m.bias.grad = torch.from_numpy(gb)
        before = [p.detach().clone() for p in theirs.parameters()]
        opt_theirs.step()
        step(x, t)
        for p, q, b in zip(ours.parameters(), theirs.parameters(), before):
            if kind is torch.optim.SGD:
                assert torch.equal(p, q)
            else:  # one rounding of the update (1 ulp of its denominator), and of the parameter
                bound = 2 * eps * ((q - b).abs() + q.abs())
                assert ((p - q).abs() <= bound).all(), (p - q).abs().max()
        assert_same_tensors(state_arrays(opt_ours), state_arrays(opt_theirs))
        with torch.no_grad():  # the same parameters again for the next step
            for p, q in zip(ours.parameters(), theirs.parameters()):
                q.copy_(p)


@pytest.mark.parametrize("name", ["sgd-momentum", "adam-decay-amsgrad", "adamw"])
def test_alternates_with_optimizer_step(name):
    """train_step, then optimizer.step() on PyTorch's gradients, then train_step: as PyTorch's loop
    alone (the state each makes is the other's; SGD's first momentum buffer included)."""
    widths = (7, 37, 21, 5)
    kind, options = OPTIMIZERS[name]
    ours = model_of(widths)
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = kind(ours.parameters(), **options), kind(theirs.parameters(), **options)
    step = lingrad.train_step(ours, opt_ours, "cross_entropy")
    ours_torch = torch_step(ours, opt_ours, "cross_entropy", "mean")
    reference = torch_step(theirs, opt_theirs, "cross_entropy", "mean")
    for i in range(6):
        x, t = batch_of(widths, "cross_entropy", torch.float64, seed=i)
        (step if i % 2 == 0 else ours_torch)(x, t)
        reference(x, t)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert [sorted(s) for s in opt_ours.state.values()] == [sorted(s) for s in opt_theirs.state.values()]


@pytest.mark.parametrize("name", ["sgd-momentum", "adam-decay-amsgrad"])
def test_checkpoints_load_both_ways(name):
    """A checkpoint of train_step's model and optimizer continues in PyTorch's loop, and one of
    PyTorch's loop continues in train_step (the step binds the loaded state tensors)."""
    widths = (7, 37, 21, 5)
    kind, options = OPTIMIZERS[name]
    batches = [batch_of(widths, "mse", torch.float64, seed=i) for i in range(6)]

    def run(first_lingrad: bool):
        model = model_of(widths)
        opt = kind(model.parameters(), **options)
        step = lingrad.train_step(model, opt) if first_lingrad else torch_step(model, opt, "mse", "mean")
        for x, t in batches[:3]:
            step(x, t)
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        model2 = model_of(widths, seed=5)
        opt2 = kind(model2.parameters(), **options)
        model2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        step2 = torch_step(model2, opt2, "mse", "mean") if first_lingrad else lingrad.train_step(model2, opt2)
        for x, t in batches[3:]:
            step2(x, t)
        return model2

    reference = model_of(widths)
    opt = kind(reference.parameters(), **options)
    loop = torch_step(reference, opt, "mse", "mean")
    for x, t in batches:
        loop(x, t)
    for first_lingrad in (True, False):
        for p, q in zip(run(first_lingrad).parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_load_state_dict_into_the_same_optimizer_rebinds():
    widths = (7, 37, 21, 5)
    model = model_of(widths)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step = lingrad.train_step(model, opt)
    x, t = batch_of(widths, "mse", torch.float64)
    start = copy.deepcopy((model.state_dict(), opt.state_dict()))
    step(x, t)
    after_one = copy.deepcopy(model.state_dict())
    step(x, t)
    model.load_state_dict(start[0])
    opt.load_state_dict(start[1])  # new state tensors (and a new optimizer.state): bound again
    step(x, t)
    for key, value in model.state_dict().items():
        assert torch.equal(value, after_one[key])
    assert all(s["step"].item() == 1 for s in opt.state.values())


def test_scheduler_and_changed_hyperparameters_apply():
    widths = (7, 37, 21, 5)
    ours = model_of(widths)
    theirs = copy.deepcopy(ours)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.5)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.5)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3) for o in (opt_ours, opt_theirs)]
    step, reference = lingrad.train_step(ours, opt_ours), torch_step(theirs, opt_theirs, "mse", "mean")
    for i in range(6):
        x, t = batch_of(widths, "mse", torch.float64, seed=i)
        step(x, t)
        reference(x, t)
        for s in sched:
            s.step()
        if i == 3:  # by hand: weight decay on, momentum off (SGD keeps its buffers)
            for o in (opt_ours, opt_theirs):
                o.param_groups[0]["weight_decay"] = 0.01
                o.param_groups[0]["momentum"] = 0.0
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_frozen_parameters_and_groups(loss):
    """requires_grad=False, a parameter outside the optimizer, and two groups with their own lr."""
    widths = (7, 37, 21, 5)
    ours = model_of(widths)
    theirs = copy.deepcopy(ours)
    for m in (ours, theirs):
        m[0].weight.requires_grad_(False)

    def groups(m):  # layer 0's bias and the last weight are in no group: never updated (its bias is)
        return [{"params": [m[2].weight], "lr": 0.01}, {"params": [m[4].bias]}]

    opt_ours = torch.optim.Adam(groups(ours), lr=0.02)
    opt_theirs = torch.optim.Adam(groups(theirs), lr=0.02)
    frozen = [ours[0].weight.clone(), ours[0].bias.clone(), ours[4].weight.clone()]
    last_bias = ours[4].bias.clone()
    step, reference = lingrad.train_step(ours, opt_ours, loss), torch_step(theirs, opt_theirs, loss, "mean")
    for i in range(3):
        x, t = batch_of(widths, loss, torch.float64, seed=i)
        step(x, t)
        reference(x, t)
    assert torch.equal(ours[0].weight, frozen[0]) and torch.equal(ours[0].bias, frozen[1])
    assert torch.equal(ours[4].weight, frozen[2]) and not torch.equal(ours[4].bias, last_bias)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert len(opt_ours.state) == 2


def test_a_group_added_later_is_trained():
    widths = (7, 37, 21, 5)
    ours = model_of(widths)
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = (torch.optim.SGD(m[4].parameters(), lr=0.1) for m in (ours, theirs))
    step, reference = lingrad.train_step(ours, opt_ours), torch_step(theirs, opt_theirs, "mse", "mean")
    for i in range(4):
        if i == 2:
            opt_ours.add_param_group({"params": list(ours[0].parameters()), "lr": 0.05})
            opt_theirs.add_param_group({"params": list(theirs[0].parameters()), "lr": 0.05})
        x, t = batch_of(widths, "mse", torch.float64, seed=i)
        step(x, t)
        reference(x, t)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_grad_is_left_alone_and_fused_models_work():
    widths = (7, 37, 21, 5)
    model = model_of(widths)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    fused = lingrad.fuse(model)
    step = lingrad.train_step(fused, torch.optim.SGD(fused.parameters(), lr=0.1))
    x, t = batch_of(widths, "mse", torch.float64)
    before = [p.clone() for p in model.parameters()]
    step(x, t)
    assert model[0].weight.grad is None and torch.equal(model[2].weight.grad, torch.ones_like(model[2].weight))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_graph_saved_before_the_step_refuses_to_backward():
    """The step changes the parameters in place, as optimizer.step() does: autograd notices."""
    widths = (7, 37, 21, 5)
    model = model_of(widths)
    step = lingrad.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, t = batch_of(widths, "mse", torch.float64)
    stale = F.mse_loss(model(x), t)
    step(x, t)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


def test_model_moved_to_another_dtype_rebinds():
    widths = (7, 37, 21, 5)
    model = model_of(widths, torch.float32)
    reference = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = lingrad.train_step(model, opt)
    model.double()  # new parameter memory: the step binds it
    loop = torch_step(reference, torch.optim.SGD(reference.parameters(), lr=0.1), "mse", "mean")
    x, t = batch_of(widths, "mse", torch.float64)
    step(x, t)
    loop(x, t)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors


def test_unsupported_models_losses_optimizers_and_options():
    model = model_of()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="RMSprop"):
        lingrad.train_step(model, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(TypeError, match="LBFGS"):
        lingrad.train_step(model, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(TypeError, match="Dropout"):
        lingrad.train_step(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout()), sgd)
    with pytest.raises(TypeError, match="Sequential"):
        lingrad.train_step(torch.nn.Linear(3, 4), sgd)
    with pytest.raises(ValueError, match="l1"):
        lingrad.train_step(model, sgd, "l1")
    with pytest.raises(ValueError, match="delta"):
        lingrad.train_step(model, sgd, "huber", delta=0.0)
    with pytest.raises(ValueError, match="none"):
        lingrad.train_step(model, sgd, reduction="none")
    with pytest.raises(ValueError, match="differentiable"):
        lingrad.train_step(model, torch.optim.Adam(model.parameters(), differentiable=True))
    with pytest.raises(ValueError, match="capturable"):
        lingrad.train_step(model, torch.optim.AdamW(model.parameters(), capturable=True))
    shared = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="shares"):
        lingrad.train_step(torch.nn.Sequential(shared, torch.nn.ReLU(), shared), sgd)


def bad_calls(widths, loss, dtype):
    x, t = batch_of(widths, loss, dtype)
    calls = [
        (ValueError, x[:, :-1], t),  # input features
        (TypeError, x.float() if dtype == torch.float64 else x.double(), t),  # input dtype
        (ValueError, x[0], t),  # 1-D input
    ]
    if loss == "mse":
        calls += [(ValueError, x, t[:, :-1]), (ValueError, x, t[:-1]), (TypeError, x, t.to(torch.float16))]
    else:
        bad_class, negative = t.clone(), t.clone()
        bad_class[3], negative[5] = widths[-1], -1
        calls += [
            (ValueError, x, bad_class),
            (ValueError, x, negative),
            (ValueError, x, t[:-1]),
            (TypeError, x, t.to(torch.int32)),
            (TypeError, x, t.to(dtype)),
        ]
    return calls


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", ["sgd-momentum", "adam-decay-amsgrad"])
def test_bad_calls_change_nothing(name, loss):
    """A wrong shape, dtype or class index is an error at the call, before anything is updated:
    parameters and optimizer state bitwise as they were, on the first call (state just made) and after."""
    widths = (7, 37, 21, 5)
    kind, options = OPTIMIZERS[name]
    model = model_of(widths)
    opt = kind(model.parameters(), **options)
    step = lingrad.train_step(model, opt, loss)
    for _ in range(2):  # the first call (state just made), then a later one
        params, state = [p.clone() for p in model.parameters()], state_arrays(opt)
        for error, x, t in bad_calls(widths, loss, torch.float64):
            with pytest.raises(error):
                step(x, t)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        assert_same_tensors(state_arrays(opt), state)
        step(*batch_of(widths, loss, torch.float64))  # then a good call works
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_numpy_step_checks_its_state():
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((4, 3)), rng.standard_normal((2, 4))]
    b = [np.zeros(4), np.zeros(2)]

    def make(**changes):
        kwargs = {"optimizer": "adam", "weight_states": [None, None], "bias_states": [None, None]}
        kwargs.update(changes)
        return kernels.MlpTrainStep(w, b, ["relu", "identity"], **kwargs)

    with pytest.raises(ValueError, match="momentum_buffer"):
        make(weight_states=[{"group": 0, "momentum_buffer": np.zeros((4, 3))}, None])
    with pytest.raises(ValueError, match="exp_avg"):
        make(weight_states=[{"group": 0, "step": np.zeros(())}, None])
    with pytest.raises(ValueError, match="shape"):
        adam = {"group": 0, "exp_avg": np.zeros((3, 4)), "exp_avg_sq": np.zeros((4, 3)), "step": np.zeros(())}
        make(weight_states=[adam, None])
    with pytest.raises(ValueError, match="overlaps"):
        make(weight_states=[{"group": 0, "exp_avg": w[0], "exp_avg_sq": np.zeros((4, 3)), "step": np.zeros(())}, None])
    with pytest.raises(ValueError, match="optimizer"):
        make(optimizer="rmsprop")
    sgd = kernels.MlpTrainStep(w, b, ["relu", "identity"], weight_states=[{"group": 0}, None], bias_states=[None] * 2)
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    with pytest.raises(TypeError, match="tuple"):
        sgd(x, t, [(0.1, 0.0)])
    with pytest.raises(ValueError, match="momentum_buffer"):  # momentum without a buffer
        sgd(x, t, [(0.1, 0.9, 0.0, 0.0, False, False)])
    before = w[0].copy()
    loss = sgd(x, t, [(0.1, 0.0, 0.0, 0.0, False, False)])
    assert isinstance(loss, float) and not np.array_equal(w[0], before)


# ---------------------------------------------------------------------------------------------
# Threads and buffers


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", ["sgd-momentum", "adamw-amsgrad"])
def test_same_bytes_for_any_thread_count(num_threads, name, loss):
    """Layers large enough that the products, the optimizer's loops and the cross-entropy's rows are
    shared out to threads."""
    widths = (300, 257, 70)
    kind, options = OPTIMIZERS[name]
    results = []
    for threads in (1, 2, 3):
        num_threads(threads)
        model = model_of(widths, torch.float32, acts=(torch.nn.GELU,))
        opt = kind(model.parameters(), **options)
        step = lingrad.train_step(model, opt, loss)
        losses = [step(*batch_of(widths, loss, torch.float32, batch=600, seed=i)) for i in range(2)]
        results.append([*losses, *(p.detach().clone() for p in model.parameters()), *state_arrays(opt)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            a, b = (a[1], b[1]) if isinstance(a, tuple) else (a, b)
            assert a.numpy().tobytes() == b.numpy().tobytes()


def test_python_threads_share_a_step():
    """Calls from several Python threads run one at a time (none waits holding the GIL)."""
    import threading

    widths = (64, 300, 10)
    model = model_of(widths, torch.float32)
    step = lingrad.train_step(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    batches = [batch_of(widths, "mse", torch.float32, batch=200, seed=i) for i in range(4)]
    errors = []

    def work(x, t):
        try:
            for _ in range(20):
                assert torch.isfinite(step(x, t))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=b) for b in batches]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors and not any(th.is_alive() for th in threads)
    assert all(s["step"].item() == 80 for s in step.optimizer.state.values())


def test_buffers_grow_once_and_are_kept():
    widths = (7, 37, 21, 5)
    model = model_of(widths)
    step = lingrad.train_step(model, torch.optim.SGD(model.parameters(), lr=0.01))
    step(*batch_of(widths, "mse", torch.float64, batch=50))
    size = step._native.workspace_elements
    for batch in (50, 10, 50, 1):
        step(*batch_of(widths, "mse", torch.float64, batch=batch))
        assert step._native.workspace_elements == size
    step(*batch_of(widths, "mse", torch.float64, batch=80))
    assert step._native.workspace_elements > size

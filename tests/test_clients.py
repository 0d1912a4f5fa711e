"""lingrad in real client libraries, as a user swaps it in: a Hugging Face transformers model built
from a small config (no download) and Stable-Baselines3's PPO, each with lingrad.swap_linear (and
PPO's policy networks with lingrad.fuse). Outputs and gradients match the stock model's within
float32 bounds, training runs, and checkpoints save and load both ways.

The float32 bound of a result summed over n products is rtol = eps32 * sqrt(n) * 8 (rounding
errors of two summation orders, each a random walk of n roundings), with atol that rtol times the
magnitude of what was summed: the largest value of the result's kind (all logits; every gradient of
the model, since a gradient that cancels to zero, such as an attention key's bias, is the rounding
noise of terms as large as the others). The same bound holds for lingrad's kernels and MKL's.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")  # (requirements-dev.txt; the variant builds skip these)

import lingrad  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def assert_float32_close(actual, expected, reduction: int, what: str, scale: float | None = None) -> None:
    """actual == expected within the float32 bound of a sum of `reduction` products whose terms are
    as large as `scale` (by default, expected's largest value): see above."""
    rtol = 8 * EPS32 * math.sqrt(reduction)
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=what)


def largest_grad(model: torch.nn.Module) -> float:
    return max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)


def linear_count(model: torch.nn.Module, cls=torch.nn.Linear) -> int:
    return sum(type(m) is cls for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_bert_classifier_outputs_gradients_and_training_match_stock():
    stock = tiny_bert()
    swapped = lingrad.swap_linear(copy.deepcopy(stock))
    assert linear_count(swapped, lingrad.Linear) == linear_count(stock) > 0
    assert linear_count(swapped) == 0  # every Linear swapped (they are lingrad.Linear now)
    torch.manual_seed(1)
    ids = torch.randint(0, 120, (4, 16))
    labels = torch.tensor([0, 2, 1, 2])
    for model in (stock, swapped):
        model.zero_grad()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        model.result = (out.logits.detach(), out.loss.detach())
    # the longest reduction of a product: the intermediate width (64) times the batch's tokens (dW)
    assert_float32_close(swapped.result[0], stock.result[0], 64, "logits")
    assert_float32_close(swapped.result[1], stock.result[1], 64, "loss")
    stock_grads, scale = dict(stock.named_parameters()), largest_grad(stock)
    for name, p in swapped.named_parameters():
        assert_float32_close(p.grad, stock_grads[name].grad, 64 * 4 * 16, f"grad of {name}", scale)
    # a few AdamW steps train it (the loss falls), as the stock model's do
    optimizer = torch.optim.AdamW(swapped.parameters(), lr=1e-2)
    first = None
    for _ in range(5):
        optimizer.zero_grad()
        loss = swapped(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < first


def test_bert_checkpoints_load_both_ways(tmp_path):
    stock = tiny_bert()
    swapped = lingrad.swap_linear(copy.deepcopy(stock))
    with torch.no_grad():
        for p in swapped.parameters():
            p.add_(0.01)  # a trained lingrad model...
    swapped.save_pretrained(tmp_path / "lingrad")
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "lingrad").eval()
    assert linear_count(loaded) > 0  # ...loads as a stock model (the same state_dict keys)
    ids = torch.randint(0, 120, (2, 8))
    with torch.no_grad():
        assert_float32_close(loaded(input_ids=ids).logits, swapped(input_ids=ids).logits, 64, "reloaded logits")
    back = lingrad.swap_linear(loaded)  # and back into lingrad
    with torch.no_grad():
        assert_float32_close(back(input_ids=ids).logits, swapped(input_ids=ids).logits, 64, "swapped again")


def test_llama_greedy_generation_matches_stock():
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    stock = transformers.LlamaForCausalLM(config).eval()
    swapped = lingrad.swap_linear(copy.deepcopy(stock))
    prompt = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        logits = swapped(prompt).logits
        assert_float32_close(logits, stock(prompt).logits, 64, "logits")
        kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        # batch 1, one token at a time: the shapes of generation
        ours, theirs = swapped.generate(prompt, **kwargs), stock.generate(prompt, **kwargs)
    assert ours.shape == theirs.shape == (1, 13)
    # Greedy tokens agree unless two logits tie within float32 rounding (not with this seed).
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Stable-Baselines3


def ppo(seed: int = 0):
    sb3 = pytest.importorskip("stable_baselines3")
    return sb3.PPO(
        "MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2, seed=seed, device="cpu", verbose=0
    )


def policy_outputs(model, obs: torch.Tensor):
    """The policy's action logits and values for obs (differentiable: its parameters' gradients follow)."""
    policy = model.policy
    features = policy.extract_features(obs)
    latent_pi, latent_vf = policy.mlp_extractor(features)
    return policy.action_net(latent_pi), policy.value_net(latent_vf)


@pytest.mark.parametrize("how", ["swap_linear", "fuse"])
def test_ppo_policy_matches_stock_and_learns(how, tmp_path):
    stock, ours = ppo(), ppo()
    ours.policy.load_state_dict(stock.policy.state_dict())
    extractor = ours.policy.mlp_extractor
    if how == "swap_linear":
        lingrad.swap_linear(ours.policy)
        assert linear_count(ours.policy) == 0
    else:  # the two networks of the MLP extractor, each one native call
        extractor.policy_net = lingrad.fuse(extractor.policy_net)
        extractor.value_net = lingrad.fuse(extractor.value_net)
    torch.manual_seed(2)
    obs = torch.randn(16, 4)
    logits, values = policy_outputs(ours, obs)
    stock_logits, stock_values = policy_outputs(stock, obs)
    assert_float32_close(logits, stock_logits, 64, "action logits")
    assert_float32_close(values, stock_values, 64, "values")
    (logits.sum() + values.sum()).backward()
    (stock_logits.sum() + stock_values.sum()).backward()
    stock_params, scale = dict(stock.policy.named_parameters()), largest_grad(stock.policy)
    for name, p in ours.policy.named_parameters():
        if p.grad is not None or stock_params[name].grad is not None:
            assert_float32_close(p.grad, stock_params[name].grad, 64 * 16, f"grad of {name}", scale)
    ours.policy.zero_grad()
    before = {k: v.clone() for k, v in ours.policy.state_dict().items()}
    ours.learn(total_timesteps=128)  # two rollouts and their PPO updates, on lingrad's kernels
    after = ours.policy.state_dict()
    assert set(after) == set(before)  # fuse keeps the state_dict keys of the Sequential it replaced
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ours.save(tmp_path / "ppo")
    loaded = type(stock).load(tmp_path / "ppo", device="cpu")  # a stock PPO loads lingrad's checkpoint
    for k, v in loaded.policy.state_dict().items():
        assert torch.equal(v, after[k]), k
    action, _ = loaded.predict(np.zeros(4, dtype=np.float32), deterministic=True)
    ours_action, _ = ours.predict(np.zeros(4, dtype=np.float32), deterministic=True)
    assert action == ours_action

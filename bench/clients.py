"""Real clients with lingrad swapped in, against the same clients stock: what a user sees.

    python bench/clients.py [--repeat 7] [--only policy|ppo|bert|llama]

Each client is built once stock and once with lingrad (``lingrad.swap_linear``; PPO's policy also
with ``lingrad.fuse`` on its two networks), from the same weights; the variants are timed
interleaved in one process (A, B, C, A, B, C, ...: drift hits all alike), each after an untimed
warm-up; cells are medians over the repeats, and the ratio is stock time / lingrad time (above 1:
lingrad is faster).

    policy   a 64-64 tanh MLP policy (Stable-Baselines3's default sizes) at batch 1 under no_grad,
             CartPole's 4 observations -> 2 action logits: what an RL rollout calls at every step
    ppo      Stable-Baselines3 PPO learning CartPole-v1: 2048 environment steps and their updates
    bert     a Hugging Face BERT classifier's training step (4 layers, hidden 256, batch 8 x 128
             tokens, from a config: no download), AdamW
    llama    greedy generation with a small Llama (4 layers, hidden 256) at batch 1: 32 new tokens
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import lingrad


def timed(fn, number: int) -> float:
    """seconds per call of fn: one sample of `number` calls."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def compare(name: str, variants: dict, repeat: int, number: int) -> list[str]:
    """Times the variants interleaved; a table row per lingrad variant against 'stock'."""
    for fn in variants.values():  # untimed warm-up (thread pools, caches, lazy set-up)
        timed(fn, max(1, number // 2))
    samples = {k: [] for k in variants}
    for _ in range(repeat):
        for k, fn in variants.items():
            samples[k].append(timed(fn, number))
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    for k in variants:
        if k == "stock":
            continue
        rows.append(f"| {name} | {k} | {fmt(med['stock'])} | {fmt(med[k])} | {med['stock'] / med[k]:.2f}x |")
    return rows


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def bench_policy(repeat: int) -> list[str]:
    torch.manual_seed(0)
    stock = torch.nn.Sequential(
        torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
    )
    swapped = lingrad.swap_linear(copy.deepcopy(stock))
    fused = lingrad.fuse(copy.deepcopy(stock))
    obs = torch.randn(1, 4)

    def under_no_grad(model):
        def step():
            with torch.no_grad():
                model(obs)

        return step

    variants = {"stock": under_no_grad(stock), "swap_linear": under_no_grad(swapped), "fuse": under_no_grad(fused)}
    return compare("policy, batch 1, no_grad", variants, repeat, 2000)


def bench_ppo(repeat: int) -> list[str]:
    import stable_baselines3 as sb3

    def make(how: str):
        model = sb3.PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu", verbose=0)
        if how == "swap_linear":
            lingrad.swap_linear(model.policy)
        elif how == "fuse":
            extractor = model.policy.mlp_extractor
            extractor.policy_net = lingrad.fuse(extractor.policy_net)
            extractor.value_net = lingrad.fuse(extractor.value_net)
        return model

    models = {how: make(how) for how in ("stock", "swap_linear", "fuse")}
    variants = {how: (lambda m=m: m.learn(total_timesteps=2048)) for how, m in models.items()}
    return compare("PPO CartPole, 2048 steps", variants, max(3, repeat // 2), 1)


def bench_bert(repeat: int) -> list[str]:
    import transformers

    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        num_labels=2,
    )
    torch.manual_seed(0)
    stock = transformers.BertForSequenceClassification(config)
    swapped = lingrad.swap_linear(copy.deepcopy(stock))
    ids, labels = torch.randint(0, 1000, (8, 128)), torch.randint(0, 2, (8,))

    def train_step(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            optimizer.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()

        return step

    variants = {"stock": train_step(stock), "swap_linear": train_step(swapped)}
    return compare("BERT train step, 8 x 128", variants, repeat, 2)


def bench_llama(repeat: int) -> list[str]:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    stock = transformers.LlamaForCausalLM(config).eval()
    swapped = lingrad.swap_linear(copy.deepcopy(stock))
    prompt = torch.randint(0, 1000, (1, 16))

    def generate(model):
        def run():
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)

        return run

    variants = {"stock": generate(stock), "swap_linear": generate(swapped)}
    return compare("Llama generate, batch 1, 32 tokens", variants, repeat, 1)


BENCHES = {"policy": bench_policy, "ppo": bench_ppo, "bert": bench_bert, "llama": bench_llama}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--only", choices=list(BENCHES))
    args = parser.parse_args()
    import transformers

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), lingrad {lingrad.__version__} "
        f"({lingrad.get_num_threads()} threads, {lingrad.get_isa()}), transformers {transformers.__version__}; "
        f"medians of {args.repeat}, interleaved\n"
    )
    print("| client | lingrad as | stock | lingrad | stock / lingrad |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, bench in BENCHES.items():
        if args.only in (None, name):
            for row in bench(args.repeat):
                print(row, flush=True)


if __name__ == "__main__":
    main()

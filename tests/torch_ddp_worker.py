"""One process of test_torch.py's DistributedDataParallel test (not a test module itself).

    python torch_ddp_worker.py RANK WORLD_SIZE OUT_DIR     (MASTER_ADDR/MASTER_PORT in the environment)

Joins a gloo process group on the loopback interface, trains one step on this rank's shard with
four DDP-wrapped copies of one MLP (nn.Linear; lingrad.Linear via swap_linear; lingrad.Linear
with the fused LinearMSELoss head; the whole MLP fused by lingrad.fuse) and saves their
all-reduced gradients to OUT_DIR/rank<RANK>.pt.
"""

import copy
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import lingrad


class FusedHead(torch.nn.Module):
    """The same MLP as `reference`, its last layer and loss fused into one LinearMSELoss."""

    def __init__(self, reference: torch.nn.Sequential) -> None:
        super().__init__()
        self.body = lingrad.swap_linear(copy.deepcopy(reference[:-1]))
        last = reference[-1]
        self.head = lingrad.LinearMSELoss(last.in_features, last.out_features)
        self.head.load_state_dict(last.state_dict())

    def forward(self, x, target):
        return self.head(self.body(x), target)


def main() -> None:
    rank, world_size, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    torch.manual_seed(0)  # the same initial weights in every rank
    reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    swapped = lingrad.swap_linear(copy.deepcopy(reference))
    fused = FusedHead(reference)
    torch.manual_seed(1 + rank)  # a different shard in every rank
    x, target = torch.randn(5, 6), torch.randn(5, 2)

    # Each wrapper must outlive its backward pass: its reducer all-reduces the gradients.
    whole = lingrad.fuse(copy.deepcopy(reference), loss="mse")
    wrapped = [DDP(reference), DDP(swapped), DDP(fused), DDP(whole)]
    F.mse_loss(wrapped[0](x), target).backward()
    F.mse_loss(wrapped[1](x), target).backward()
    wrapped[2](x, target).backward()
    wrapped[3](x, target).backward()

    grads = lambda module: [p.grad for p in module.parameters()]  # noqa: E731
    torch.save(
        {
            "reference": dict(enumerate(grads(reference))),
            "lingrad": dict(enumerate(grads(swapped))),
            "fused": dict(enumerate(grads(fused.body) + grads(fused.head))),
            "whole": dict(enumerate(grads(whole))),
        },
        f"{out_dir}/rank{rank}.pt",
    )
    # Teardown, in the order that avoids PyTorch's own. This test once died here (rank 0 with
    # SIGABRT, "terminate called without an active exception": a C++ std::thread destroyed while
    # still running). DistributedDataParallel keeps a C++ reference to the gloo process group even
    # after its wrappers are deleted and destroy_process_group() has run: with torch 2.13, gloo's
    # worker and transport threads and the TCPStore server thread are all still alive at exit
    # (seen in /proc/self/task). Left alone, they are torn down during interpreter finalization and
    # C++ static destruction, in an order nothing controls, while the other rank closes its sockets.
    # So both ranks first finish every collective (the barrier), the results are on disk, and the
    # process then ends with os._exit, which skips that teardown.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

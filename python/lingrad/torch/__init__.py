"""lingrad's PyTorch layer (needs torch >= lingrad.TORCH_MIN). Users import its names from where they
always have: ``lingrad.Linear``, ``lingrad.functional``, ``lingrad.nn``, ``lingrad.autograd``,
``lingrad.mlp``, ``lingrad.privacy`` and ``torch.ops.lingrad.*``; this package holds the code.

    _bridge.py      tensors <-> the kernels' arrays (DLPack), the fallback to PyTorch, the capture protocol
    ops.py          the Operator machinery: registration, routing of a call, the autograd.Functions
    ops_linear.py   linear, linear_backward_input, linear_backward_weight and their rules
    ops_mse.py      mse_loss, mse_backward, the fused linear_mse and their rules
    functional.py   torch.nn.functional's semantics over the operators (lingrad.functional)
    autograd.py     the operators' Functions (lingrad.autograd)
    nn.py           Linear, LinearMSELoss, swap_linear (lingrad.nn)
    mlp.py          fuse, FusedMLP: a whole network per native call (lingrad.mlp)
    train.py        train_step: forward, loss, backward and the torch.optim update in one native call
    privacy.py      clip_and_accumulate, add_noise: DP-SGD (lingrad.privacy)

A call goes one way: functional (shapes, the fallback decision) -> the Operator (routing: kernel,
Function or dispatcher) -> its implementation -> _bridge (arrays) -> lingrad.kernels.

Inside this package ``import torch`` is PyTorch itself (imports are absolute). Importing it
registers the operators (``torch.ops.lingrad.*``).
"""

from __future__ import annotations

import torch

from lingrad import _require_supported_torch

_require_supported_torch(torch.__version__)  # an ImportError naming the versions, before the newer APIs

from lingrad.torch import ops_linear, ops_mse  # noqa: E402, F401  (registers torch.ops.lingrad.*)

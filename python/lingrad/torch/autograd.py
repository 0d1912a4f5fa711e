"""torch.autograd.Functions over lingrad's kernels (CPU float32/float64 tensors, zero-copy).

    LinearFunction.apply(x, weight, bias)            y (B, out) = x (B, in) @ weight.T + bias
    MSELossFunction.apply(pred, target, reduction)   mean/sum (0-d) or elementwise ("none") squared error
    LinearMSEFunction.apply(x, weight, bias, target, reduction, input_grad)
        -> (loss, grad_x or None, grad_weight, grad_bias or None, grad_y): the fused step; only the
           loss is differentiable, the rest are the gradients it made (grad_x if input_grad)

Arguments are 2-D as in the kernels (pred and target may be 1-D); bias may be None.
:mod:`lingrad.functional` adds torch.nn.functional's shape rules (leading dimensions, 1-D input),
type promotion and the fallback to PyTorch for tensors lingrad does not handle.

Each is the autograd.Function of one operator (lingrad.torch.ops_linear, ops_mse; also the operator's
Autograd kernel): backward computes only what ``ctx.needs_input_grad`` asks for and is itself
differentiable; the Functions have jvp and vmap rules, so torch.func (grad, vmap, jacrev, jacfwd,
hessian) and forward-mode AD work on them.
"""

from __future__ import annotations

from lingrad.torch import ops_linear, ops_mse

__all__ = ["LinearFunction", "MSELossFunction", "LinearMSEFunction"]

LinearFunction = ops_linear.linear.function
MSELossFunction = ops_mse.mse_loss.function
LinearMSEFunction = ops_mse.linear_mse.function

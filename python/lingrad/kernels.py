"""The NumPy-level API: each function is one call into lingrad's C++ kernels.

Shapes: x (B, in), weight (out, in), bias (out,), y / target / grad_out (B, out).

Rules shared by every function:

* all arrays are ``numpy.ndarray`` of one dtype, float32 or float64 (or bfloat16: below; ``TypeError`` otherwise,
  and for a ``numpy.ma.MaskedArray``, whose mask would be ignored; nothing is ever cast or copied
  behind your back);
* inputs may have any strides, so transposed, sliced, negative-step and broadcast (zero-stride)
  views are read in place; arrays whose data or strides are not aligned to their element size are
  rejected with ``ValueError``;
* a wrong rank or shape, a wrong ``out`` (shape, dtype, not C-contiguous, read-only, overlapping an
  input) or an unknown ``reduction`` raises ``ValueError`` naming the argument and the shapes;
* an empty batch works; NaN and Inf propagate; the GIL is released while a kernel runs;
* a result too large to allocate is a ``MemoryError`` naming it (``ValueError`` beyond the address
  space);
* results are bitwise identical for any number of threads (:func:`lingrad.set_num_threads`).

bfloat16 (the Linear layer's four functions: ``linear_forward``, ``linear_backward_input``,
``linear_backward_weight``, ``linear_mse``), with NumPy arrays of ``ml_dtypes.bfloat16`` (an optional
dependency, ``pip install ml_dtypes``; without it bfloat16 arrays cannot exist in NumPy, and
PyTorch bfloat16 tensors fall back to PyTorch):

* float32 and bfloat16 arrays may be mixed in one call (bfloat16 activations with float32 master
  weights, say); every operand value is rounded to bfloat16 (to nearest even) as the kernels pack
  it, never by a separate copy, each product of two is exact and the sums are float32;
* a new result is bfloat16 if every input array of the call is, else float32; pass ``out`` (and
  ``bias_out``) of either dtype to choose. ``linear_mse`` gives each gradient its input's dtype
  (a float32 weight gets a float32 gradient), keeps ``grad_output`` (dY) in float32 and rounds it
  to bfloat16 as dX's and dW's products read it; bias and target are used in float32;
* the SIMD code paths: ``amx_bf16`` (Intel Sapphire Rapids and later: AMX tiles, the fastest by
  far; its sums follow the hardware's order), ``avx512_bf16`` (vdpbf16ps pair dot products) and the
  others, which widen the rounded values to float32 while packing and run the float32
  micro-kernel. All but AMX compute the same bits: vdpbf16ps's order (K in pairs, the odd element
  first), which the widened paths reproduce; a denormal bfloat16 operand counts as zero, as
  vdpbf16ps reads it. Each path's results are the same for any thread count;
* ``lingrad.config()["bf16_kernel"]`` names the path in use.
"""

from ._C import (
    MlpTrainStep,
    linear_backward_input,
    linear_backward_weight,
    linear_forward,
    linear_mse,
    linear_per_sample_grad_norms,
    linear_per_sample_grads,
    mlp_backward,
    mlp_forward,
    mlp_mse,
    mse_backward,
    mse_loss,
)

__all__ = [
    "linear_forward",
    "linear_backward_input",
    "linear_backward_weight",
    "mse_loss",
    "mse_backward",
    "linear_mse",
    "linear_per_sample_grad_norms",
    "linear_per_sample_grads",
    "mlp_forward",
    "mlp_backward",
    "mlp_mse",
    "MlpTrainStep",
]

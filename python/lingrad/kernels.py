"""The NumPy-level API: each function is one call into lingrad's C++ kernels.

Shapes: x (B, in), weight (out, in), bias (out,), y / target / grad_out (B, out).

Rules shared by every function:

* all arrays are ``numpy.ndarray`` of one dtype, float32 or float64 (``TypeError`` otherwise,
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
"""

from ._C import (
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
]

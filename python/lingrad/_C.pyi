# Signatures of the compiled module, for editors and type checkers (see lingrad.kernels).
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

_Array = NDArray[np.float32] | NDArray[np.float64]
# The Linear layer's functions also take ml_dtypes.bfloat16 arrays (mixed with float32 ones).
_LinearArray = _Array | NDArray[Any]

def linear_forward(
    x: _LinearArray, weight: _LinearArray, bias: _LinearArray | None = None, *, out: _LinearArray | None = None
) -> _LinearArray: ...
def linear_backward_input(
    grad_out: _LinearArray, weight: _LinearArray, *, out: _LinearArray | None = None
) -> _LinearArray: ...
def linear_backward_weight(
    grad_out: _LinearArray,
    x: _LinearArray,
    *,
    sample_weights: _Array | None = None,
    bias: bool = True,
    out: _LinearArray | None = None,
    bias_out: _LinearArray | None = None,
) -> tuple[_LinearArray, _LinearArray | None]: ...
def linear_per_sample_grad_norms(grad_out: _Array, x: _Array, *, bias: bool = True) -> _Array: ...
def linear_per_sample_grads(grad_out: _Array, x: _Array, *, out: _Array | None = None) -> _Array: ...
def mse_loss(
    pred: _Array, target: _Array, reduction: Literal["mean", "sum", "none"] = "mean", *, out: _Array | None = None
) -> float | _Array: ...
def mse_backward(
    pred: _Array, target: _Array, reduction: Literal["mean", "sum", "none"] = "mean", *, out: _Array | None = None
) -> _Array: ...
def linear_mse(
    x: _LinearArray,
    weight: _LinearArray,
    bias: _LinearArray | None,
    target: _LinearArray,
    reduction: Literal["mean", "sum"] = "mean",
    *,
    input_grad: bool = True,
    grad_output: _Array | None = None,
) -> tuple[float, _LinearArray | None, _LinearArray, _LinearArray | None]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def get_isa() -> str: ...
def set_isa(name: str) -> None: ...
def available_isas() -> list[str]: ...
def measure_fma_peak(threads: int, seconds: float = 0.3) -> float: ...
def measure_tile_rate(threads: int, seconds: float = 0.3) -> float: ...
def measure_bf16_peak(threads: int, seconds: float = 0.3) -> float: ...
def build_info() -> dict[str, Any]: ...
def _gemm_plan(
    m: int,
    n: int,
    k: int,
    a_rs: int,
    a_cs: int,
    b_rs: int,
    b_cs: int,
    dtype: Literal["float32", "float64"] = "float32",
    *,
    row_sums: bool = False,
    loss: bool = False,
    threads: int | None = None,
) -> dict[str, Any]: ...

# The names mlp_forward, mlp_backward and mlp_mse accept in `activations`, in the kernels' order.
ACTIVATIONS: tuple[str, ...]

def mlp_forward(
    x: _Array,
    weights: Sequence[_Array],
    biases: Sequence[_Array | None] | None,
    activations: Sequence[str],
    *,
    negative_slopes: Sequence[float] | None = None,
    save: bool = False,
    out: _Array | None = None,
) -> _Array | tuple[_Array, list[_Array], list[_Array | None]]: ...
def mlp_backward(
    grad_out: _Array,
    x: _Array,
    weights: Sequence[_Array],
    biases: Sequence[_Array | None] | None,
    activations: Sequence[str],
    y: _Array,
    hidden: Sequence[_Array],
    pre: Sequence[_Array | None],
    *,
    negative_slopes: Sequence[float] | None = None,
    input_grad: bool = True,
) -> tuple[_Array | None, list[_Array], list[_Array | None]]: ...
def mlp_mse(
    x: _Array,
    weights: Sequence[_Array],
    biases: Sequence[_Array | None] | None,
    activations: Sequence[str],
    target: _Array,
    reduction: Literal["mean", "sum"] = "mean",
    *,
    negative_slopes: Sequence[float] | None = None,
    input_grad: bool = True,
) -> tuple[float, _Array | None, list[_Array], list[_Array | None]]: ...

class MlpTrainStep:
    """A network's whole training step (forward, loss, backward, optimizer update), made once."""

    def __init__(
        self,
        weights: Sequence[_Array],
        biases: Sequence[_Array | None] | None,
        activations: Sequence[str],
        *,
        negative_slopes: Sequence[float] | None = None,
        loss: Literal["mse", "cross_entropy", "huber", "bce_with_logits"] = "mse",
        reduction: Literal["mean", "sum"] = "mean",
        optimizer: Literal["sgd", "adam"] = "sgd",
        weight_states: Sequence[dict[str, Any] | None],
        bias_states: Sequence[dict[str, Any] | None],
        delta: float = 1.0,
    ) -> None: ...
    def __call__(self, x: _Array, target: _Array, hyperparameters: Sequence[tuple[float | bool, ...]]) -> float: ...
    @property
    def workspace_elements(self) -> int: ...

"""The float64 references with error bounds live in the package (lingrad.reference), so that
``lingrad check`` can run them against an installed build; the tests import them from here."""
from lingrad.reference import (
    assert_within,
    eps,
    error_ratio,
    f64,
    linear_backward_input,
    linear_backward_weight,
    linear_forward,
    linear_mse,
    mse,
)

__all__ = [
    "assert_within",
    "eps",
    "error_ratio",
    "f64",
    "linear_backward_input",
    "linear_backward_weight",
    "linear_forward",
    "linear_mse",
    "mse",
]

"""lingrad: fast, deterministic CPU kernels for training a Linear layer with an MSE loss.

    Y  = X W^T + b            forward             X (B, in), W (out, in), b (out)
    L  = mean((Y - T)^2)      loss (or the sum)
    dY = 2 (Y - T) / N        loss gradient        N = B * out for "mean"
    dX = dY W,  dW = dY^T X,  db = sum_b dY        the three gradients

The NumPy-level kernels are in :mod:`lingrad.kernels`. Results are bitwise identical for any
number of threads.

With PyTorch installed (``pip install lingrad[torch]``), ``lingrad.Linear`` (a drop-in for
``torch.nn.Linear``), ``lingrad.LinearMSELoss`` (the fused Linear + MSE block),
``lingrad.swap_linear``, ``lingrad.functional`` and ``lingrad.autograd`` are imported on first
use, so that ``import lingrad`` never needs torch. Their code is in the subpackage
:mod:`lingrad.torch`; ``lingrad.nn``, ``lingrad.functional`` and the rest are its modules.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from typing import IO, Any

from . import _C, kernels
from ._C import available_isas, get_isa, get_num_threads, set_isa, set_num_threads
from ._settings import settings

__version__: str = _C.build_info()["version"]

# every build's names, best first (csrc/kernels/cpu.cpp)
_KNOWN_ISAS = ("amx_bf16", "avx512_bf16", "avx512", "avx2", "generic")
if os.environ.get("LINGRAD_ISA") and os.environ["LINGRAD_ISA"] not in available_isas():
    _requested = os.environ["LINGRAD_ISA"]
    warnings.warn(
        f"LINGRAD_ISA={_requested!r} "
        + ("is not supported by this CPU or build" if _requested in _KNOWN_ISAS else "is not an instruction set name")
        + f"; it is ignored and lingrad uses {get_isa()!r}. Valid here: {', '.join(map(repr, available_isas()))}",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "__version__",
    "kernels",
    "get_num_threads",
    "set_num_threads",
    "get_isa",
    "set_isa",
    "available_isas",
    "settings",
    "config",
    "show_config",
]


# The PyTorch layer, imported on first access: name -> module of lingrad.torch holding it (the
# modules themselves are also importable as lingrad.nn, lingrad.functional, ...: see nn.py there).
_TORCH_NAMES = {
    "Linear": "nn",
    "LinearMSELoss": "nn",
    "swap_linear": "nn",
    "nn": "nn",
    "fuse": "mlp",
    "FusedMLP": "mlp",
    "train_step": "train",
    "TrainStep": "train",
    "mlp": "mlp",
    "functional": "functional",
    "privacy": "privacy",
    "autograd": "autograd",
}


# The oldest torch the PyTorch layer supports: pyproject.toml's range starts here, and CI runs the
# suite on it and on the newest torch pip finds (scripts/torch_matrix.sh). Below it the layer does not
# import (it needs torch.library.register_vmap, and torch.func's hessians through the dispatcher);
# the NumPy kernels work with any torch or none.
TORCH_MIN = (2, 6)


def _torch_supported(version: str) -> bool:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return (int(major), int(minor)) >= TORCH_MIN


def _require_supported_torch(version: str) -> None:
    """Raises ImportError, naming both versions, below TORCH_MIN (lingrad.torch calls it first)."""
    if not _torch_supported(version):
        need = ".".join(map(str, TORCH_MIN))
        raise ImportError(
            f"lingrad's PyTorch layer needs torch >= {need}, and torch {version} is installed: "
            f"pip install 'torch>={need}' (lingrad.kernels, the NumPy API, works without it)"
        )


def __getattr__(name: str) -> Any:
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module 'lingrad' has no attribute {name!r}")
    try:
        import torch  # noqa: F401  (is it installed?)
    except ImportError as e:
        raise ImportError(f"lingrad.{name} needs PyTorch: pip install 'lingrad[torch]'") from e
    # importing lingrad.torch checks the torch version first (an ImportError naming both versions)
    module = importlib.import_module(f"{__name__}.torch.{_TORCH_NAMES[name]}")
    value = module if name == _TORCH_NAMES[name] else getattr(module, name)
    globals()[name] = value  # later accesses skip this function
    return value


# With torch already imported, register the operators (torch.ops.lingrad.*) now, so that a program
# saved with torch.export loads after `import torch, lingrad` alone. Without torch, nothing is imported.
if sys.modules.get("torch") is not None and _torch_supported(sys.modules["torch"].__version__):
    importlib.import_module(f"{__name__}.torch")  # (the subpackage registers them)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCH_NAMES))


def config() -> dict:
    """The build (version, compiler, flags, OpenMP) and the run-time choices (SIMD code path,
    its register tile, threads), as a dict."""
    return _C.build_info()


def _bf16_line(info: dict) -> str:
    how = {
        "amx": "AMX tiles (tdpbf16ps)",
        "vdpbf16ps": "AVX512-BF16 pair dot products (vdpbf16ps)",
        "widened": "widened to float32 while packed",
    }
    numpy = "NumPy arrays of ml_dtypes.bfloat16" if info["bf16_numpy"] else "no NumPy dtype (pip install ml_dtypes)"
    return f"{how[info['bf16_kernel']]}, float32 sums; {numpy}"


def show_config(file: IO[str] | None = None) -> None:
    """Print :func:`config` in a readable form (to stdout by default)."""
    info = config()
    out = file if file is not None else sys.stdout
    openmp = f"yes (version {info['openmp_version']})" if info["openmp"] else "no (serial build)"
    lines = [
        f"lingrad {info['version']}",
        f"  compiler        {info['compiler']} ({info['build_type']}, flags:{info['cxx_flags']})",
        f"  OpenMP          {openmp}",
        f"  SIMD code path  {info['isa']} (available here: {', '.join(info['available_isas'])})",
        f"  register tile   float32 {info['tile_float32'][0]}x{info['tile_float32'][1]}, "
        f"float64 {info['tile_float64'][0]}x{info['tile_float64'][1]}",
        *(
            f"  blocking {dtype} " + " ".join(f"{k.upper()} {v}" for k, v in info[f"blocking_{dtype}"].items())
            for dtype in ("float32", "float64")
        ),
        f"  GEMM paths      narrow for N <= 4, unpacked for N <= 2 NR and M K <= 131072 (K <= 2 KC or "
        f"M <= 32; not small-M), small-M for M <= {info['gemm_small_m']} and K >= {info['gemm_small_min_k']} M^2, "
        "unpacked for K <= 16, packed otherwise; "
        f"one thread below {info['gemm_serial_work']:.0f} multiply-adds",
        f"  bfloat16        {_bf16_line(info)}",
        f"  threads         {info['num_threads']}",
    ]
    print("\n".join(lines), file=out)

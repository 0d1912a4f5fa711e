"""``lingrad.mlp``: the module lingrad.torch.mlp, under the name users import it by (an alias, so that
``import lingrad.mlp`` and ``from lingrad.mlp import ...`` work; the package's __getattr__ covers
``lingrad.mlp`` as an attribute). Its code is in python/lingrad/torch/mlp.py."""

import sys

from lingrad.torch import mlp

sys.modules[__name__] = mlp  # this name and lingrad.torch.mlp are one module object

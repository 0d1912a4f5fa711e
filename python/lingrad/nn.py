"""``lingrad.nn``: the module lingrad.torch.nn, under the name users import it by (an alias, so that
``import lingrad.nn`` and ``from lingrad.nn import ...`` work; the package's __getattr__ covers
``lingrad.nn`` as an attribute). Its code is in python/lingrad/torch/nn.py."""

import sys

from lingrad.torch import nn

sys.modules[__name__] = nn  # this name and lingrad.torch.nn are one module object

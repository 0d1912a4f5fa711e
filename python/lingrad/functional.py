"""``lingrad.functional``: the module lingrad.torch.functional, under the name users import it by (an alias, so that
``import lingrad.functional`` and ``from lingrad.functional import ...`` work; the package's __getattr__ covers
``lingrad.functional`` as an attribute). Its code is in python/lingrad/torch/functional.py."""

import sys

from lingrad.torch import functional

sys.modules[__name__] = functional  # this name and lingrad.torch.functional are one module object

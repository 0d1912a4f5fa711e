"""``lingrad.autograd``: the module lingrad.torch.autograd, under the name users import it by (an alias, so that
``import lingrad.autograd`` and ``from lingrad.autograd import ...`` work; the package's __getattr__ covers
``lingrad.autograd`` as an attribute). Its code is in python/lingrad/torch/autograd.py."""

import sys

from lingrad.torch import autograd

sys.modules[__name__] = autograd  # this name and lingrad.torch.autograd are one module object

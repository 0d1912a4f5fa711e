"""``lingrad.privacy``: the module lingrad.torch.privacy, under the name users import it by (an alias, so that
``import lingrad.privacy`` and ``from lingrad.privacy import ...`` work; the package's __getattr__ covers
``lingrad.privacy`` as an attribute). Its code is in python/lingrad/torch/privacy.py."""

import sys

from lingrad.torch import privacy

sys.modules[__name__] = privacy  # this name and lingrad.torch.privacy are one module object

"""unet-jax: the classic UNet in JAX/Flax, numerically identical to its PyTorch original.

The names below load on first use (PEP 562), so `import unet_jax.huge_pages` or
`unet_jax.levers` loads neither JAX nor Flax: train.py and the PyTorch side of the benchmarks
import those before JAX may be loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from unet_jax.checkpoint import load_pretrained
  from unet_jax.model import DoubleConv, Down, OutConv, UNet, Up, init_variables

__all__ = ['UNet', 'DoubleConv', 'Down', 'Up', 'OutConv', 'init_variables', 'load_pretrained',
           'predict']
__version__ = '0.1.0'

_HOMES = {'UNet': 'model', 'DoubleConv': 'model', 'Down': 'model', 'Up': 'model',
          'OutConv': 'model', 'init_variables': 'model', 'load_pretrained': 'checkpoint'}


def __getattr__(name: str) -> Any:
  if name in _HOMES:
    value = getattr(importlib.import_module(f'{__name__}.{_HOMES[name]}'), name)
  else:  # a submodule, as `import unet_jax; unet_jax.predict` finds it
    try:
      value = importlib.import_module(f'{__name__}.{name}')
    except ModuleNotFoundError as e:
      if e.name != f'{__name__}.{name}':
        raise
      raise AttributeError(f'module {__name__!r} has no attribute {name!r}') from None
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})

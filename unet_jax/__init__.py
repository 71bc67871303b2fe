"""unet-jax: the classic UNet in JAX/Flax, numerically identical to its PyTorch original."""

from unet_jax.checkpoint import load_pretrained
from unet_jax.model import DoubleConv, Down, OutConv, UNet, Up

__all__ = ['UNet', 'DoubleConv', 'Down', 'Up', 'OutConv', 'load_pretrained', 'predict']
__version__ = '0.1.0'

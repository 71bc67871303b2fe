"""The explicit table between PyTorch state_dict keys and Flax variables.

One row per tensor: the torch key, where it lives in Flax (collection + path) and how the array
is rearranged. Two naming schemes of the same network are known: the seed's and
milesial/Pytorch-UNet's. Every row is checked against `jax.eval_shape(model.init, ...)`, so a
missing, unexpected or mis-shaped tensor is an error that names it, never a silent fill.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np

from unet_jax.errors import UserError

Layout = Literal['seed', 'milesial']
Kind = Literal['conv', 'conv_transpose', 'vector', 'counter']

# Torch module prefixes of each block, per layout.
_PREFIXES = {
    'seed': dict(in_conv='in_conv', down='down{k}.downsampling.1', up_sample='up{k}.upsampling',
                 up_conv='up{k}.conv', out_conv='out_conv.conv'),
    'milesial': dict(in_conv='inc', down='down{k}.maxpool_conv.1', up_sample='up{k}.up',
                     up_conv='up{k}.conv', out_conv='outc.conv'),
}
_BN_FIELDS = (('weight', 'params', 'scale'), ('bias', 'params', 'bias'),
              ('running_mean', 'batch_stats', 'mean'), ('running_var', 'batch_stats', 'var'))


@dataclasses.dataclass(frozen=True)
class Row:
  torch_key: str
  collection: str          # 'params', 'batch_stats', or 'counters' (num_batches_tracked)
  path: tuple[str, ...]    # module path inside the collection, then the variable name
  kind: Kind

  @property
  def flax_name(self) -> str:
    return '/'.join((self.collection,) + self.path)


def to_flax(kind: Kind, w: np.ndarray) -> np.ndarray:
  if kind == 'conv':                        # OIHW -> HWIO
    return np.transpose(w, (2, 3, 1, 0))
  if kind == 'conv_transpose':
    # ConvTranspose2d's weight is (in, out, kH, kW); flax's ConvTranspose correlates the
    # dilated input with an unflipped kernel, so the spatial axes are reversed.
    return np.transpose(w, (2, 3, 0, 1))[::-1, ::-1]
  return w


def to_torch(kind: Kind, w: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return np.transpose(w, (3, 2, 0, 1))
  if kind == 'conv_transpose':
    return np.transpose(w[::-1, ::-1], (2, 3, 0, 1))
  return w


def _double_conv(prefix: str, path: tuple[str, ...], conv_bias: bool) -> Iterator[Row]:
  for conv_idx, bn_idx, i in ((0, 1, 1), (3, 4, 2)):
    conv = f'{prefix}.double_conv.{conv_idx}'
    bn = f'{prefix}.double_conv.{bn_idx}'
    yield Row(f'{conv}.weight', 'params', path + (f'conv{i}', 'kernel'), 'conv')
    if conv_bias:
      yield Row(f'{conv}.bias', 'params', path + (f'conv{i}', 'bias'), 'vector')
    for torch_name, collection, flax_name in _BN_FIELDS:
      yield Row(f'{bn}.{torch_name}', collection, path + (f'norm{i}', flax_name), 'vector')
    yield Row(f'{bn}.num_batches_tracked', 'counters', path + (f'norm{i}',), 'counter')


def key_table(*, depth: int, upsample: str, conv_bias: bool, layout: Layout) -> list[Row]:
  """All rows, in the order PyTorch's state_dict lists them."""
  p = _PREFIXES[layout]
  rows = list(_double_conv(p['in_conv'], ('in_conv',), conv_bias))
  for k in range(1, depth + 1):
    rows += _double_conv(p['down'].format(k=k), (f'down{k}', 'conv'), conv_bias)
  for k in range(1, depth + 1):
    if upsample == 'transpose':
      up = p['up_sample'].format(k=k)
      rows.append(Row(f'{up}.weight', 'params', (f'up{k}', 'upsample', 'kernel'), 'conv_transpose'))
      rows.append(Row(f'{up}.bias', 'params', (f'up{k}', 'upsample', 'bias'), 'vector'))
    rows += _double_conv(p['up_conv'].format(k=k), (f'up{k}', 'conv'), conv_bias)
  rows.append(Row(f'{p["out_conv"]}.weight', 'params', ('out_conv', 'conv', 'kernel'), 'conv'))
  rows.append(Row(f'{p["out_conv"]}.bias', 'params', ('out_conv', 'conv', 'bias'), 'vector'))
  return rows


_FIRST_KEYS: dict[Layout, str] = {'seed': 'in_conv.double_conv.0.weight',
                                  'milesial': 'inc.double_conv.0.weight'}


def nested_unet_prefix(keys: Mapping[str, object] | set[str], source: str) -> str:
  """'' for a UNet's own state_dict; else the module path one UNet sits under in a larger
  module's (a Lightning module's `self.model` gives 'model.'), which its keys start with."""
  if any(first in keys for first in _FIRST_KEYS.values()):
    return ''
  found = sorted({k[:-len(first)] for k in keys for first in _FIRST_KEYS.values()
                  if k.endswith('.' + first)})
  if len(found) > 1:
    raise UserError(f"{source}: holds {len(found)} UNets (under {', '.join(map(repr, found))}); "
                    'save the one to convert on its own: torch.save(unet.state_dict(), ...)')
  return found[0] if found else ''


def detect_layout(keys: Mapping[str, object] | set[str], source: str) -> Layout:
  for layout, first in _FIRST_KEYS.items():
    if first in keys:
      return layout
  sample = ', '.join(sorted(keys)[:3])
  raise UserError(f"{source}: not a UNet state_dict: found neither 'in_conv.double_conv.0.weight' "
                  f"(seed) nor 'inc.double_conv.0.weight' (milesial/Pytorch-UNet); keys start "
                  f'with: {sample}')


def infer_model_config(tensors: Mapping[str, np.ndarray], layout: Layout,
                       source: str) -> dict[str, object]:
  """Reads in/out channels, width, depth, upsampling mode and conv bias off the tensors."""
  p = _PREFIXES[layout]
  first = tensors[f'{p["in_conv"]}.double_conv.0.weight']
  out_key = f'{p["out_conv"]}.weight'
  if first.ndim != 4:
    raise UserError(f'{source}: {p["in_conv"]}.double_conv.0.weight has shape {first.shape}, '
                    'expected a 4-D conv weight')
  if out_key not in tensors:
    raise UserError(f'{source}: missing key {out_key!r}')
  down = {int(m.group(1)) for k in tensors if (m := re.match(r'down(\d+)\.', k))}
  depth = max(down) if down else 0
  if depth < 1:
    raise UserError(f"{source}: no 'down1.*' keys: cannot tell the UNet's depth")
  transpose_key = p['up_sample'].format(k=1) + '.weight'
  return dict(
      in_channels=int(first.shape[1]),
      num_classes=int(tensors[out_key].shape[0]),
      base_features=int(first.shape[0]),
      depth=depth,
      upsample='transpose' if transpose_key in tensors else 'bilinear',
      conv_bias=f'{p["in_conv"]}.double_conv.0.bias' in tensors,
  )

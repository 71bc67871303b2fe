"""Region-based (multi-label) segmentation: each output channel a region, a set of class ids.

nnU-Net trains BraTS's nested tumour regions this way (whole tumour = labels 1, 2, 3; tumour
core = 2, 3; enhancing = 3): a sigmoid per channel, the targets each pixel's membership of each
region, so a pixel may be in several (segmentation_models_pytorch's 'multilabel' mode). A binary
model is the case of one region, (1,).

A mask is painted back from the regions' predictions as nnU-Net's LabelManager does it: from
zeros, region k's pixels set to its class `order[k]`, one region after another, so the narrower
regions listed later win.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Regions = tuple[tuple[int, ...], ...]


class Painting(NamedTuple):
  """A region model's regions and the class each paints (check_regions)."""
  regions: Regions
  order: tuple[int, ...]


def as_regions(value: Sequence[Sequence[int]] | None) -> Regions | None:
  """A config's `data.regions` as a tuple of tuples of ints; None for () or None."""
  if not value:
    return None
  return tuple(tuple(int(c) for c in region) for region in value)


def check_regions(regions: Regions, order: Sequence[int] = (),
                  order_field: str = 'data.region_class_order') -> tuple[int, ...]:
  """Refuses regions that cannot be trained or painted back (ValueError, one line naming the
  problem); returns the class each region paints (`order`, the setting `order_field`, if
  given, else derived)."""
  for k, region in enumerate(regions):
    if not region:
      raise ValueError(f'region {k} is empty: each region names the class ids it covers, '
                       'e.g. ((1, 2, 3), (2, 3), (3,))')
    if min(region) < 1:
      raise ValueError(f'region {k} {region} names class {min(region)}: class 0 is the '
                       'background, what no region covers; name classes from 1')
    if len(set(region)) != len(region):
      raise ValueError(f'region {k} {region} names a class twice')
  if len(set(map(frozenset, regions))) != len(regions):
    raise ValueError(f'regions {regions} name one set of classes twice: each output channel '
                     'needs a region of its own')
  if order:
    if len(order) != len(regions):
      raise ValueError(f'{order_field} {tuple(order)} has {len(order)} classes for '
                       f'{len(regions)} regions: one per region, the class its pixels paint')
    for k, (region, c) in enumerate(zip(regions, order, strict=True)):
      if c not in region:
        raise ValueError(f'{order_field} gives region {k} {region} class {c}, which it '
                         'does not cover')
    return tuple(int(c) for c in order)
  return derived_order(regions, order_field)


def painting(regions: Sequence[Sequence[int]] | None, order: Sequence[int], channels: int,
             owner: str, order_field: str = 'data.region_class_order',
             prefix: str = 'regions') -> Painting | None:
  """The Painting of a model of `channels` output channels that are `regions` (None without
  regions), refused in one line (UserError) where they do not fit it (`owner`, the model as
  its refusal names it) or cannot be painted back (`prefix`: what names them there)."""
  from unet_jax.errors import UserError
  regions = as_regions(regions)
  if not regions:
    return None
  if len(regions) != channels:
    raise UserError(f'{owner} has {channels} output channel(s) but {len(regions)} regions are '
                    'given; give one region per channel')
  try:
    return Painting(regions, check_regions(regions, tuple(order), order_field))
  except ValueError as e:
    raise UserError(f'{prefix}: {e}') from None


def derived_order(regions: Regions, order_field: str = 'data.region_class_order',
                  ) -> tuple[int, ...]:
  """The class each region paints when none is given: the one class it covers that no later
  region does (BraTS's ((1, 2, 3), (2, 3), (3,)) paints 1, 2, 3)."""
  order = []
  for k, region in enumerate(regions):
    later = set().union(*regions[k + 1:])
    own = sorted(set(region) - later)
    if len(own) != 1:
      raise ValueError(
          f'region {k} {region} covers {"no class" if not own else f"classes {tuple(own)}"} '
          'that no later region does, so a mask cannot be painted back from the regions; list '
          f'them from the widest to the narrowest, or give {order_field} (the class each '
          "region's pixels paint, nnU-Net's regions_class_order)")
    order.append(own[0])
  return tuple(order)


def parse_regions(text: str, flag: str) -> list[list[int]]:
  """A command line's regions, '1,2,3;2,3;3' -> [[1, 2, 3], [2, 3], [3]] (0xRRGGBB for a
  colour; `flag`: its name, for the refusal)."""
  from unet_jax.errors import UserError
  try:
    return [[int(c, 16) if c.strip().lower().startswith('0x') else int(c)
             for c in part.split(',')] for part in text.split(';')]
  except ValueError:
    raise UserError(f"{flag} {text!r}: give each region's class ids, comma-separated, the "
                    "regions separated by ';', e.g. '1,2,3;2,3;3'") from None


def region_targets(labels: jax.Array, regions: Regions) -> jax.Array:
  """(N, H, W, R) float32: 1 where a pixel's class is in region r."""
  return jnp.stack([jnp.isin(labels, jnp.asarray(region)) for region in regions],
                   axis=-1).astype(jnp.float32)


def paint(members: np.ndarray, order: Sequence[int]) -> np.ndarray:
  """Class ids (..., H, W) from region memberships (..., H, W, R) (bool, or above 0.5)."""
  members = np.asarray(members)
  out = np.zeros(members.shape[:-1], np.int32)
  for k, c in enumerate(order):
    out[members[..., k] > 0.5] = c
  return out


def label_classes(regions: Regions) -> int:
  """How many class ids the masks may hold: 0 and every class a region covers, and those
  between."""
  return max(max(region) for region in regions) + 1


def region_labels(regions: Sequence[Sequence[int]]) -> list[str]:
  """A report's row label for each region: its classes, e.g. '(classes 1,2,3)'."""
  return [f'(classes {",".join(map(str, region))})' for region in regions]


def config_regions(config: Any) -> Regions | None:
  """A run config's `data.regions` (runs before the field: none)."""
  return as_regions(config.data.get('regions', ()))


def painted_order(config: Any) -> tuple[int, ...]:
  """The class each of a run config's regions paints (check_regions)."""
  return check_regions(config_regions(config), tuple(config.data.get('region_class_order', ())))


def label_count(config: Any) -> int:
  """The class ids a run's masks may hold: its regions' (label_classes), else its model's
  classes (2 for one output channel)."""
  regions = config_regions(config)
  return label_classes(regions) if regions else max(config.model.num_classes, 2)

"""Post-processing of predicted class maps, on the host: what `predict` writes with
`--largest_component` / `--min_region_size`, and what `evaluate` scores with the same flags.

Both act on each class but 0 (the background) in each image alone (a region model's masks:
on each region, `PostProcessing.per_region`), and set the pixels they drop to 0. They are the
two MONAI transforms nnU-Net-style pipelines use after the argmax:
`KeepLargestConnectedComponent` (nnU-Net's own post-processing) and `RemoveSmallObjects`.
(`unet_jax.predict.keep_largest_component`, where it was first, is this one.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from unet_jax.errors import UserError


def _regions(mask: np.ndarray, diagonal: bool) -> tuple[np.ndarray, int]:
  """scipy's labels of the connected regions of a boolean (H, W) mask, and their count."""
  from scipy import ndimage
  return ndimage.label(mask, ndimage.generate_binary_structure(2, 2 if diagonal else 1))


def _drop_from_each_class(classes: np.ndarray,
                          drop: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """Class ids (..., H, W) with the pixels that `drop` picks from each class's (H, W) boolean
  mask, for each class but 0 of each image, set to 0."""
  out = np.array(classes, copy=True)
  for index in np.ndindex(out.shape[:-2]):
    image = out[index]
    for c in np.unique(image):
      if c != 0:
        image[drop(image == c)] = 0
  return out


def _all_but_largest(mask: np.ndarray) -> np.ndarray:
  regions, count = _regions(mask, diagonal=True)
  if count < 2:
    return np.zeros_like(mask)
  largest = 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))  # (of equals, the first)
  return (regions > 0) & (regions != largest)


def keep_largest_component(classes: np.ndarray) -> np.ndarray:
  """Class ids (..., H, W) with each class but 0 kept only in its largest connected region of
  each image (8-neighbour connectivity; of equal ones the first in reading order), its other
  pixels set to 0: MONAI's `KeepLargestConnectedComponent(independent=True)` with its default
  connectivity, nnU-Net's post-processing. For one object per class: stray blobs go."""
  return _drop_from_each_class(classes, _all_but_largest)


def remove_small_regions(classes: np.ndarray, min_size: int) -> np.ndarray:
  """Class ids (..., H, W) with each connected region of a class but 0 that has fewer than
  `min_size` pixels set to 0, in each image: scikit-image's
  `remove_small_objects(mask, min_size)` on each class's mask with its default connectivity
  (4 neighbours; MONAI's `RemoveSmallObjects(min_size)` likewise). For several objects per
  class, where keeping the largest would drop real ones: specks go, whatever their number."""
  def small_ones(mask: np.ndarray) -> np.ndarray:
    regions, _ = _regions(mask, diagonal=False)
    small = np.bincount(regions.ravel()) < min_size
    small[0] = False  # (label 0: not this class)
    return small[regions]

  if min_size <= 1:
    return np.array(classes, copy=True)
  return _drop_from_each_class(classes, small_ones)


def instance_labels(classes: np.ndarray) -> np.ndarray:
  """(..., H, W) int64: in each image, each 4-connected region of each class but 0 numbered 1,
  2, ... in reading order of its first pixel (its top row's leftmost), 0 elsewhere: the objects
  of a model trained to keep the gaps between them (config.border_weight, the UNet paper's
  weight map), one id each."""
  out = np.zeros(classes.shape, np.int64)
  for index in np.ndindex(classes.shape[:-2]):
    image, ids, count = classes[index], out[index], 0
    for c in np.unique(image):
      if c != 0:
        regions, found = _regions(image == c, diagonal=False)
        ids[regions > 0] = regions[regions > 0] + count
        count += found
    # Renumbered by first pixel across the classes (each class's own are already in order).
    present, first = np.unique(ids, return_index=True)
    first, present = first[present > 0], present[present > 0]
    renumber = np.zeros(count + 1, np.int64)
    renumber[present[np.argsort(first)]] = np.arange(1, len(present) + 1)
    out[index] = renumber[ids]
  return out


@dataclasses.dataclass(frozen=True)
class PostProcessing:
  """Which post-processing a prediction gets: none by default. Both: small regions go first,
  then each class keeps its largest region of those left (the order matters, as regions are
  counted with 4 neighbours for the one and 8 for the other: a largest region of specks that
  touch at corners would go whole, and a smaller solid one with it)."""
  largest_component: bool = False
  min_region_size: int = 0

  def __post_init__(self):
    if self.min_region_size < 0:
      raise UserError(f'min_region_size={self.min_region_size} must be at least 0 (0: keep '
                      'regions of any size)')

  def __bool__(self) -> bool:
    return self.largest_component or self.min_region_size > 1

  def __call__(self, classes: np.ndarray,
               regions: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Class ids (..., H, W), post-processed; the input itself when there is nothing to do.
    `regions`: a region model's painted mask, post-processed region by region (per_region)."""
    if regions:
      return self.per_region(classes, regions)
    if self.min_region_size > 1:
      classes = remove_small_regions(classes, self.min_region_size)
    if self.largest_component:
      classes = keep_largest_component(classes)
    return classes

  def per_region(self, classes: np.ndarray, regions: Sequence[Sequence[int]]) -> np.ndarray:
    """Class ids (..., H, W) painted from `regions` (regions.py), post-processed region by
    region as nnU-Net post-processes a region model's masks: each region's pixels (those of
    its classes) one mask, whose parts this would drop set to 0, every class in them."""
    if not self:
      return classes
    out = np.array(classes, copy=True)
    for region in regions:
      inside = np.isin(out, region).astype(np.int32)
      out[(inside == 1) & (self(inside) == 0)] = 0
    return out

  def description(self) -> str:
    """For a report's first line, e.g. ', largest connected regions only'; '' for none."""
    small = self.min_region_size > 1
    return (f'{f", regions under {self.min_region_size} pixels removed" if small else ""}'
            f'{", largest connected regions only" if self.largest_component else ""}')

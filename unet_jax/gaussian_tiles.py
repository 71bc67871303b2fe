"""nnU-Net's sliding-window inference: where its tiles start, and the Gaussian importance map
that weighs each tile's logits before they are summed and divided by the summed weights
(nnunetv2.inference: compute_steps_for_sliding_window, compute_gaussian with sigma_scale 1/8
and value_scaling_factor 10, in float32 here where nnU-Net keeps the map in float16).

The map is nnU-Net's, a unit impulse at the tile's centre smoothed by scipy's gaussian_filter
(constant 0 outside); that filter is separable, so here it is the outer product of the sampled
kernel along each axis, written out (scipy's gaussian_filter1d: weights exp(-x**2 / 2 sigma**2)
out to int(4 sigma + 0.5), normalised to sum 1).
"""

from __future__ import annotations

import math

import numpy as np

SIGMA_SCALE = 1 / 8  # of the tile's side
VALUE_SCALING = 10.0  # the map's maximum


def _smoothed_impulse(size: int) -> np.ndarray:
  """An axis of `size` with a unit impulse at size // 2, after scipy's gaussian_filter1d with
  sigma = size / 8 and zeros outside."""
  sigma = size * SIGMA_SCALE
  radius = int(4.0 * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * offsets**2 / sigma**2)
  kernel /= kernel.sum()
  distance = np.arange(size) - size // 2
  inside = np.abs(distance) <= radius
  return np.where(inside, kernel[np.clip(distance + radius, 0, 2 * radius)], 0.0)


def gaussian_importance(height: int, width: int) -> np.ndarray:
  """The (height, width) float32 weights of a tile: largest (10) at its centre, falling as a
  Gaussian of sigma = side / 8; none is 0 (those take the smallest other weight, as nnU-Net's)."""
  weights = np.outer(_smoothed_impulse(height), _smoothed_impulse(width))
  weights /= weights.max() / VALUE_SCALING
  zero = weights == 0
  if zero.any():
    weights[zero] = weights[~zero].min()
  return weights.astype(np.float32)


def tile_starts(size: int, tile: int, step_fraction: float) -> list[int]:
  """Where the tiles of an axis of `size` start: as few as cover it with steps of at most
  `step_fraction` * tile, spread evenly (rounded), the last ending at the edge; [0] when the
  axis fits one tile."""
  if size <= tile:
    return [0]
  count = math.ceil((size - tile) / (tile * step_fraction)) + 1
  step = (size - tile) / (count - 1)
  return [int(np.round(step * i)) for i in range(count)]

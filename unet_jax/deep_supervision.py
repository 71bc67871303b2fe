"""nnU-Net's deep supervision loss: the loss of each of the UNet's outputs (`UNet(...,
deep_supervision=True)` applied with `all_scales=True`: full size first, then 1/2, 1/4, ..)
against the labels brought to its size, weighed 1, 1/2, 1/4, .. and normalised to sum 1.

As nnU-Net v2 (nnUNetTrainer._build_loss, DeepSupervisionWrapper; DownsampleSegForDSTransform):
its weights are 1/2**i over all `depth` decoder outputs with the coarsest's set to 0, which the
UNet here does not compute, so the weights over the others are the same numbers; its labels are
downsampled by torch's `interpolate(mode='nearest-exact')`, written out below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np


def loss_weights(count: int) -> tuple[float, ...]:
  """The weights of `count` outputs, finest first: 1/2**i normalised to sum 1."""
  raw = [1.0 / 2**i for i in range(count)]
  return tuple(w / sum(raw) for w in raw)


def nearest_exact_indices(size: int, out: int) -> np.ndarray:
  """The source index of each of `out` samples of an axis of `size`, as torch's
  `interpolate(mode='nearest-exact')` picks it: floor((i + 0.5) * size / out), at most size - 1
  (for size = 2**k * out, the pixel just past each 2**k block's centre)."""
  return np.minimum(np.floor((np.arange(out) + 0.5) * (size / out)).astype(np.int64), size - 1)


def downsampled_labels(labels: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Labels (N, H, W) at (h, w) = `shape`, each pixel the nearest-exact source's label (an
  ignored label stays ignored); any per-pixel map likewise."""
  rows = nearest_exact_indices(labels.shape[1], shape[0])
  cols = nearest_exact_indices(labels.shape[2], shape[1])
  return labels[:, rows][:, :, cols]


def deep_supervision_loss(
    outputs: Sequence[jax.Array], labels: jax.Array,
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    border: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_i w_i * loss(outputs[i], labels at outputs[i]'s size), with `loss_weights`; the
  metrics are the full-size output's, but for 'loss', the weighted sum. `border` (a per-pixel
  weight map, the UNet paper's): taken by the same pixels as the labels, passed on as
  loss(logits, labels, border)."""
  total, metrics = None, {}
  for i, (logits, weight) in enumerate(zip(outputs, loss_weights(len(outputs)), strict=True)):
    scaled = labels if i == 0 else downsampled_labels(labels, logits.shape[1:3])
    if border is None:
      value, these = loss(logits, scaled)
    else:
      value, these = loss(logits, scaled,
                          border if i == 0 else downsampled_labels(border, logits.shape[1:3]))
    total = weight * value if total is None else total + weight * value
    if i == 0:
      metrics = dict(these)
  metrics['loss'] = total
  return total, metrics

"""nnU-Net's CT normalisation (data.normalize='ct'): its statistics and their use.

nnU-Net normalises a channel named 'CT' in dataset.json by statistics of the training cases'
foreground (labelled) pixels, one set for the whole dataset (its fingerprint's
foreground_intensity_properties_per_channel): each pixel clipped to their 0.5 and 99.5
percentiles, then shifted by their mean and divided by their standard deviation. Unlike
z-scoring each image, this keeps a tissue's value (a Hounsfield unit) the same in every image.

The statistics are gathered as nnU-Net's DatasetFingerprintExtractor gathers them: from each
case, `num_samples // cases` of its foreground pixels per channel drawn with replacement by
`np.random.RandomState(1234)` (a new one per case; nnU-Net's 10e7 in all), pooled over the
cases, so each case weighs alike; then their mean, standard deviation (np.std) and
percentiles (np.percentile). The values are the images scaled to [0, 1] (over 255 or 65535):
the clipping and the shift and scale then give what they give on the file's own values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from unet_jax.errors import UserError

CT_SAMPLES = 10**8  # nnU-Net's num_foreground_voxels_for_intensitystats (10e7), in all
_SEED = 1234  # nnU-Net's collect_foreground_intensities seed, anew for each case


class CTStatistics(NamedTuple):
  """Per channel: the foreground's mean, standard deviation and 0.5 / 99.5 percentiles, as
  nnU-Net's plans name them (its `percentile_00_5`, `percentile_99_5`)."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  percentile_00_5: tuple[float, ...]
  percentile_99_5: tuple[float, ...]

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> CTStatistics:
    return cls(*(tuple(float(v) for v in values[field]) for field in cls._fields))

  def to_dict(self) -> dict[str, list[float]]:
    return {field: list(getattr(self, field)) for field in self._fields}


def ct_normalized(images: Any, statistics: CTStatistics) -> Any:
  """Images (.., H, W, C) scaled to [0, 1], each channel clipped to its percentiles, less its
  mean, over its deviation (at least 1e-8): nnU-Net's CTNormalization, in float32 as it
  computes. NumPy or JAX arrays alike (export runs it inside its artifact)."""
  low, high, mean, std = (np.asarray(v, np.float32) for v in (
      statistics.percentile_00_5, statistics.percentile_99_5, statistics.mean, statistics.std))
  return (images.clip(low, high) - mean) / np.maximum(std, np.float32(1e-8))


def foreground_statistics(cases: Iterable[tuple[np.ndarray, np.ndarray]], count: int,
                          num_samples: int = CT_SAMPLES, background: int = 0) -> CTStatistics:
  """The CTStatistics of `count` cases, each an (H, W, C) float32 image in [0, 1] and its
  (H, W) mask of label ids. Foreground: every pixel but the `background` label's (class 0's:
  label 1 where the ignored label is 0), the ignored label's too, as nnU-Net's `seg > 0`
  counts its ignore label (its highest)."""
  per_case = int(num_samples // count)
  pooled, filled = None, 0  # (the draws in place, in nnU-Net's order: no copy of 10^8 of them)
  for image, mask in cases:
    if pooled is None:
      pooled = np.empty((image.shape[-1], per_case * count), np.float32)
    foreground = mask != background
    if not foreground.any():  # (a case without foreground adds none)
      continue
    rs = np.random.RandomState(_SEED)
    for channel in range(image.shape[-1]):
      pooled[channel, filled:filled + per_case] = rs.choice(image[..., channel][foreground],
                                                            per_case, replace=True)
    filled += per_case
  if not filled:
    raise UserError("data.normalize='ct' takes its statistics from the training masks' "
                    'foreground (every class but 0), but they have none; label the foreground, '
                    "or use data.normalize='zscore'")
  fields: dict[str, list[float]] = {field: [] for field in CTStatistics._fields}
  for values in pooled[:, :filled]:
    fields['mean'].append(float(np.mean(values)))
    fields['std'].append(float(np.std(values)))
    # (after the mean and deviation, which sum the draws in their order: this reorders them)
    low, high = np.percentile(values, (0.5, 99.5), overwrite_input=True)
    fields['percentile_00_5'].append(float(low))
    fields['percentile_99_5'].append(float(high))
  return CTStatistics(**{field: tuple(values) for field, values in fields.items()})


def recorded_normalization(fields: Mapping[str, Any]) -> str | CTStatistics:
  """How a run's images were normalised, from its data config or a checkpoint's metadata:
  their `normalize` ('unit' where none is recorded), or for 'ct' its `ct_statistics`."""
  normalize = fields.get('normalize', 'unit')
  if normalize != 'ct':
    return normalize
  statistics = fields.get('ct_statistics')
  if not statistics:
    raise UserError("data.normalize='ct' without its ct_statistics: they are gathered when a "
                    'run starts training and recorded with its checkpoints; train with it, or '
                    'evaluate or predict with such a checkpoint')
  return CTStatistics.from_dict(statistics)

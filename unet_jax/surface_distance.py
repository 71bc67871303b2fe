"""Boundary distances between a predicted and a true mask: the 95th-percentile Hausdorff
distance (HD95) and the average symmetric surface distance (ASSD), in pixels, and the
normalised surface Dice (NSD): the share of both boundaries within a tolerance of the other.

MONAI's definitions (`compute_hausdorff_distance(percentile=95)`,
`compute_average_surface_distance(symmetric=True)`): a mask's boundary is its pixels with a
4-neighbour outside it (the image's border counts as outside); each boundary pixel's distance is
the Euclidean distance to the nearest boundary pixel of the other mask. HD95 is the larger of
the two directions' 95th percentiles (linear interpolation, as torch.quantile), ASSD the mean of
both directions' distances together, NSD (MONAI's `compute_surface_dice` with one tolerance for
every class) the count of both directions' distances at most the tolerance over their number.

Where MONAI returns NaN or infinity, this module says:
- truth and prediction both empty: NaN, and the pair is left out of every mean (as MONAI's);
- one empty, the other not: the image's diagonal, the largest distance it holds (BraTS's
  convention), so that a missed or invented object costs the most and the means stay finite;
  its NSD is 0, as MONAI's (no boundary pixel lies near an empty one).
Host-side NumPy/SciPy: the predictions are small next to the network's work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from unet_jax.losses import scored_classes

SURFACE_SCORES = ('hd95', 'assd', 'nsd')
NSD_TOLERANCE = 1.0  # pixels: a boundary pixel at most this far from the other's counts


def boundary(mask: np.ndarray) -> np.ndarray:
  """The pixels of a boolean (H, W) mask with a 4-neighbour outside it or off the image."""
  return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _distances_to(edge: np.ndarray, other_edge: np.ndarray) -> np.ndarray:
  """Each pixel of `edge`: the Euclidean distance to the nearest pixel of `other_edge`."""
  return ndimage.distance_transform_edt(~other_edge)[edge]


def surface_scores(pred: np.ndarray, truth: np.ndarray, classes: Sequence[int],
                   valid: np.ndarray | None = None, nsd_tolerance: float = NSD_TOLERANCE,
                   ) -> dict[str, np.ndarray]:
  """HD95, ASSD and NSD of each class of one image: {'hd95': (C,), 'assd': (C,), 'nsd': (C,)},
  float64.

  `pred`, `truth`: (H, W) class ids; `valid`: the pixels that count (ignored ones are in
  neither mask); NaN where the class is in neither mask, the image's diagonal (NSD: 0) where
  it is in only one. `nsd_tolerance`: NSD's distance, in pixels.
  """
  if valid is None:
    valid = np.ones(truth.shape, bool)
  diagonal = float(np.hypot(*truth.shape))
  out = {name: np.full(len(classes), np.nan) for name in SURFACE_SCORES}
  for i, c in enumerate(classes):
    p, t = (pred == c) & valid, (truth == c) & valid
    if not p.any() and not t.any():
      continue
    if not p.any() or not t.any():
      out['hd95'][i] = out['assd'][i] = diagonal
      out['nsd'][i] = 0.0
      continue
    p_edge, t_edge = boundary(p), boundary(t)
    to_truth, to_pred = _distances_to(p_edge, t_edge), _distances_to(t_edge, p_edge)
    both = np.concatenate([to_truth, to_pred])
    out['hd95'][i] = max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))
    out['assd'][i] = both.mean()
    out['nsd'][i] = np.mean(both <= nsd_tolerance)
  return out


def mean_surface_scores(per_image: Sequence[dict[str, np.ndarray]],
                        include_background: bool = True) -> dict[str, float | None]:
  """MONAI's reductions of per-image surface scores, NaN left out: `hd95`, `assd`, the mean
  over images of each image's mean over its classes ('mean'; without class 0 unless
  `include_background`, as MONAI's include_background=False); with several classes also
  `hd95_class{k}`, ..., each class's mean over its images ('mean_batch'). None where all are
  NaN (MONAI: 0)."""
  out: dict[str, float | None] = {}
  for name in SURFACE_SCORES:
    table = np.array([scores[name] for scores in per_image]).reshape(len(per_image), -1)
    out[name] = nan_mean(np.array(
        [nan_mean(scored_classes(row, include_background)) for row in table], float))
    if table.shape[1] > 1:
      out.update({f'{name}_class{c}': nan_mean(table[:, c]) for c in range(table.shape[1])})
  return out


def tolerance_text(metrics: dict) -> str:
  """For a report's first line: NSD's tolerance, where the metrics have NSD."""
  if 'nsd_tolerance' not in metrics:
    return ''
  return f', nsd within {metrics["nsd_tolerance"]:g} pixel(s)'


def nan_mean(values: np.ndarray) -> float | None:
  """The mean of the values that are not NaN (None counts as NaN); None if there are none."""
  values = np.asarray(values, float)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else None

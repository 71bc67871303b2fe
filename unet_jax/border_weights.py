"""The UNet paper's weight map for separating touching objects (Ronneberger et al. 2015, eq. 2).

w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)), where d1 and d2 are the distances
from a background pixel x to the nearest and the second nearest object, so the thin background
gaps between objects weigh up to 1 + w0 in the cross-entropy and the network learns to keep
them. This module computes the second term (the separation term) for one mask; w_c is the
class weight (`class_weights`, else 1), added in the loss (losses.segmentation_loss).

Objects are the connected regions (4-neighbours) of each class other than the background
(class 0) and the ignored label; a distance is to the object's nearest pixel (Euclidean, pixel
centres). Pixels of the background only get the term, and only where there are two objects or
more; elsewhere it is 0, as where it is below 1.5e-8 w0 (REACH_SIGMAS).
"""

from __future__ import annotations

import numpy as np

# Each object's distances are measured within this many sigmas of it: the term of a pixel
# farther from it is below w0 exp(-REACH_SIGMAS^2 / 2) = 1.5e-8 w0, and is left 0.
REACH_SIGMAS = 6.0


def separation_term(mask: np.ndarray, w0: float, sigma: float,
                    ignore_id: int | None = None) -> np.ndarray:
  """(H, W) float32: w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on the background pixels of the
  (H, W) label-id mask (class 0: id 0, or id 1 where the ignored id is 0), 0 elsewhere."""
  from scipy import ndimage
  background = 1 if ignore_id == 0 else 0
  others = [c for c in np.unique(mask) if c not in (background, ignore_id)]
  objects = []  # (each object's pixels within its window, and the window)
  reach = int(np.ceil(REACH_SIGMAS * sigma))
  for c in others:
    regions, count = ndimage.label(mask == c)  # (4-neighbours: scipy's default structure)
    for k, box in enumerate(ndimage.find_objects(regions), start=1):
      window = tuple(slice(max(b.start - reach, 0), b.stop + reach) for b in box)
      objects.append((regions[window] == k, window))
  term = np.zeros(mask.shape, np.float32)
  if len(objects) < 2:
    return term
  # The two smallest distances so far, object by object (one pair of maps, not one map each),
  # each object's measured within `reach` of its bounding box only: beyond, its distance is
  # at least `reach`, so d1 + d2 is too, and the term below w0 exp(-REACH_SIGMAS^2 / 2).
  d1 = np.full(mask.shape, np.inf)
  d2 = np.full(mask.shape, np.inf)
  for pixels, window in objects:
    d = ndimage.distance_transform_edt(~pixels)
    d2[window] = np.minimum(d2[window], np.maximum(d1[window], d))
    d1[window] = np.minimum(d1[window], d)
  where = (mask == background) & np.isfinite(d2)
  term[where] = w0 * np.exp(-((d1[where] + d2[where]) ** 2) / (2.0 * sigma**2))
  return term

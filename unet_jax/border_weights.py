"""The UNet paper's weight map for separating touching objects (Ronneberger et al. 2015, eq. 2).

w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)), where d1 and d2 are the distances
from a background pixel x to the nearest and the second nearest object, so the thin background
gaps between objects weigh up to 1 + w0 in the cross-entropy and the network learns to keep
them. This module computes the second term (the separation term) for one mask; w_c is the
class weight (`class_weights`, else 1), added in the loss (losses.segmentation_loss).

Objects are the connected regions (4-neighbours) of each class other than the background
(class 0) and the ignored label; a distance is to the object's nearest pixel (Euclidean, pixel
centres). Pixels of the background only get the term, and only where there are two objects or
more; elsewhere it is 0.
"""

from __future__ import annotations

import numpy as np


def separation_term(mask: np.ndarray, w0: float, sigma: float,
                    ignore_id: int | None = None) -> np.ndarray:
  """(H, W) float32: w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on the background pixels of the
  (H, W) label-id mask (class 0: id 0, or id 1 where the ignored id is 0), 0 elsewhere."""
  from scipy import ndimage
  background = 1 if ignore_id == 0 else 0
  others = [c for c in np.unique(mask) if c not in (background, ignore_id)]
  objects = []
  for c in others:
    regions, count = ndimage.label(mask == c)  # (4-neighbours: scipy's default structure)
    objects += [regions == k for k in range(1, count + 1)]
  term = np.zeros(mask.shape, np.float32)
  if len(objects) < 2:
    return term
  # The two smallest distances so far, object by object (one pair of maps, not one map each).
  d1 = np.full(mask.shape, np.inf)
  d2 = np.full(mask.shape, np.inf)
  for pixels in objects:
    d = ndimage.distance_transform_edt(~pixels)
    d2 = np.minimum(d2, np.maximum(d1, d))
    d1 = np.minimum(d1, d)
  where = mask == background
  term[where] = w0 * np.exp(-((d1[where] + d2[where]) ** 2) / (2.0 * sigma**2))
  return term

"""Class weights from the training data's pixel counts (config.balanced_class_weights).

The UNet paper's w_c "balances the class frequencies"; the usual form is scikit-learn's
`compute_class_weight('balanced')`: class c weighs n / (K n_c), n the pixels counted, K the
classes, n_c class c's, so that every class adds the same total weight to the cross-entropy.
For a binary model (BCE) the one weight is torch's `pos_weight`, which its documentation sets
to the negatives over the positives: n_0 / n_1.

Pixels are counted in the training split's masks as stored (before any resize or
augmentation); ignored ones are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from unet_jax.errors import UserError


def pixel_counts(masks: Iterable[np.ndarray], classes: int,
                 ignore_id: int | None = None) -> np.ndarray:
  """(classes,) int64: the pixels of each class over masks of label ids, the ignored id left
  out and the ids above it moved down (as the losses take them)."""
  total = np.zeros(classes + (ignore_id is not None), np.int64)
  for mask in masks:
    total += np.bincount(np.asarray(mask, np.int64).ravel(), minlength=len(total))[:len(total)]
  if ignore_id is not None:
    total = np.delete(total, ignore_id)
  return total[:classes]


def _check_every_class_counted(counts: np.ndarray, names: Sequence[str] = ()) -> None:
  """Refuses a class without pixels: its balanced weight would be infinite."""
  for c, n in enumerate(counts):
    if n == 0:
      name = f' ({names[c]})' if c < len(names) else ''
      raise UserError(f'class {c}{name} has no pixels in the training split, so it has no '
                      'balanced weight; set --config.class_weights (or pos_weight) yourself, '
                      'or leave out balanced_class_weights')


def balanced_weights(counts: np.ndarray, names: Sequence[str] = ()) -> tuple[float, ...]:
  """scikit-learn's 'balanced' weights n / (K n_c) of these per-class pixel counts; a class
  without pixels is refused."""
  _check_every_class_counted(counts, names)
  return tuple(float(counts.sum() / (len(counts) * n)) for n in counts)


def balanced_pos_weight(counts: np.ndarray) -> float:
  """BCE's foreground weight: the background pixels over the foreground ones (n_0 / n_1)."""
  _check_every_class_counted(counts)
  return float(counts[0] / counts[1])

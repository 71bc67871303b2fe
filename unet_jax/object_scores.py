"""Object-level scores of class maps: how many objects were found, as cell counting asks.

Objects are the 4-connected regions of each class but 0 (post_processing.instance_labels: what
`predict --instances` numbers). A predicted object matches a true object of its class when
their IoU is above 0.5, which pairs each object with at most one other (two partners above 0.5
would each hold more than half of it), so no assignment problem is left; these are the
matches of the panoptic quality (Kirillov et al. 2019), and StarDist's
`matching(criterion='iou', thresh=0.5)` but for an IoU of exactly 0.5, which it counts.
Counted over images and classes:

  precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN),
  panoptic quality = (sum of the matched pairs' IoU) / (TP + FP / 2 + FN / 2),

TP the matched pairs, FP the predicted objects unmatched, FN the true ones unmatched.
With several classes the same scores are given for each class of its own (`per_class`: the
counts of that class's objects alone, which add up to the counts of all).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from unet_jax.post_processing import instance_labels

COUNTS = ('objects_true', 'objects_predicted', 'objects_matched', 'matched_iou')
SCORES = ('object_precision', 'object_recall', 'object_f1', 'panoptic_quality')
COLUMNS = SCORES + COUNTS[:3]  # (what `reported` gives: a per-image row's object columns)


def object_counts(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None
                  ) -> dict[str, float]:
  """The counts of one image's (H, W) class maps (ids; `valid` False: ignored pixels, in
  neither): true and predicted objects, matched pairs, and the sum of their IoU."""
  if valid is not None:
    pred, truth = np.where(valid, pred, 0), np.where(valid, truth, 0)
  pred_ids, true_ids = instance_labels(pred), instance_labels(truth)
  n_pred, n_true = int(pred_ids.max(initial=0)), int(true_ids.max(initial=0))
  # Pixels of each (true, predicted) pair of objects of one class (other classes' pairs are
  # not counted: a pair must agree on the class).
  same = (pred_ids > 0) & (true_ids > 0) & (pred == truth)
  joint = np.zeros((n_true + 1, n_pred + 1), np.int64)
  np.add.at(joint, (true_ids[same], pred_ids[same]), 1)
  true_sizes = np.bincount(true_ids.ravel(), minlength=n_true + 1)
  pred_sizes = np.bincount(pred_ids.ravel(), minlength=n_pred + 1)
  union = true_sizes[:, None] + pred_sizes[None, :] - joint
  iou = np.where(joint > 0, joint / np.maximum(union, 1), 0.0)[1:, 1:]
  matched = iou > 0.5
  return {'objects_true': float(n_true), 'objects_predicted': float(n_pred),
          'objects_matched': float(matched.sum()), 'matched_iou': float(iou[matched].sum())}


def object_scores(counts: dict[str, float]) -> dict[str, float]:
  """Precision, recall, F1 and panoptic quality of (summed) object_counts; 1 where there is
  nothing to find and nothing was found."""
  tp, t, p = counts['objects_matched'], counts['objects_true'], counts['objects_predicted']
  fp, fn = p - tp, t - tp
  def ratio(a: float, b: float) -> float:
    return 1.0 if b == 0 else a / b
  return {'object_precision': ratio(tp, tp + fp), 'object_recall': ratio(tp, tp + fn),
          'object_f1': ratio(2 * tp, 2 * tp + fp + fn),
          'panoptic_quality': ratio(counts['matched_iou'], tp + fp / 2 + fn / 2)}


def reported(counts: dict[str, float]) -> dict[str, Any]:
  """object_scores of the counts, and the counts as whole numbers (their IoU sum left out)."""
  return object_scores(counts) | {k: int(v) for k, v in counts.items() if k != 'matched_iou'}


def summed(many: Iterable[dict[str, float]]) -> dict[str, float]:
  """The sums of several images' (or folds') object_counts."""
  total = dict.fromkeys(COUNTS, 0.0)
  for counts in many:
    total = {k: total[k] + counts[k] for k in COUNTS}
  return total


def class_counts(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None,
                 classes: Sequence[int]) -> list[dict[str, float]]:
  """object_counts of each of `classes` alone (its pixels one map, the others background);
  their sum is object_counts of all (objects and their matches never cross classes)."""
  return [object_counts((pred == c).astype(np.int32), (truth == c).astype(np.int32), valid)
          for c in classes]


def summed_per_class(many: Iterable[Mapping[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
  """Each class's counts summed over several images (or folds): {class: counts}."""
  many = list(many)
  return {k: summed(m[k] for m in many) for k in many[0]} if many else {}


def per_class(totals: Mapping[int, dict[str, float]]) -> dict[str, float]:
  """object_scores of each class's counts, as SCORE_class{k} (each class's row of a report)."""
  return {f'{name}_class{k}': value for k, counts in totals.items()
          for name, value in object_scores(counts).items()}

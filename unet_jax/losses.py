"""Segmentation losses (BCE or softmax CE, plus soft Dice) and metrics (Dice, IoU, accuracy).

The cross-entropy may be focal, label-smoothed, class-weighted or weighed per pixel (the UNet
paper's map, border_weights.py); the Dice term may be the Tversky index, the generalized Dice
or the Lovász loss (lovasz.py) instead.

Labels are integer class ids (N, H, W). With one output channel the model is binary (logit of
the foreground); with K channels it is K-way softmax, unless `regions` (regions.py) make each
channel a sigmoid of its own, the membership of a set of classes. Metrics are computed per
image and then averaged, with the convention that a class absent from both truth and
prediction scores 1 (an empty mask predicted as empty is a perfect answer, not a 0/0).

`ignore_id` (data.ignore_value): pixels of that label id count in neither the losses nor the
metrics, as torch's `CrossEntropyLoss(ignore_index=...)`; the ids above it move down by one, so
the model's K classes are the others. The cross-entropy is the mean over the valid pixels of
the whole global batch (psum over `axis_name`), so any device count computes what one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unet_jax.lovasz import lovasz_loss
from unet_jax.regions import Regions, region_targets

DICE_SMOOTH = 1.0  # the soft Dice's additive smoothing, in pixels (MONAI's smooth_nr/dr)


def valid_labels(labels: jax.Array, ignore_id: int | None
                 ) -> tuple[jax.Array, jax.Array | None]:
  """(labels with `ignore_id` taken out, the ids above it moved down; valid-pixel mask or None)."""
  if ignore_id is None:
    return labels, None
  valid = labels != ignore_id
  return jnp.where(labels > ignore_id, labels - 1, jnp.where(valid, labels, 0)), valid


def probabilities(logits: jax.Array, regions: Regions | None = None) -> jax.Array:
  """The foreground's sigmoid for one channel (each region's with `regions`), the softmax over
  the classes otherwise."""
  if logits.shape[-1] == 1 or regions:
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


def probabilities_and_targets(logits: jax.Array, labels: jax.Array,
                              regions: Regions | None = None) -> tuple[jax.Array, jax.Array]:
  """(probabilities, targets), both (N, H, W, C'), C' = the classes (or regions) scored; the
  targets one-hot, or each pixel's membership of each region."""
  k = logits.shape[-1]
  if regions:
    targets = region_targets(labels, regions)
  elif k == 1:
    targets = (labels[..., None] == 1).astype(jnp.float32)
  else:
    targets = jax.nn.one_hot(labels, k, dtype=jnp.float32)
  return probabilities(logits, regions), targets


def pixel_weights(labels: jax.Array, valid: jax.Array | None,
                  class_weights: Sequence[float] | None) -> jax.Array | None:
  """Each pixel's weight in the cross-entropy: 0 if ignored, else its class's weight (torch's
  CrossEntropyLoss `weight`), else 1; None when all are 1."""
  if valid is None and not class_weights:
    return None
  w = jnp.ones(labels.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
  if class_weights:
    w = w * jnp.asarray(class_weights, jnp.float32)[labels]
  return w


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None,
                  total_weight: jax.Array | None = None, pos_weight: float = 1.0,
                  focal_gamma: float = 0.0, label_smoothing: float = 0.0,
                  valid: jax.Array | None = None,
                  class_weights: Sequence[float] | None = None,
                  regions: Regions | None = None) -> jax.Array:
  """BCE-with-logits (1 channel) or softmax cross-entropy (K channels): the mean, or with
  per-pixel `weights` the weighted sum divided by `total_weight` (default: the weights' sum
  here), as torch's losses with `weight`/`ignore_index` reduce. `pos_weight`: BCE's, as in
  `BCEWithLogitsLoss(pos_weight=...)`.

  `focal_gamma` > 0: the focal loss (Lin et al. 2017): each pixel's term times
  (1 - p_t)^focal_gamma, p_t the probability it gives the true class, so confident right
  answers count less. For BCE that is torchvision's `sigmoid_focal_loss` without `alpha`.

  `label_smoothing` e > 0 (not with focal_gamma): the softmax CE against targets 1 - e + e/K for
  the true class and e/K for the others, as torch's `CrossEntropyLoss(label_smoothing=e)`
  computes it with `weight` and `ignore_index`: (1 - e) x the weighted CE + e/K x each valid
  pixel's sum over classes c of class_weights[c] x -log p_c, both over the weights' total (so
  it also needs the pixels' `valid` mask and the `class_weights`). BCE: the target y(1 - e) +
  e/2, the two classes' smoothing of a binary softmax (Keras's BinaryCrossentropy; the
  `smooth_factor` s of segmentation_models_pytorch's SoftBCEWithLogitsLoss is e = 2s).

  `regions`: BCE of each channel against its region's membership, over every pixel and region
  (torch's BCEWithLogitsLoss on (N, R, H, W) targets); `weights` then (N, H, W, R), the same
  pixel's in each region, or (N, H, W), broadcast so."""
  if focal_gamma and label_smoothing:
    raise ValueError('focal_gamma and label_smoothing: use one of them (neither torch nor '
                     'segmentation_models_pytorch defines their product)')
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1 or regions:
    if regions:
      x, y = logits, region_targets(labels, regions)
      if weights is not None and weights.ndim == labels.ndim:
        weights = jnp.broadcast_to(weights[..., None], x.shape)
    else:
      x, y = logits[..., 0], (labels == 1).astype(jnp.float32)
    if label_smoothing:
      y = y * (1 - label_smoothing) + label_smoothing / 2
    log_p_true = y * jax.nn.log_sigmoid(x) + (1 - y) * jax.nn.log_sigmoid(-x)
    if pos_weight == 1.0:
      per_pixel = optax.sigmoid_binary_cross_entropy(x, y)
    else:
      per_pixel = -(pos_weight * y * jax.nn.log_sigmoid(x) + (1 - y) * jax.nn.log_sigmoid(-x))
  else:
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    log_p_true = -per_pixel
    if label_smoothing:
      return _smoothed_cross_entropy(logits, per_pixel, weights, total_weight, label_smoothing,
                                     valid, class_weights)
  if focal_gamma:
    # 1 - p_t without cancellation; floored above 0 so that a gamma below 1 keeps a finite
    # gradient where p_t rounds to 1 (there the factor is 0 to float precision anyway).
    miss = jnp.maximum(-jnp.expm1(log_p_true), jnp.finfo(jnp.float32).tiny)
    per_pixel = per_pixel * miss ** focal_gamma
  return _weighted_mean(per_pixel if weights is None else weights * per_pixel, weights,
                        total_weight)


def _weighted_mean(terms: jax.Array, weights: jax.Array | None,
                   total_weight: jax.Array | None) -> jax.Array:
  if weights is None:
    return terms.mean()
  if total_weight is None:
    total_weight = weights.sum()
  # Everything ignored: 0 (torch gives NaN). The guard is on the divisor, not the result: a
  # `where` after a division by 0 would still send NaN into the gradient.
  return terms.sum() / jnp.where(total_weight > 0, total_weight, 1.0)


def _smoothed_cross_entropy(logits: jax.Array, nll: jax.Array, weights: jax.Array | None,
                            total_weight: jax.Array | None, smoothing: float,
                            valid: jax.Array | None,
                            class_weights: Sequence[float] | None) -> jax.Array:
  """torch's label-smoothed CrossEntropyLoss (cross_entropy's docstring): the smoothing term
  weighs each class's -log p by that class's weight, not the true class's, so it is a sum of
  its own beside the weighted CE, over the same total."""
  k = logits.shape[-1]
  neg_log_p = -jax.nn.log_softmax(logits, axis=-1)
  if class_weights:
    neg_log_p = neg_log_p * jnp.asarray(class_weights, jnp.float32).reshape(
        (1,) * (neg_log_p.ndim - 1) + (k,))  # (explicit rank, for jax_numpy_rank_promotion)
  uniform = neg_log_p.sum(axis=-1)
  if valid is not None:
    uniform = jnp.where(valid, uniform, 0.0)
  true = nll if weights is None else weights * nll
  return _weighted_mean((1 - smoothing) * true + (smoothing / k) * uniform, weights, total_weight)


DICE_REDUCTIONS = ('image', 'batch', 'pooled')


def soft_dice_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None,
                   tversky: tuple[float, float] | None = None, reduction: str = 'image',
                   axis_name: str | None = None, include_background: bool = True,
                   smooth: float = DICE_SMOOTH, generalized: bool = False,
                   regions: Regions | None = None) -> jax.Array:
  """1 - soft Dice per image and class, averaged; smoothed so empty masks are well defined:
  (2 TP + smooth) / (sum of probabilities + sum of targets + smooth), in soft counts. `smooth`
  1 pixel by default (MONAI's smooth_nr = smooth_dr = 1); nnU-Net's is 1e-5, milesial's 1e-6.

  `reduction='batch'`: the soft counts of each class are summed over the batch first (the
  global batch under `axis_name`), then 1 - the mean over classes of their Dice: MONAI's
  `DiceLoss(batch=True)`, the form of segmentation_models_pytorch's Dice loss and milesial's
  binary one. An image with little or no foreground then weighs by its pixels, not as a whole
  image. `reduction='pooled'`: the counts summed over the batch and the classes too, one Dice
  (milesial's multi-class `dice_loss`, which flattens classes into the batch; for one output
  channel the same as 'batch').
  `tversky` (alpha, beta): 1 - the Tversky index instead (Salehi et al. 2017; MONAI's
  TverskyLoss), (TP + s) / (TP + alpha FP + beta FN + s) in soft counts: beta > alpha weighs
  missed foreground above false alarms, for small structures. (0.5, 0.5) is the Dice with half
  the smoothing.
  `include_background=False`: class 0 of a multi-class model is left out (MONAI's
  `DiceLoss(include_background=False)`, nnU-Net's Dice term); one output channel is the
  foreground either way.
  `generalized`: the generalized Dice (Sudre et al. 2017; MONAI's GeneralizedDiceLoss with
  w_type='square'): one ratio over the classes, each weighed by 1 / (its target count)^2, so
  small classes count as much as large ones: 1 - (2 sum_c w_c TP_c + s) / (sum_c w_c (P_c +
  T_c) + s), per image (or once with reduction='batch'), then the mean. A class absent from
  the truth takes the largest weight of the others (MONAI's rule; all absent: all 0).
  `regions`: each channel's sigmoid against its region's membership (MONAI's DiceLoss with
  sigmoid=True); every region is foreground, so include_background has no effect."""
  if reduction not in DICE_REDUCTIONS:
    raise ValueError(f'reduction={reduction!r}: use one of {DICE_REDUCTIONS}')
  if generalized and (tversky is not None or reduction == 'pooled'):
    raise ValueError("generalized: weighs each class's counts, so it takes no tversky and "
                     "no reduction='pooled'")
  probs, targets = probabilities_and_targets(logits.astype(jnp.float32), labels, regions)
  if not include_background and probs.shape[-1] > 1 and not regions:
    probs, targets = probs[..., 1:], targets[..., 1:]
  if valid is not None:
    mask = valid[..., None].astype(probs.dtype)
    probs, targets = probs * mask, targets * mask
  axes = {'image': (1, 2), 'batch': (0, 1, 2), 'pooled': (0, 1, 2, 3)}[reduction]
  over_batch = reduction != 'image'

  def count(x: jax.Array) -> jax.Array:  # per image and class, per class, or one in all
    # (Every device then has the global batch's loss; autodiff of the psum hands each device
    # the gradient of its own pixels, as the step's mean over devices expects: tested on 8
    # devices against 1, under shard_map and pmap, and under shard_map's check_vma.)
    if over_batch and axis_name is not None:
      return jax.lax.psum(x.sum(axis=axes), axis_name)
    return x.sum(axis=axes)

  inter = count(probs * targets)
  if tversky is not None:
    alpha, beta = tversky
    # (Ignored pixels: probs and targets are both 0 there, so they add to neither count.)
    fp = count(probs * (1 - targets))
    fn = count((1 - probs) * targets)
    return 1.0 - ((inter + smooth) / (inter + alpha * fp + beta * fn + smooth)).mean()
  truth = count(targets)
  denom = count(probs) + truth
  if generalized:
    return 1.0 - _generalized_dice(inter, denom, truth, smooth).mean()
  return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


def _generalized_dice(inter: jax.Array, denom: jax.Array, truth: jax.Array,
                      smooth: float) -> jax.Array:
  """The generalized Dice of counts whose last axis is the classes (soft_dice_loss's)."""
  present = truth > 0
  w = jnp.where(present, 1.0 / jnp.where(present, truth, 1.0) ** 2, 0.0)
  w = jnp.where(present, w, w.max(axis=-1, keepdims=True))
  return (2 * (w * inter).sum(axis=-1) + smooth) / ((w * denom).sum(axis=-1) + smooth)


def segmentation_loss(logits: jax.Array, labels: jax.Array, *, dice_weight: float,
                      ignore_id: int | None = None, axis_name: str | None = None,
                      class_weights: Sequence[float] | None = None, pos_weight: float = 1.0,
                      focal_gamma: float = 0.0, tversky: tuple[float, float] | None = None,
                      dice_reduction: str = 'image', dice_include_background: bool = True,
                      dice_smooth: float = DICE_SMOOTH, label_smoothing: float = 0.0,
                      lovasz: bool = False, generalized_dice: bool = False,
                      ce_weight: float = 1.0, border: jax.Array | None = None,
                      regions: Regions | None = None,
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ce_weight * cross-entropy (focal when focal_gamma > 0, its targets smoothed by
  label_smoothing; MONAI's DiceCELoss lambda_ce) + dice_weight * (1 - soft Dice, or the
  Tversky index with `tversky`; per image, or over the batch with dice_reduction='batch', over
  the batch and the classes with 'pooled'; without class 0 unless dice_include_background) on
  this device's share of the batch.
  `lovasz`: the Dice term is the Lovász loss instead (lovasz.py; per image, or over the batch
  with dice_reduction='batch'), named `dice_loss` in the parts all the same;
  `generalized_dice`: the generalized Dice (soft_dice_loss's `generalized`).
  `border` (N, H, W): the UNet paper's separation term (border_weights.py), added to each
  pixel's weight in the cross-entropy (its class weight, else 1), which is then the weighted
  sum over the weights' sum, as with class weights; the Dice term is unweighted.
  `regions` (regions.py): each channel a sigmoid, its region's BCE and soft Dice (the mean
  over regions); no class weights (pos_weight weighs every region's members) and no Lovász.

  Under `axis_name`, meaning the result over devices gives the loss of the global batch."""
  if regions and (class_weights or lovasz):
    raise ValueError('regions: each channel is a BCE of its own, which takes no class_weights '
                     '(pos_weight weighs the members of every region) and no lovasz')
  labels, valid = valid_labels(labels, ignore_id)
  weights = pixel_weights(labels, valid, class_weights if logits.shape[-1] > 1 else None)
  if border is not None:
    if label_smoothing:
      raise ValueError('border and label_smoothing: use one of them (torch defines no '
                       'smoothing of a per-pixel weighted cross-entropy)')
    border = border.astype(jnp.float32)
    weights = ((jnp.ones(labels.shape, jnp.float32) if weights is None else weights)
               + (border if valid is None else jnp.where(valid, border, 0.0)))
  if regions and weights is not None:  # (each pixel's weight in each region's BCE)
    weights = jnp.broadcast_to(weights[..., None], logits.shape)
  total = None
  if weights is not None and axis_name is not None:
    # This share of the global weighted sum, scaled so that the mean over devices is that sum
    # divided by the global total weight: the devices' totals differ.
    devices = jax.lax.psum(1, axis_name)
    total = jax.lax.psum(weights.sum(), axis_name) / devices
  k = logits.shape[-1]
  ce = cross_entropy(logits, labels, weights, total, pos_weight, focal_gamma, label_smoothing,
                     valid, class_weights if k > 1 and not regions else None, regions)
  if lovasz:
    if tversky is not None or not dice_include_background or generalized_dice:
      raise ValueError('lovasz replaces the Dice term: it takes no tversky, and every class '
                       'present (dice_include_background=True), and is not the '
                       'generalized Dice')
    dice = lovasz_loss(logits, labels, valid, dice_reduction, axis_name)
  else:
    dice = soft_dice_loss(logits, labels, valid, tversky, dice_reduction, axis_name,
                          dice_include_background, dice_smooth, generalized_dice, regions)
  loss = ce_weight * ce + dice_weight * dice  # (ce_loss is logged unweighted either way)
  return loss, {'loss': loss, 'ce_loss': ce, 'dice_loss': dice}


def predict_classes(logits: jax.Array) -> jax.Array:
  """Class ids: threshold 0 on the logit (probability 0.5) for 1 channel, argmax otherwise."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def per_image_scores(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None,
                     regions: Regions | None = None) -> dict[str, jax.Array]:
  """Dice, IoU and pixel accuracy per image and scored class, each (N, C').

  For binary models the scored class is the foreground; for K classes, all K; with `regions`,
  each region (its channel's logit above 0 against the pixels of its classes), and a pixel is
  right when it is right in every region. Pixels outside `valid` (ignored ones) are left out.
  """
  if valid is None:
    valid = jnp.ones(labels.shape, bool)
  if regions:
    p = (logits > 0) & valid[..., None]
    t = region_targets(labels, regions).astype(bool) & valid[..., None]
    pixel_right = jnp.all(p == t, axis=-1)
  else:
    pred = predict_classes(logits)
    classes = (jnp.arange(1, 2) if logits.shape[-1] == 1 else jnp.arange(logits.shape[-1])
               ).reshape(1, 1, 1, -1)
    p = (pred[..., None] == classes) & valid[..., None]
    t = (labels[..., None] == classes) & valid[..., None]
    pixel_right = pred == labels
  tp = (p & t).sum(axis=(1, 2)).astype(jnp.float32)
  fp = (p & ~t).sum(axis=(1, 2)).astype(jnp.float32)
  fn = (~p & t).sum(axis=(1, 2)).astype(jnp.float32)
  empty = (tp + fp + fn) == 0
  dice = jnp.where(empty, 1.0, 2 * tp / jnp.maximum(2 * tp + fp + fn, 1))
  iou = jnp.where(empty, 1.0, tp / jnp.maximum(tp + fp + fn, 1))
  # Per-class pixel accuracy is recall: of this class's pixels, the share labelled right.
  acc = jnp.where(tp + fn == 0, 1.0, tp / jnp.maximum(tp + fn, 1))
  # Counted in float32: a ratio of integer counts would be float64 under jax_enable_x64, and
  # strict dtype promotion refuses to mix them with floats.
  right = (pixel_right & valid).sum(axis=(1, 2)).astype(jnp.float32)
  total = valid.sum(axis=(1, 2)).astype(jnp.float32)
  overall = jnp.where(total == 0, 1.0, right / jnp.maximum(total, 1))
  return {'dice': dice, 'iou': iou, 'class_accuracy': acc, 'pixel_accuracy': overall}


PER_CLASS_SCORES = ('dice', 'iou', 'class_accuracy')  # reported as their mean over classes


def scored_classes(per_class: Sequence[Any], include_background: bool = True) -> Sequence[Any]:
  """The classes whose mean is the reported score: class 0 left out when not
  `include_background` and there are several (MONAI's include_background=False, milesial's
  evaluate.py: class 0 is the background). A binary model's one scored class is its
  foreground either way."""
  return per_class if include_background or len(per_class) == 1 else per_class[1:]


def summed_eval_metrics(logits: jax.Array, labels: jax.Array, valid: jax.Array,
                        ignore_id: int | None = None, regions: Regions | None = None,
                        ) -> dict[str, jax.Array]:
  """Sums over the valid images of each score (and the count), ready to psum and divide."""
  return summed_scores(per_image_scores(logits, *valid_labels(labels, ignore_id), regions),
                       valid)


def summed_scores(scores: dict[str, jax.Array], valid: jax.Array) -> dict[str, jax.Array]:
  """per_image_scores summed over the images where `valid` (and their count)."""
  w = valid.astype(jnp.float32)
  out = {'count': w.sum(), 'pixel_accuracy': (scores['pixel_accuracy'] * w).sum()}
  for name in PER_CLASS_SCORES:
    out[name] = (scores[name] * w[:, None]).sum(axis=0)  # per class
  return out


def finalize_eval_metrics(sums: dict[str, jax.Array], include_background: bool = True,
                          ) -> dict[str, float]:
  """Means over images; `dice`, `iou`, `class_accuracy` also averaged over scored classes
  (without class 0 unless `include_background`: scored_classes), and given per class."""
  count = float(sums['count'])
  out: dict[str, float] = {'pixel_accuracy': float(sums['pixel_accuracy']) / count}
  for name in PER_CLASS_SCORES:
    per_class = [float(v) / count for v in sums[name]]
    scored = scored_classes(per_class, include_background)
    out[name] = sum(scored) / len(scored)
    if len(per_class) > 1:
      out.update({f'{name}_class{c}': v for c, v in enumerate(per_class)})
  return out

"""The Lovász loss (Berman et al. 2018): a convex surrogate of 1 - IoU, optimised directly.

Binary (one output channel): the Lovász hinge of the logits; several classes: the Lovász-Softmax
of the probabilities over the classes present in the truth (`classes='present'`), as the
paper's code and segmentation_models_pytorch's `LovaszLoss` compute them.

Each pixel's error (hinge: 1 - logit x sign, sign +1 on the foreground and -1 off it; softmax:
|[label is c] - p_c|) is sorted from the largest down, and the loss is the dot product of the
sorted errors (the hinge's through a ReLU) with the steps of the Jaccard loss as the pixels
are taken in that order, the Lovász extension's gradient. Ignored pixels are sorted last
and weigh 0: the steps of the pixels before them do not depend on them, so they add nothing,
as if removed (the paper's code drops them; shapes here are static).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCTIONS = ('image', 'batch')


def jaccard_steps(truth_sorted: jax.Array) -> jax.Array:
  """The Lovász extension's gradient for pixels sorted by decreasing error along the last
  axis: the step of 1 - IoU as each pixel joins the predicted set (the paper's lovasz_grad)."""
  total = truth_sorted.sum(axis=-1, keepdims=True)
  intersection = total - jnp.cumsum(truth_sorted, axis=-1)
  union = total + jnp.cumsum(1.0 - truth_sorted, axis=-1)  # >= 1: the first pixel joins it
  jaccard = 1.0 - intersection / union
  return jnp.concatenate([jaccard[..., :1], jnp.diff(jaccard, axis=-1)], axis=-1)


def _sorted_dot(errors: jax.Array, truth: jax.Array, valid: jax.Array,
                hinge: bool) -> jax.Array:
  """Sum over the last axis of (the hinge's ReLU of) the errors sorted from the largest down,
  times their Jaccard steps; invalid pixels last, weighing 0."""
  key = jnp.where(valid, errors, -jnp.inf)
  order = jnp.argsort(-key, axis=-1, stable=True)
  errors, truth, valid = (jnp.take_along_axis(a, order, axis=-1) for a in (errors, truth, valid))
  if hinge:
    errors = jax.nn.relu(errors)
  return (jnp.where(valid, errors, 0.0) * jaccard_steps(truth)).sum(axis=-1)


def _gathered(x: jax.Array, axis_name: str | None) -> jax.Array:
  # The global batch on every device. Like the Dice term's psum, the gather's transpose sums
  # the devices' cotangents, so each device gets its own pixels' gradient of the global loss
  # times the device count, which the step's mean over devices expects (tested on 8 devices
  # against 1, and in your own shard_map with and without check_vma).
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def lovasz_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None,
                reduction: str = 'image', axis_name: str | None = None) -> jax.Array:
  """The Lovász hinge (one channel) or Lovász-Softmax (K channels) of (N, H, W, C) logits and
  (N, H, W) class ids. `reduction='image'`: per image, then the mean over images (the paper's
  `per_image=True`); 'batch': one loss over every pixel of the (global, under `axis_name`)
  batch (segmentation_models_pytorch's default, `per_image=False`). Softmax: the mean over the
  classes present in the valid truth; an image (or batch) without valid pixels scores 0."""
  if reduction not in REDUCTIONS:
    raise ValueError(f'reduction={reduction!r}: use one of {REDUCTIONS}')
  logits = logits.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones(labels.shape, bool)
  if reduction == 'batch':
    logits, labels, valid = (_gathered(a, axis_name) for a in (logits, labels, valid))
  rows = 1 if reduction == 'batch' else logits.shape[0]  # the sets each loss is over
  k = logits.shape[-1]
  valid = valid.reshape(rows, 1, -1)
  if k == 1:
    truth = ((labels == 1).reshape(rows, 1, -1) & valid).astype(jnp.float32)
    errors = 1.0 - logits.reshape(rows, 1, -1) * (2.0 * truth - 1.0)
    return _sorted_dot(errors, truth, valid, hinge=True).mean()
  # (rows, K, pixels): each class's foreground against its probability.
  probs = jax.nn.softmax(logits, axis=-1).reshape(rows, -1, k).transpose(0, 2, 1)
  truth = (labels.reshape(rows, 1, -1) == jnp.arange(k).reshape(1, k, 1)) & valid
  truth = truth.astype(jnp.float32)
  per_class = _sorted_dot(jnp.abs(truth - probs), truth, jnp.broadcast_to(valid, truth.shape),
                          hinge=False)
  present = truth.sum(axis=-1) > 0
  count = present.sum(axis=-1).astype(jnp.float32)
  per_row = jnp.where(present, per_class, 0.0).sum(axis=-1) / jnp.maximum(count, 1.0)
  return per_row.mean()

"""Several checkpoints of one task as one model: the mean of their probabilities.

nnU-Net ensembles the models of its cross-validation folds this way: each member's softmax (a
binary model's sigmoid) is averaged, then the argmax (threshold) is taken. `Ensemble.apply`
gives the log of that mean (for one channel, the logit of the mean sigmoid), so whatever reads
logits by their argmax or sign, as evaluation's scores do, reads the ensemble's prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from unet_jax import losses
from unet_jax.ct_normalization import recorded_normalization
from unet_jax.errors import UserError
from unet_jax.flip_tta import eval_logits
from unet_jax.image_io import check_normalize_flag
from unet_jax.model import UNet
from unet_jax.regions import Regions


@dataclasses.dataclass(frozen=True)
class Ensemble:
  """`members` (UNets of the same inputs and classes) as one eval-mode model, applied to a
  sequence of their variables. `tta`: each member's logits averaged over flips first (as
  nnU-Net mirrors within each fold), so the step that applies it takes tta=False.
  `regions` (regions.py): the members' channels are regions, each its own sigmoid, and the
  ensemble gives the logit of each one's mean."""
  members: tuple[UNet, ...]
  tta: bool = False
  regions: Regions | None = None

  @property
  def num_classes(self) -> int:
    return self.members[0].num_classes

  @property
  def depth(self) -> int:
    return max(m.depth for m in self.members)

  def apply(self, variables: Sequence[Any], images: jax.Array, train: bool = False) -> jax.Array:
    if train:
      raise ValueError('an Ensemble is for evaluation and prediction only (train=False)')
    total = None
    for model, v in zip(self.members, variables, strict=True):
      probs = losses.probabilities(eval_logits(model, v, images, self.tta).astype(jnp.float32),
                                   self.regions)
      total = probs if total is None else total + probs
    mean = total / len(self.members)
    tiny = jnp.finfo(jnp.float32).tiny  # (log of a probability that rounded to 0)
    if self.num_classes == 1 or self.regions:
      return jnp.log(jnp.maximum(mean, tiny)) - jnp.log(jnp.maximum(1 - mean, tiny))
    return jnp.log(jnp.maximum(mean, tiny))


def load_one_task(paths: Sequence[str], normalize: str | None = None,
                  ) -> list[tuple[UNet, Any, dict]]:
  """(model, variables, metadata) of each checkpoint in `paths` (load_pretrained_with_metadata),
  checked to be models of one task, which an ensemble (or a cross-validation) needs.
  `normalize` (predict's --normalize): how a checkpoint that records no normalisation (a
  conversion of a file that said none) was trained, set in its metadata before the check, so
  that it may join members that record it; refused against a checkpoint that records another."""
  from unet_jax.checkpoint import load_pretrained_with_metadata
  if normalize is not None:
    check_normalize_flag(normalize)
  loaded = [load_pretrained_with_metadata(p) for p in paths]
  if normalize is not None:
    for path, (_, _, meta) in zip(paths, loaded, strict=True):
      recorded = meta.setdefault('normalize', normalize)
      if recorded != normalize:
        raise UserError(f"--normalize {normalize}: {path} was trained on images normalised "
                        f"'{recorded}' (as it records), and predict gives them so; leave out "
                        '--normalize')
  _check_one_task(paths, loaded)
  return loaded


def _check_one_task(paths: Sequence[str], loaded: Sequence[tuple[UNet, Any, dict]]) -> None:
  """Checkpoints averaged together must be models of the same inputs and classes: `loaded`,
  (model, variables, metadata) of each of `paths`."""
  first, (model, _, meta) = paths[0], loaded[0]
  for path, (other, _, other_meta) in zip(paths[1:], loaded[1:], strict=True):
    for field in ('in_channels', 'num_classes'):
      if getattr(model, field) != getattr(other, field):
        raise UserError(f'{first} and {path} cannot be averaged: {first} has {field}='
                        f'{getattr(model, field)}, {path} {field}={getattr(other, field)}; '
                        'ensemble checkpoints trained for the same images and classes')
    norm, other_norm = meta.get('normalize', 'unit'), other_meta.get('normalize', 'unit')
    if norm != other_norm:
      raise UserError(f'{first} and {path} cannot be averaged: they were trained on images '
                      f"normalised otherwise (data.normalize='{norm}' and '{other_norm}'); "
                      'ensemble checkpoints trained with the same data.normalize')
    if recorded_normalization(meta) != recorded_normalization(other_meta):
      raise UserError(f"{first} and {path} cannot be averaged: their data.normalize='ct' "
                      "statistics differ (they trained on other data); ensemble checkpoints "
                      "trained on the same data, e.g. the folds of one folder's "
                      'cross-validation')
    if meta.get('regions') != other_meta.get('regions') or \
        meta.get('region_class_order') != other_meta.get('region_class_order'):
      raise UserError(f'{first} and {path} cannot be averaged: their channels are other regions '
                      f"(data.regions {meta.get('regions')} and {other_meta.get('regions')}, "
                      f"painted as classes {meta.get('region_class_order')} and "
                      f"{other_meta.get('region_class_order')}); ensemble checkpoints trained "
                      'on the same regions')
    values, other_values = meta.get('mask_values', []), other_meta.get('mask_values', [])
    if values and other_values and values != other_values:
      raise UserError(f'{first} and {path} cannot be averaged: they were trained on masks whose '
                      f'values ({values[:8]} and {other_values[:8]}) make other classes; '
                      'ensemble checkpoints trained on the same masks')

"""Scores a checkpoint on a dataset split: the Dice, IoU and accuracies of training's evaluation.

    python -m unet_jax.evaluate --checkpoint workdirs/base/checkpoints/best
    unet-jax-evaluate --checkpoint workdirs/base/checkpoints/best   # the same, once installed
    python -m unet_jax.evaluate --checkpoint converted/ --config configs/folder.py \\
        --config.data.root=my_data --config.image_size=256 --split all
    python -m unet_jax.evaluate --checkpoint workdirs/base --per_image scores.csv
    python -m unet_jax.evaluate --checkpoint workdirs/base --surface
    python -m unet_jax.evaluate --checkpoint workdirs/fold0 ... --checkpoint workdirs/fold4 \\
        --config configs/folder.py --config.data.root=test_data --split all
    python -m unet_jax.evaluate --cross_validation --checkpoint workdirs/fold0 ... \\
        --checkpoint workdirs/fold4

A training workdir's own run config says which dataset, split and image size it was evaluated
on, so a checkpoint scores here exactly what the run logged for it. A converted checkpoint
records no dataset: `--config` names one (any training config; its model fields are ignored,
the checkpoint's are used). `--per_image FILE.csv` also writes each image's scores, one row per
image in the dataset's order, with its file name where the dataset has one (image folders do):
sorted by Dice, it lists the images the model fails on. `--surface` adds boundary distances
(HD95, ASSD, NSD: surface_distance.py), as medical segmentation reports them; `--confusion` the
pixel confusion matrix; `--largest_component` and `--min_region_size` score the predictions
post-processed as `predict` does with them. Several `--checkpoint`s score their ensemble, the
mean of their probabilities (ensemble.py), or with `--cross_validation` each on its own
held-out split, the images pooled (the folds of a k-fold run).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unet_jax import input_pipeline, losses, object_scores, parallel, surface_distance
from unet_jax.config_checks import check_class_names
from unet_jax.ensemble import Ensemble, load_one_task
from unet_jax.errors import UserError
from unet_jax.file_modes import replaced_on_success
from unet_jax.flip_tta import eval_logits
from unet_jax.image_io import size_text, training_size
from unet_jax.post_processing import PostProcessing
from unet_jax.regions import (
  Painting,
  Regions,
  as_regions,
  config_regions,
  label_count,
  paint,
  painting,
  region_labels,
)
from unet_jax.reporting import float32_decimal, score_lines

ALL_SPLITS = 'all'


def _run_config(meta: dict[str, Any], config: ml_collections.ConfigDict | None,
                checkpoint: str) -> ml_collections.ConfigDict:
  if config is not None:
    return ml_collections.ConfigDict(config.to_dict())
  if not meta.get('run_config'):
    raise UserError(f'{checkpoint}: a converted checkpoint records no dataset; name one with '
                    '--config (e.g. --config configs/folder.py --config.data.root=DIR '
                    '--config.image_size=SIZE)')
  return ml_collections.ConfigDict(meta['run_config'])


def _scores_step(variables: dict[str, Any], batch: dict[str, jax.Array], *, model: Any,
                 ignore_id: int | None, tta: bool = False, maps: bool = False,
                 region_sets: Regions | None = None,
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """eval_step's sums, and every image's scores with its `valid` flag, gathered from all
  devices in the global batch's order. `maps`: also each image's predicted and true class
  ids (`pred`, `labels`) and the pixels that count (`pixels`), for surface distances."""
  logits = eval_logits(model, variables, batch['image'], tta)
  labels, pixels = losses.valid_labels(batch['mask'], ignore_id)
  scores = losses.per_image_scores(logits, labels, pixels, region_sets)
  sums = losses.summed_scores(scores, batch['valid'])  # (eval_step's summed_eval_metrics)
  scores['valid'] = batch['valid']
  if maps:  # (a region model's: each pixel's regions, (N, H, W, R))
    scores.update(pred=logits > 0 if region_sets else losses.predict_classes(logits),
                  labels=labels,
                  pixels=jnp.ones(labels.shape, bool) if pixels is None else pixels)
  return (jax.lax.psum(sums, parallel.AXIS),
          jax.lax.all_gather(scores, parallel.AXIS, tiled=True))


def _file_names(source: Any) -> Callable[[int], str]:
  """index -> the record's `file_name` feature; '' for every index of a dataset without one
  (found from the first record, not by decoding each again)."""
  if len(source) == 0 or 'file_name' not in source[0]:
    return lambda index: ''

  def name(index: int) -> str:
    value = np.asarray(source[index]['file_name']).item()
    return value.decode() if isinstance(value, bytes) else str(value)
  return name


def _surface_row(scores: dict[str, np.ndarray], include_background: bool,
                 ) -> dict[str, float | None]:
  """An image's HD95 and ASSD (the mean over its scored classes that are not NaN) and, with
  several classes, each class's; None for NaN (an empty CSV cell)."""
  row, classes = {}, {}
  for name in surface_distance.SURFACE_SCORES:
    row[name] = surface_distance.nan_mean(losses.scored_classes(scores[name],
                                                                include_background))
    if len(scores[name]) > 1:
      classes.update({f'{name}_class{c}': surface_distance.nan_mean(v[None])
                      for c, v in enumerate(scores[name])})
  return row | classes


def check_nsd_tolerance(tolerance: float) -> None:
  """NSD's tolerance, in pixels: refused below 0 (or NaN), before anything is scored."""
  if not tolerance >= 0:
    raise UserError(f'nsd_tolerance={tolerance:g} must be at least 0: the distance in pixels '
                    "within which a boundary pixel counts as on the other mask's boundary")


class MapScores:
  """What the class maps of the images add up to: each image's surface scores (`surface`,
  with `surface`), and the pixel counts of the confusion matrix over `classes` (rows the true
  class, columns the predicted; with `confusion`).

  `painted` (a region model's regions and the class each paints): the predictions are each
  pixel's regions (H, W, R); surface and object scores are each region's, the confusion
  matrix that of the painted classes against the true ones."""

  def __init__(self, surface: bool, confusion: bool, classes: int,
               nsd_tolerance: float = surface_distance.NSD_TOLERANCE, objects: bool = False,
               painted: Painting | None = None):
    self.painted = painted
    self.surface: list[dict[str, np.ndarray]] | None = [] if surface else None
    self.nsd_tolerance = nsd_tolerance
    self.confusion = np.zeros((classes, classes), np.int64) if confusion else None
    self.objects: list[dict[str, float]] | None = [] if objects else None
    # ... and with several classes (or regions) each one's: {class (region) id: counts}
    self.object_classes: list[dict[int, dict[str, float]]] = []

  @property
  def needed(self) -> bool:
    return (self.surface is not None or self.confusion is not None
            or self.objects is not None)

  def add(self, pred: np.ndarray, labels: np.ndarray, pixels: np.ndarray, scored: int,
          include_background: bool) -> dict[str, float | None]:
    """Counts one image (`scored` classes in its scores); returns its surface and object
    columns, if any."""
    row: dict[str, float | None] = {}
    if self.confusion is not None:
      k = len(self.confusion)
      classes = paint(pred, self.painted.order) if self.painted else pred
      self.confusion += np.bincount(labels[pixels] * k + classes[pixels],
                                    minlength=k * k).reshape(k, k)
    # A region model's maps: one binary map per region (class 1 its members), scored alike.
    maps = ([(pred[..., r].astype(np.int32), np.isin(labels, region).astype(np.int32))
             for r, region in enumerate(self.painted.regions)] if self.painted
            else [(pred, labels)])
    if self.surface is not None:
      per_map = [surface_distance.surface_scores(
          p, t, [1] if scored == 1 or self.painted else range(scored), pixels,
          self.nsd_tolerance) for p, t in maps]
      self.surface.append({name: np.concatenate([m[name] for m in per_map])
                           for name in per_map[0]})
      row |= _surface_row(self.surface[-1], include_background)
    if self.objects is not None:
      if self.painted:  # (each region's objects)
        each = dict(enumerate(object_scores.object_counts(p, t, pixels) for p, t in maps))
      else:  # (each class's but 0: what a binary model's count is, alone)
        classes = [1] if scored == 1 else range(1, scored)
        each = dict(zip(classes, object_scores.class_counts(pred, labels, pixels, classes),
                        strict=True))
      self.objects.append(object_scores.summed(each.values()))
      if len(each) > 1:
        self.object_classes.append(each)
      row |= object_scores.reported(self.objects[-1])
    return row

  def object_class_totals(self) -> dict[int, dict[str, float]]:
    """Each class's (region's) object counts summed over the images; {} for one class."""
    return object_scores.summed_per_class(self.object_classes)

  def object_totals(self) -> dict[str, float]:
    """The images' object counts summed (object_scores.py)."""
    return object_scores.summed(self.objects)

  def surface_means(self, include_background: bool) -> dict[str, Any]:
    """The means of the images' surface scores (mean_surface_scores), with NSD's tolerance."""
    return {**surface_distance.mean_surface_scores(self.surface, include_background),
            'nsd_tolerance': self.nsd_tolerance}


def score_columns(scores: dict[str, np.ndarray], include_background: bool,
                  ) -> dict[str, float]:
  """One image's scores as a per-image row's columns: each per-class score's mean over the
  scored classes, the pixel accuracy, then (several classes) each class's scores."""
  row, classes = {}, {}
  for name in losses.PER_CLASS_SCORES:
    per_class = scores[name]
    row[name] = float32_decimal(losses.scored_classes(per_class, include_background).mean())
    if len(per_class) > 1:
      classes.update({f'{name}_class{c}': float32_decimal(v) for c, v in enumerate(per_class)})
  row['pixel_accuracy'] = float32_decimal(scores['pixel_accuracy'])
  return row | classes


def _image_rows(split: str, file_name: Callable[[int], str], first: int,
                scores: dict[str, np.ndarray], maps: MapScores,
                include_background: bool) -> list[dict[str, Any]]:
  """One row per valid image of a gathered batch whose first image is `first` in `split`.
  With class maps in the batch, also adds each image's to `maps`."""
  rows = []
  for r in np.flatnonzero(scores['valid']):
    index = first + int(r)
    row: dict[str, Any] = {'split': split, 'index': index, 'file_name': file_name(index)}
    row |= score_columns({k: scores[k][r] for k in ('pixel_accuracy', *losses.PER_CLASS_SCORES)},
                         include_background)
    if 'pred' in scores:
      row |= maps.add(scores['pred'][r], scores['labels'][r], scores['pixels'][r],
                      scores['dice'].shape[1], include_background)
    rows.append(row)
  return rows


def class_map_scores(pred: np.ndarray, labels: np.ndarray, pixels: np.ndarray, scored: int,
                     regions: Regions | None = None) -> dict[str, np.ndarray]:
  """losses.per_image_scores of predicted class ids (N, H, W) against `labels` on `pixels`, by
  the code that scores a model's logits: each prediction as the logits that give it (`scored`
  channels; 1 for a binary model, whose class 1 is its foreground). `regions`: `pred` is each
  pixel's regions (N, H, W, R), scored as a region model's."""
  if regions:
    logits = np.where(pred, 1.0, -1.0)
  else:
    logits = (np.where(pred == 1, 1.0, -1.0)[..., None] if scored == 1
              else np.eye(scored, dtype=np.float32)[pred])
  return jax.tree.map(np.asarray, losses.per_image_scores(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(pixels), regions))


def _post_processed(scores: dict[str, np.ndarray], post: PostProcessing,
                    painted: Painting | None = None,
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """A gathered batch's sums and scores again, for its predictions post-processed as
  `predict` post-processes them with the same flags (`post`), by the same metric code.
  `painted`: the predictions are regions, painted, post-processed region by region, and
  scored by the regions of the classes that remain."""
  if painted:
    classes = post(paint(scores['pred'], painted.order), painted.regions)
    pred = np.stack([np.isin(classes, region) for region in painted.regions], -1)
  else:
    pred = post(scores['pred'])
  new = class_map_scores(pred, scores['labels'], scores['pixels'], scores['dice'].shape[1],
                         painted and painted.regions)
  return losses.summed_scores(new, jnp.asarray(scores['valid'])), {**scores, **new, 'pred': pred}


def _sums_and_rows(p_scores, variables: dict[str, Any], batches: Any, split: str, source: Any,
                   global_batch: int, maps: MapScores, include_background: bool,
                   post: PostProcessing,
                   ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
  """evaluation_sums, and the rows of every image (single-process: the gathered scores are
  read whole); each image's class maps added to `maps` when the step gives them.
  `post`: of the predictions post-processed (_post_processed)."""
  sums, rows, file_name = None, [], _file_names(source)
  for b, batch in enumerate(batches):
    batch_sums, scores = p_scores(variables, batch)
    scores = jax.tree.map(np.asarray, scores)
    if post:  # (one that does nothing leaves the scores as they are)
      batch_sums, scores = _post_processed(scores, post, maps.painted)
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
    rows += _image_rows(split, file_name, b * global_batch, scores, maps, include_background)
  return jax.tree.map(np.asarray, sums), rows


def _ensemble_data(paths: Sequence[str], metas: Sequence[dict[str, Any]]) -> None:
  """Without --config, the checkpoints of an ensemble are scored on their runs' data, which
  must then be one: folds of a cross-validation hold out other pairs, each trained on the
  others' held-out ones."""
  def data(meta: dict[str, Any]) -> dict[str, Any]:
    run = meta.get('run_config') or {}
    return {**{f'data.{k}': v for k, v in (run.get('data') or {}).items()
               if k not in ('worker_count', 'num_threads')},  # (how, not what, it reads)
            **{k: run.get(k) for k in ('image_size', 'image_shape')}}
  first = data(metas[0])
  for path, meta in zip(paths[1:], metas[1:], strict=True):
    theirs = data(meta)
    differ = [k for k in sorted(set(first) | set(theirs)) if first.get(k) != theirs.get(k)]
    if differ:
      k = differ[0]
      raise UserError(f'{paths[0]} and {path} were trained on other data ({k}={first.get(k)!r} '
                      f'and {theirs.get(k)!r}): each may have trained on the other\'s held-out '
                      'images; name the data to score them on with --config (e.g. a test set '
                      'none of them trained on)')


def evaluate_checkpoint(checkpoint: str | Sequence[str],
                        config: ml_collections.ConfigDict | None = None,
                        split: str | None = None, per_image: bool = False, tta: bool = False,
                        surface: bool = False, include_background: bool | None = None,
                        confusion: bool = False, largest_component: bool = False,
                        min_region_size: int = 0,
                        nsd_tolerance: float = surface_distance.NSD_TOLERANCE,
                        objects: bool = False) -> dict[str, Any]:
  """Scores `checkpoint` on `split` (default: the config's data.eval_split; 'all': every
  split together) at the config's image_size, over all local devices. Several checkpoints (a
  sequence of paths): their ensemble, the mean of their probabilities (ensemble.py); without
  `config` their runs' data settings must be one.

  `config`: the data settings (a training config); None takes a workdir's own.
  Returns the metrics (as in metrics.jsonl, without the `eval_` prefix) plus `images`,
  `image_size`, `split`, `dataset` and `step` (None for a converted checkpoint; for an
  ensemble, each member's).
  `per_image`: also `per_image`, one dict per image in the dataset's order: `split`, `index`
  (in the split), `file_name` (the dataset's, '' where it has none) and the image's scores,
  whose means are the metrics.
  `tta`: score the mean logits over flips (flip_tta.py), as `predict --tta` masks.
  `surface`: also the boundary distances `hd95` and `assd` (surface_distance.py), in pixels
  at image_size, and `nsd`, the normalised surface Dice at `nsd_tolerance` pixels; per class
  too with several classes; in the per-image rows as well.
  `include_background`: whether class 0 of a multi-class model counts in the means over
  classes (per class, every class is given either way); None: the config's
  eval_include_background, as the run's evaluation did.
  `confusion`: also `confusion`, the pixel counts of each true class (rows) predicted as each
  class (columns), over the classes (2 for a binary model: background, foreground), ignored
  pixels left out.
  `largest_component`, `min_region_size`: score the predictions post-processed as `predict`
  does with those flags (post_processing.py: each class kept in its largest connected region
  of each image; its regions of fewer pixels, at image_size, set to class 0).
  `objects`: also the object scores (object_scores.py: connected regions matched above IoU
  0.5) over the images at image_size, and each image's in the rows.
  """
  post = PostProcessing(largest_component, min_region_size)
  check_nsd_tolerance(nsd_tolerance)
  paths = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
  loaded = load_one_task(paths)
  metrics = _evaluate_loaded(paths, loaded, config, split, per_image, tta, surface,
                             include_background, confusion, post, nsd_tolerance, objects)
  metrics.pop('object_totals', None)
  metrics.pop('object_class_totals', None)
  return metrics


def _evaluate_loaded(paths: Sequence[str], loaded: Sequence[tuple[Any, Any, dict[str, Any]]],
                     config: ml_collections.ConfigDict | None, split: str | None,
                     per_image: bool, tta: bool, surface: bool,
                     include_background: bool | None, confusion: bool,
                     post: PostProcessing, nsd_tolerance: float,
                     objects: bool = False) -> dict[str, Any]:
  """evaluate_checkpoint of checkpoints already loaded: (model, variables, metadata) of each
  of `paths`, checked to be one task."""
  from unet_jax.checkpoint import model_config
  from unet_jax.train import build_model, eval_include_background, eval_step, evaluation_sums
  if config is None and len(paths) > 1:
    _ensemble_data(paths, [m for _, _, m in loaded])
  model, variables, meta = loaded[0]
  config = _run_config(meta, config, paths[0])
  config.model.update(model_config(model))  # the checkpoint's network, whatever the config says
  if 'normalize' in meta:  # ... and the images it trained on (a converted one: the config's)
    config.data.normalize = meta['normalize']
    if meta.get('ct_statistics'):  # (its 'ct' statistics, whatever data it is scored on)
      with config.unlocked():
        config.data.ct_statistics = meta['ct_statistics']
  _with_recorded_regions(config, meta, paths[0])
  painted = _check_regions(config, model, include_background, paths[0])
  region_sets = painted and painted.regions
  if include_background is None:
    include_background = eval_include_background(config)
  mesh = parallel.make_mesh(jax.local_devices())
  # The run's eval batch, rounded up to fill every device here (the last batch is padded and
  # its padding left out of the scores, so the batch size changes nothing but speed).
  n = mesh.devices.size
  config.eval_batch_size = -(-(config.get('eval_batch_size') or config.batch_size) // n) * n
  depth = max(m.depth for m, _, _ in loaded)
  if min(input_pipeline.image_hw(config)) < 2**depth:
    raise UserError(f'image_size={training_size(config)} is below the model\'s minimum '
                    f'{2**depth}')
  split = split or config.data.eval_split
  config.data.eval_split = config.data.train_split  # (a split that exists, for `info` first)
  _, _, info = input_pipeline.load_sources(config)
  if split != ALL_SPLITS and split not in info.splits:
    raise UserError(f'dataset {info.name!r} has no split {split!r} (it has '
                    f"{', '.join(info.splits)}); choose one with --split, or --split all")
  if info.channels != model.in_channels:
    raise UserError(f'dataset {info.name!r} has {info.channels}-channel images but the '
                    f'checkpoint\'s model takes {model.in_channels}')
  if len(info.mask_values) > label_count(config):
    raise UserError(info.too_many_mask_values(
        f'data.regions cover class ids up to {label_count(config) - 1}' if region_sets else
        f"the checkpoint's model has {model.num_classes} output class(es)"))
  check_class_names(config.data.get('class_names', ()), max(model.num_classes, 2),
                    'data.class_names',
                    f"the checkpoint's model has {model.num_classes} output class(es)")
  class_names = list(input_pipeline.class_names(config, info))
  if len(loaded) == 1:
    eval_model, step_tta = build_model(config, None), tta
  else:  # (each member as build_model makes it: eval mode, the config's dtype)
    variables = tuple(v for _, v, _ in loaded)
    eval_model, step_tta = Ensemble(tuple(build_model(
        ml_collections.ConfigDict({**config.to_dict(), 'model': model_config(m)}), None)
        for m, _, _ in loaded), tta, region_sets), False
  variables = jax.device_put(variables, parallel.replicated(mesh))
  maps = MapScores(surface, confusion, label_count(config), nsd_tolerance, objects, painted)
  host = per_image or maps.needed or bool(post)  # (the class maps come to the host)
  step_fn = (functools.partial(_scores_step, maps=maps.needed or bool(post)) if host
             else eval_step)
  p_eval = parallel.distribute(
      functools.partial(step_fn, model=eval_model, ignore_id=info.ignore_id, tta=step_tta,
                        region_sets=region_sets),
      mesh, config.get('parallel', 'shard_map'), donate_state=False)
  sums, rows = None, []
  for name in info.splits if split == ALL_SPLITS else (split,):
    config.data.eval_split = name
    source = input_pipeline.load_sources(config)[1]
    batches = input_pipeline.eval_dataset(source, config)
    if host:
      part, split_rows = _sums_and_rows(p_eval, variables, batches, name, source,
                                        config.eval_batch_size, maps, include_background,
                                        post)
      rows += split_rows
    else:
      part = evaluation_sums(p_eval, variables, batches)
    sums = part if sums is None else jax.tree.map(lambda a, b: a + b, sums, part)
  metrics: dict[str, Any] = losses.finalize_eval_metrics(sums, include_background)
  if surface:
    metrics.update(maps.surface_means(include_background))
  if confusion:
    metrics['confusion'] = maps.confusion.tolist()
  if objects:  # (the counts kept too: cross_validation pools them)
    totals, class_totals = maps.object_totals(), maps.object_class_totals()
    metrics.update(object_scores.reported(totals), **object_scores.per_class(class_totals),
                   object_totals=totals, object_class_totals=class_totals)
  metrics.update(images=int(sums['count']), image_size=training_size(config), split=split,
                 dataset=info.name, step=(meta.get('step') if len(loaded) == 1 else
                                          [m.get('step') for _, _, m in loaded]), tta=tta,
                 include_background=bool(include_background),
                 largest_component=post.largest_component, min_region_size=post.min_region_size)
  if class_names:
    metrics['class_names'] = class_names
  if region_sets:
    metrics['regions'] = [list(r) for r in region_sets]
  if per_image:
    metrics['per_image'] = rows
  return metrics


def _with_recorded_regions(config: ml_collections.ConfigDict, meta: dict[str, Any],
                           checkpoint: str) -> None:
  """A checkpoint's channels are what it records: a converted region model's regions go into
  the config that names its data (refused against other regions there)."""
  recorded = as_regions(meta.get('regions'))
  if not recorded:
    return
  named = config_regions(config)
  if named and named != recorded:
    raise UserError(f"{checkpoint}: its channels are the regions {meta['regions']}, but "
                    f'--config gives data.regions={config.data.regions}; leave them out of '
                    'the config')
  with config.unlocked():
    config.data.regions = tuple(recorded)
    config.data.region_class_order = tuple(meta.get('region_class_order') or ())


def _check_regions(config: ml_collections.ConfigDict, model: Any,
                   include_background: bool | None, checkpoint: str) -> Painting | None:
  """The Painting of the config's data.regions (its model's channels), refused where they do
  not fit the model, or with class 0 left out of the means; None without them."""
  painted = painting(config_regions(config), config.data.get('region_class_order', ()),
                     model.num_classes, checkpoint, prefix='data.regions')
  if painted and include_background is False:
    raise UserError('--noinclude_background leaves class 0 out of the means, but the channels '
                    'are data.regions, all foreground; leave it out')
  return painted


_ROW_LABELS = ('checkpoint', 'split', 'index', 'file_name')  # (a row's fields that are no score)


def _check_one_cut(paths: Sequence[str], metas: Sequence[dict[str, Any]]) -> None:
  """The folds of one k-fold run: cut into as many folds with the same shuffle (or none), else
  their held-out pairs would overlap or leave some out."""
  def cut(meta: dict[str, Any]) -> dict[str, Any]:
    data = (meta.get('run_config') or {}).get('data') or {}
    return {'num_folds': data.get('num_folds', 0), 'fold_seed': data.get('fold_seed', -1)}
  first = cut(metas[0])
  for path, meta in zip(paths[1:], metas[1:], strict=True):
    theirs = cut(meta)
    for field, value in first.items():
      if theirs[field] != value:
        raise UserError(f'{paths[0]} and {path} hold out the folds of other cuts (data.{field}='
                        f'{value} and {theirs[field]}), which overlap or leave pairs out; '
                        'cross-validate the folds of one k-fold run')


def cross_validation(checkpoints: Sequence[str], split: str | None = None, tta: bool = False,
                     surface: bool = False, include_background: bool | None = None,
                     per_image: bool = False, confusion: bool = False,
                     largest_component: bool = False, min_region_size: int = 0,
                     nsd_tolerance: float = surface_distance.NSD_TOLERANCE,
                     objects: bool = False) -> dict[str, Any]:
  """The cross-validated scores of a k-fold run (nnU-Net's summary of its folds): each
  training workdir scored on its own run's held-out split (`split`: another of its splits),
  and the scores pooled over all those images, each image counting once, whichever fold
  scored it. Returns the pooled metrics with `images` and `folds` (each checkpoint's own
  `checkpoint`, `step`, `images`, `dice`), and with `per_image` every row, with its
  `checkpoint`; with `confusion` the sum of the folds' confusion matrices. Refuses checkpoints
  of other classes or inclusion of class 0, and an image scored by two of them."""
  post = PostProcessing(largest_component, min_region_size)
  check_nsd_tolerance(nsd_tolerance)
  paths = list(checkpoints)
  loaded = load_one_task(paths)
  _check_one_cut(paths, [meta for _, _, meta in loaded])
  folds, rows = [], []
  for path, fold in zip(paths, loaded, strict=True):
    scored = _evaluate_loaded([path], [fold], None, split, True, tta, surface,
                              include_background, confusion, post, nsd_tolerance, objects)
    folds.append(scored)
    rows += [{'checkpoint': path, **row} for row in scored.pop('per_image')]
  kinds = {f['include_background'] for f in folds}
  if len(kinds) > 1:
    raise UserError(f'{paths[0]} and the others score class 0 differently (their runs\' '
                    'eval_include_background); choose with --include_background or '
                    '--noinclude_background')
  seen: dict[str, str] = {}
  for row in rows:
    name = row['file_name']
    if name and name in seen:
      raise UserError(f'{name} is scored twice, by {seen[name]} and {row["checkpoint"]}: give '
                      'each fold\'s workdir once (the folds of a k-fold run hold out disjoint '
                      'images)')
    seen[name] = row['checkpoint']
  names = [k for k in rows[0] if k not in _ROW_LABELS and k not in object_scores.COLUMNS]
  metrics: dict[str, Any] = {}
  for name in names:  # (surface scores: None where a row has none, as the means leave NaN out)
    values = [r[name] for r in rows if r.get(name) is not None]
    metrics[name] = float32_decimal(np.mean(values, dtype=np.float32)) if values else None
  metrics.update(images=len(rows), image_size=folds[0]['image_size'], split=folds[0]['split'],
                 dataset=folds[0]['dataset'], tta=tta, include_background=kinds.pop(),
                 largest_component=post.largest_component, min_region_size=post.min_region_size,
                 folds=[{'checkpoint': p, 'step': f['step'], 'images': f['images'],
                         'dice': f['dice']} for p, f in zip(paths, folds, strict=True)])
  if surface:
    metrics['nsd_tolerance'] = nsd_tolerance
  if confusion:
    metrics['confusion'] = np.sum([f['confusion'] for f in folds], axis=0).tolist()
  if objects:  # (of the folds' counts pooled, not a mean of the images' ratios)
    metrics.update(object_scores.reported(object_scores.summed(
        f.pop('object_totals') for f in folds)))
    metrics.update(object_scores.per_class(object_scores.summed_per_class(
        f.pop('object_class_totals') for f in folds)))
  if folds[0].get('class_names'):  # (the first fold's run names the classes)
    metrics['class_names'] = folds[0]['class_names']
  if folds[0].get('regions'):  # (one task's: load_one_task)
    metrics['regions'] = folds[0]['regions']
  if per_image:
    metrics['per_image'] = rows
  return metrics


def check_csv_destination(path: str) -> None:
  """Refuses, before any compute, a CSV path that cannot be written."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UserError(f'--per_image {path}: no such folder {folder}; create it or choose another '
                    'path')
  if os.path.isdir(path):
    raise UserError(f'--per_image {path}: is a folder; name a .csv file')


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
  """The rows as CSV, written whole or not at all (a temporary file, renamed)."""
  try:
    with (replaced_on_success(path, '.per_image-') as tmp,
          open(tmp, 'w', newline='') as f):
      writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ['split', 'index'])
      writer.writeheader()
      writer.writerows(rows)
  except OSError as e:
    raise UserError(f'--per_image {path}: cannot write ({e.strerror})') from None


def _how_and_scores(metrics: dict[str, Any]) -> str:
  """The end of a report's first line (how the predictions were made and scored), the scores
  for people, the confusion matrix if any, and the metrics as one JSON line."""
  background_out = not metrics['include_background'] and 'dice_class1' in metrics
  post = PostProcessing(metrics['largest_component'], metrics['min_region_size'])
  # The table's rows: named classes (or regions), else a region's classes, else class ids.
  rows = metrics.get('class_names') or region_labels(metrics.get('regions') or ())
  return (f'{", logits averaged over flips" if metrics["tta"] else ""}{post.description()}'
          f'{", class 0 left out of the means" if background_out else ""}'
          f'{surface_distance.tolerance_text(metrics)}\n'
          f'{score_lines(metrics, rows)}'
          f'{confusion_lines(metrics)}{json.dumps(metrics)}')


def _report(paths: Sequence[str], metrics: dict[str, Any]) -> str:
  """For people, what was scored and the scores (score_lines), then the metrics as one JSON
  line."""
  if len(paths) > 1:
    checkpoint, step = f'the mean probabilities of {len(paths)} checkpoints', ''
  else:
    checkpoint = paths[0]
    step = f' (step {metrics["step"]})' if metrics['step'] is not None else ''
  return (f'{checkpoint}{step} on {metrics["dataset"]!r}, split {metrics["split"]}: '
          f'{metrics["images"]} images at {size_text(metrics["image_size"])}'
          f'{_how_and_scores(metrics)}')


def confusion_lines(metrics: dict[str, Any]) -> str:
  """The confusion matrix for people, a line per true class, ending in a newline; '' if none."""
  matrix = metrics.get('confusion')
  if matrix is None:
    return ''
  width = max(len(str(v)) for row in matrix for v in row) + 2
  lines = ['confusion (pixels; rows: true class, columns: predicted class)',
           ' ' * 6 + ''.join(str(c).rjust(width) for c in range(len(matrix)))]
  lines += [f'{c:>6}' + ''.join(str(v).rjust(width) for v in row) for c, row in enumerate(matrix)]
  return '\n'.join(lines) + '\n'


def _cross_validation_report(paths: Sequence[str], metrics: dict[str, Any]) -> str:
  """A line per fold and one for the pooled images, the pooled scores, then one JSON line."""
  folds = '\n'.join(f'{f["checkpoint"]} (step {f["step"]}): {f["images"]} images, dice '
                    f'{f["dice"]:.4f}' for f in metrics['folds'])
  return (f'{folds}\ncross-validation of {len(paths)} folds on {metrics["dataset"]!r}: '
          f'{metrics["images"]} images, each scored by the fold that held it out, at '
          f'{size_text(metrics["image_size"])}{_how_and_scores(metrics)}')


def main(argv: list[str]) -> None:
  from absl import app, flags, logging
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  csv_path = flags.FLAGS.per_image
  try:
    if csv_path:
      check_csv_destination(csv_path)
    options = dict(per_image=bool(csv_path), tta=flags.FLAGS.tta, surface=flags.FLAGS.surface,
                   include_background=flags.FLAGS.include_background,
                   confusion=flags.FLAGS.confusion,
                   largest_component=flags.FLAGS.largest_component,
                   min_region_size=flags.FLAGS.min_region_size,
                   nsd_tolerance=flags.FLAGS.nsd_tolerance, objects=flags.FLAGS.objects)
    if flags.FLAGS.cross_validation:
      if flags.FLAGS.config is not None:
        raise UserError('--cross_validation scores each workdir on its own run\'s held-out '
                        'split; leave out --config')
      metrics = cross_validation(flags.FLAGS.checkpoint, flags.FLAGS.split, **options)
    else:
      metrics = evaluate_checkpoint(flags.FLAGS.checkpoint, flags.FLAGS.config,
                                    flags.FLAGS.split, **options)
    if csv_path:
      write_csv(csv_path, metrics.pop('per_image'))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  report = (_cross_validation_report if flags.FLAGS.cross_validation else _report)
  print(report(flags.FLAGS.checkpoint, metrics), flush=True)
  if csv_path:
    print(f'per-image scores: {os.path.abspath(csv_path)} ({metrics["images"]} rows)',
          flush=True)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_multi_string('checkpoint', None, 'training workdir (or WORKDIR/checkpoints/STEP, '
                            '.../best) or converted checkpoint directory; given several times, '
                            'their ensemble (the mean of their probabilities)', required=True)
  config_flags.DEFINE_config_file('config', None, 'a training config naming the dataset '
                                  '(default: a workdir\'s own)', lock_config=True)
  flags.DEFINE_string('split', None, "the split to score (default: the config's "
                      "data.eval_split; 'all': every split together)")
  flags.DEFINE_bool('cross_validation', False, 'score each --checkpoint (the workdirs of a '
                    'k-fold run) on its own run\'s held-out split, and the pooled images')
  flags.DEFINE_bool('confusion', False, 'also the confusion matrix: pixels of each true class '
                    '(rows) predicted as each class (columns)')
  flags.DEFINE_bool('largest_component', False, 'score the predictions post-processed as '
                    'predict --largest_component (each class in its largest connected region)')
  flags.DEFINE_integer('min_region_size', 0, 'score the predictions post-processed as predict '
                       '--min_region_size (each region of a class with fewer pixels, at '
                       'image_size, set to class 0)')
  flags.DEFINE_bool('tta', False, 'score the mean logits over flips, as predict --tta')
  flags.DEFINE_bool('objects', False, 'also the object scores: each connected region (4 '
                    'neighbours) of a class but 0 an object, a predicted one matching a true '
                    'one of its class above IoU 0.5: object_precision, object_recall, '
                    'object_f1, panoptic_quality and the counts')
  flags.DEFINE_bool('surface', False, 'also the boundary distances hd95 (95th-percentile '
                    'Hausdorff) and assd (average symmetric surface distance), in pixels, and '
                    'nsd (normalised surface Dice)')
  flags.DEFINE_float('nsd_tolerance', surface_distance.NSD_TOLERANCE, "with --surface: nsd's "
                     'tolerance in pixels (a boundary pixel this close to the other counts)')
  flags.DEFINE_bool('include_background', None, 'whether class 0 of a multi-class model counts '
                    'in the means over classes (MONAI\'s include_background; '
                    '--noinclude_background: milesial\'s evaluate.py); default: the config\'s '
                    'eval_include_background')
  flags.DEFINE_string('per_image', None, 'also write each image\'s scores to this CSV file '
                      '(split, index, file_name, dice, iou, class_accuracy, pixel_accuracy)')


def command() -> None:
  """`unet-jax-evaluate ...` (installed by pip) and `python -m unet_jax.evaluate ...`."""
  from absl import app, flags
  # A config file's `from configs import base`: a configs/ package in the working directory,
  # else the checkout's, beside unet_jax/ (from any directory, as train.py finds it beside itself).
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.getcwd())
  if os.path.isdir(os.path.join(checkout, 'configs')):
    sys.path.insert(1, checkout)
  _define_flags()
  if __name__ != '__main__':
    # absl's --help shows __main__'s docstring and the flags defined there; under pip's
    # generated script those are this module's.
    sys.modules['__main__'].__doc__ = __doc__
    for flag in flags.FLAGS.get_key_flags_for_module(__name__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)


if __name__ == '__main__':
  command()

"""Scores mask files against label files with `evaluate`'s metrics, at the files' own size.

    python -m unet_jax.score_masks --predictions masks/ --labels labels/ [--mask_suffix _mask]

For the masks `predict` writes (at each input's own size) or any other model's, e.g. nnU-Net's
predictions, `NAME.png` (`--mask_suffix ''`), against its `labelsTs/NAME.png`. `evaluate`
scores a checkpoint at its training size; this scores what was written, at the labels'
resolution, as nnU-Net's evaluation of a folder does. Each label `NAME{label_suffix}.EXT` is
paired with the prediction `NAME{mask_suffix}.EXT`. The classes are the sorted distinct values
of the labels and predictions together (gray values, palette indices or RGB colours), as
training maps an image folder's mask values to classes; with `ignore_value`, the labels' pixels
of that value count nowhere. Per image and class: Dice, IoU and class accuracy (recall), by
`losses.per_image_scores`, the code evaluation uses (a class absent from both scores 1); their
means over images, and over the classes (without class 0 unless `include_background`).
With `regions` (sets of mask values, as nnU-Net evaluates a region dataset), each region is
scored instead: the pixels whose value is in it, in the prediction against the label.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from unet_jax import losses, object_scores, surface_distance
from unet_jax.config_checks import check_class_names
from unet_jax.datasets.image_folder import key_mask_value, read_mask_keys
from unet_jax.errors import UserError
from unet_jax.image_io import files_by_name, mask_value_text
from unet_jax.regions import Painting, parse_regions


def _pairs(predictions: str, labels: str, mask_suffix: str, label_suffix: str,
           ) -> list[tuple[str, str, str]]:
  """(label file name, prediction path, label path) for every label, sorted by name."""
  for folder, flag in ((predictions, '--predictions'), (labels, '--labels')):
    if not os.path.isdir(folder):
      raise UserError(f'{flag} {folder}: no such folder')
  # (predict's other files there, NAME_overlay.png, lack the mask suffix: skipped)
  found = files_by_name(predictions, mask_suffix)
  pairs = []
  for name, label_path in files_by_name(labels, label_suffix, lambda path: (
      f'{path}: a label not named NAME{label_suffix}.EXT (--label_suffix {label_suffix}); '
      'rename it, or set --label_suffix')).items():
    if name not in found:
      raise UserError(f'{label_path}: no prediction for it in {predictions} '
                      f'(expected {name}{mask_suffix}.png); predict it, or set --mask_suffix')
    pairs.append((os.path.basename(label_path), found[name], label_path))
  if not pairs:
    raise UserError(f'{labels}: no PNG/JPEG/TIFF/BMP/GIF labels in this folder')
  return pairs


def _key_text(key: int, rgb: bool) -> str:
  """A mask key for people: 255, or a colour mask's 0xRRGGBB as #ff0000."""
  return mask_value_text(key_mask_value(key, rgb))


def score_folders(predictions: str, labels: str, mask_suffix: str = '_mask',
                  label_suffix: str = '', include_background: bool = True,
                  ignore_value: int = -1, surface: bool = False, confusion: bool = False,
                  class_names: Sequence[str] = (),
                  nsd_tolerance: float = surface_distance.NSD_TOLERANCE,
                  objects: bool = False,
                  regions: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
  """The means of the scores (as `evaluate` reports them) of each label's prediction, with
  `images`, `class_values` (each class's value; 0xRRGGBB for RGB masks, and then `rgb_masks`
  is true) and `per_image` (a row per label: its `file_name` and scores). `ignore_value`: a
  label value counted nowhere.
  `surface`: also the boundary distances `hd95` and `assd` in pixels and `nsd` at
  `nsd_tolerance` pixels; `confusion`: the
  confusion matrix (rows the true class), both as `evaluate` gives them. `class_names`: one
  per class, in value order, returned as `class_names` for the report. `objects`: also the
  object scores (object_scores.py: each connected region of a class but the smallest value's
  an object, matched above IoU 0.5) over all images, and each image's.
  `regions`: sets of mask values (0xRRGGBB for RGB), each scored in place of the classes: the
  pixels whose value is in it, in the prediction against the label (nnU-Net's evaluation of
  regions); `class_names` then names the regions, and the surface and object scores are
  each region's. Not with `confusion` (of classes) or without `include_background`."""
  from unet_jax.evaluate import MapScores, check_nsd_tolerance, class_map_scores, score_columns
  check_nsd_tolerance(nsd_tolerance)
  _check_regions(regions, include_background, confusion)
  pairs = _pairs(predictions, labels, mask_suffix, label_suffix)
  # Every pair is read twice, first to find the classes (all values) and check the sizes, then
  # to score it: memory holds one pair, not all (5,000 Carvana-sized pairs: 200 GB of keys).
  values: set[int] = set()
  rgb = False
  for _, pred_path, label_path in pairs:
    (pred, pred_rgb), (label, label_rgb) = read_mask_keys(pred_path), read_mask_keys(label_path)
    rgb |= pred_rgb or label_rgb
    if pred.shape != label.shape:
      raise UserError(f'{pred_path}: is {pred.shape[1]}x{pred.shape[0]} but its label '
                      f'{label_path} is {label.shape[1]}x{label.shape[0]}; predict at the '
                      "labels' size")
    values.update(np.unique(pred).tolist())
    values.update(np.unique(label[label != ignore_value]).tolist())
  keys = np.asarray(sorted(values), np.int64)
  num_classes = max(len(keys), 2)  # (one value only: a class 1 absent everywhere)
  painted = _value_regions(regions, keys)
  check_class_names(class_names, len(painted.regions) if painted else num_classes,
                    '--class_names', f'--regions gives {len(painted.regions)} region(s)'
                    if painted else "the masks' values "
                    f'[{", ".join(_key_text(int(k), rgb) for k in keys[:8])}]')
  sums, rows = None, []
  maps = MapScores(surface, confusion, num_classes, nsd_tolerance, objects, painted)
  for file_name, pred_path, label_path in pairs:
    pred, label = read_mask_keys(pred_path).keys, read_mask_keys(label_path).keys
    valid = label != ignore_value
    ids = np.searchsorted(keys, np.where(valid, label, keys[0]))
    pred_ids = np.searchsorted(keys, pred)
    if painted:  # (each pixel's regions: those holding its value's class)
      pred_ids = np.stack([np.isin(pred_ids, r) for r in painted.regions], -1)
    scores = class_map_scores(pred_ids[None], ids[None], valid[None], num_classes,
                              painted and painted.regions)
    part = losses.summed_scores(scores, jnp.ones(1, bool))
    sums = part if sums is None else {k: sums[k] + v for k, v in part.items()}
    rows.append({'file_name': file_name}
                | score_columns({k: v[0] for k, v in scores.items()}, include_background)
                | maps.add(pred_ids, ids, valid, num_classes, include_background))

  metrics: dict[str, Any] = losses.finalize_eval_metrics(sums, include_background)
  if surface:
    metrics.update(maps.surface_means(include_background))
  if confusion:
    metrics['confusion'] = maps.confusion.tolist()
  if objects:
    metrics.update(object_scores.reported(maps.object_totals()))
    metrics.update(object_scores.per_class(maps.object_class_totals()))
  metrics.update(images=len(pairs), include_background=include_background,
                 class_values=[int(k) for k in keys], rgb_masks=rgb, per_image=rows)
  if regions:
    metrics['regions'] = [[int(v) for v in r] for r in regions]
  if class_names:
    metrics['class_names'] = list(class_names)
  return metrics


def _check_regions(regions: Sequence[Sequence[int]] | None, include_background: bool,
                   confusion: bool) -> None:
  """Refuses, before any file is read, regions with what they do not define."""
  if not regions:
    return
  if confusion:
    raise UserError('--confusion counts classes, --regions scores sets of them; score the '
                    'confusion matrix without --regions')
  if not include_background:
    raise UserError('--noinclude_background leaves class 0 out of the means, but --regions '
                    'scores the regions alone; leave it out')
  for k, region in enumerate(regions):
    if len(set(region)) != len(region):
      raise UserError(f'--regions: region {k} names a value twice')


def _value_regions(regions: Sequence[Sequence[int]] | None, keys: np.ndarray,
                   ) -> Painting | None:
  """Regions of mask values as regions of the class ids the values map to (a value in no
  mask: an id that no pixel has), for MapScores and the scores; None without regions."""
  if not regions:
    return None
  present = set(keys.tolist())
  return Painting(tuple(tuple(int(np.searchsorted(keys, v)) for v in region if v in present)
                        or (-1,) for region in regions), ())


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog='python -m unet_jax.score_masks',
      description="Score mask files against label files with evaluate's metrics, at the "
                  "files' own size.")
  p.add_argument('--predictions', required=True, help='folder of predicted masks')
  p.add_argument('--labels', required=True, help='folder of true masks (the labels)')
  p.add_argument('--mask_suffix', default='_mask',
                 help="predictions are named NAME{mask_suffix}.EXT (default _mask, as predict "
                      "writes them; '' for NAME.png, as nnU-Net writes them)")
  p.add_argument('--label_suffix', default='',
                 help='labels are named NAME{label_suffix}.EXT (default none)')
  p.add_argument('--noinclude_background', dest='include_background', action='store_false',
                 help='leave class 0 (the smallest value) out of the means over classes')
  p.add_argument('--ignore_value', type=int, default=-1,
                 help="the labels' pixels of this value count nowhere (0xRRGGBB for RGB)")
  p.add_argument('--surface', action='store_true', help='also the boundary distances hd95 '
                 '(95th-percentile Hausdorff) and assd (average symmetric surface distance), in '
                 'pixels, and nsd (normalised surface Dice)')
  p.add_argument('--nsd_tolerance', type=float, default=surface_distance.NSD_TOLERANCE,
                 help="with --surface: nsd's tolerance in pixels (default "
                      f'{surface_distance.NSD_TOLERANCE:g})')
  p.add_argument('--confusion', action='store_true', help='also the confusion matrix: pixels '
                 'of each true class (rows) predicted as each class (columns)')
  p.add_argument('--objects', action='store_true', help='also the object scores: each '
                 'connected region (4 neighbours) of a class but the first an object, a '
                 'predicted one matching a true one of its class above IoU 0.5: '
                 'object_precision, object_recall, object_f1, panoptic_quality and the counts')
  p.add_argument('--class_names', type=lambda text: text.split(','), default=[],
                 metavar='NAME,NAME,...', help="each class's name, in value order, for the "
                 "report's table of per-class scores (e.g. background,liver,tumour)")
  p.add_argument('--per_image', default=None, help="also write each image's scores to this "
                 'CSV file')
  p.add_argument('--regions', default=None, metavar='V,V;V;...',
                 help="score regions instead of classes, each a set of mask values (nnU-Net's "
                      "evaluation of a region dataset): e.g. '1,2,3;2,3;3' for BraTS's whole "
                      'tumour, tumour core, enhancing; 0xRRGGBB for colours')
  args = p.parse_args(argv)
  from unet_jax.evaluate import check_csv_destination, confusion_lines, write_csv
  from unet_jax.reporting import score_lines
  try:
    if args.per_image:
      check_csv_destination(args.per_image)
    metrics = score_folders(args.predictions, args.labels, args.mask_suffix, args.label_suffix,
                            args.include_background, args.ignore_value, args.surface,
                            args.confusion, args.class_names, args.nsd_tolerance,
                            args.objects, None if args.regions is None
                            else parse_regions(args.regions, '--regions'))
    rows = metrics.pop('per_image')
    if args.per_image:
      write_csv(args.per_image, rows)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  background_out = not args.include_background
  values = [_key_text(v, metrics['rgb_masks']) for v in metrics['class_values']]
  print(f'{args.predictions} against {args.labels}: {metrics["images"]} masks at their own '
        f'size, classes [{", ".join(values[:8])}{", ..." if len(values) > 8 else ""}]'
        f'{", class 0 left out of the means" if background_out else ""}'
        f'{surface_distance.tolerance_text(metrics)}')
  # The table's rows: each class's name, else its mask value (class 1 is 255, or #ff0000);
  # each region's name, else its values.
  labels = args.class_names or (
      [f'(values {",".join(_key_text(v, metrics["rgb_masks"]) for v in r)})'
       for r in metrics['regions']] if 'regions' in metrics else
      [f'(value {v})' for v in values])
  print(score_lines(metrics, labels) + confusion_lines(metrics) + json.dumps(metrics),
        flush=True)
  if args.per_image:
    print(f'per-image scores: {os.path.abspath(args.per_image)} ({len(rows)} rows)')
  return 0


if __name__ == '__main__':
  sys.exit(main())

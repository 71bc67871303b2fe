"""Prediction on images: a Python API on arrays and a command line on files.

    python -m unet_jax.predict --checkpoint WORKDIR_OR_CONVERTED img.png more/ --output masks/
    masks = unet_jax.predict(model, variables, images)          # (N, H, W) class ids

Masks come out at each input's own size. The UNet runs fully convolutionally on the whole image
(resized to `size` x `size` first if given, as training resizes; the command line's default for
a training workdir), or with `tile` on overlapping tiles blended so that every pixel is taken
from tiles where it sits at least about overlap/2 from a tile edge. Where that distance covers
the network's receptive field and H, W are multiples of 2**depth, the tiled mask equals the
whole-image one.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import losses
from unet_jax.ct_normalization import CTStatistics, recorded_normalization
from unet_jax.ensemble import load_one_task
from unet_jax.errors import UserError
from unet_jax.flip_tta import eval_logits
from unet_jax.gaussian_tiles import gaussian_importance, tile_starts
from unet_jax.image_io import (
  IMAGE_SUFFIXES,
  channel_cases,
  drawable,
  first_file,
  height_width,
  image_suffixes,
  mask_colours,
  normalized,
  parse_size,
  resample_filter,
  resize,
  sixteen_bit,
  size_text,
  stacked_channels,
  suffix_pattern,
  unit_scaled,
  with_channel_hint,
)
from unet_jax.losses import predict_classes
from unet_jax.model import UNet
from unet_jax.post_processing import PostProcessing, instance_labels
from unet_jax.post_processing import keep_largest_component as keep_largest_component
from unet_jax.regions import Painting, Regions, label_classes, paint, painting


@functools.lru_cache(maxsize=8)
def eval_apply(model: UNet, tta: bool = False) -> Callable[[Any, jax.Array], jax.Array]:
  """`model.apply(variables, x, train=False)`, jitted once per model config and reused, so
  repeated calls (every file, every evaluation) do not compile it again. `tta`: the mean over
  flips (flip_tta.py)."""
  return jax.jit(lambda v, x: eval_logits(model, v, x, tta))


def _ramp(length: int, ramp: int, margin: int, at_start: bool, at_end: bool) -> np.ndarray:
  """Weights along one tile axis: 0 within `margin` of an inner edge, rising over `ramp`."""
  d = np.arange(length, dtype=np.float32)
  w = np.ones(length, np.float32)
  if not at_start:
    w = np.minimum(w, np.clip((d + 1 - margin) / ramp, 0, 1))
  if not at_end:
    w = np.minimum(w, np.clip((length - d - margin) / ramp, 0, 1))
  return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
  if size <= tile:
    return [0]
  starts = list(range(0, size - tile, stride)) + [size - tile]
  return sorted(set(starts))


BLENDS = ('ramp', 'gaussian')  # how tiles are blended (predict_logits)


class _AxisTiling(NamedTuple):
  """How one image axis is cut: tiles of `tile` pixels every `stride`, blended by weights 0
  within `margin` of an inner tile edge, rising over `ramp`; for the Gaussian blend, steps of
  at most `stride_fraction` of the tile (nnU-Net's tile_step_size: (tile - overlap) / tile)."""
  tile: int
  stride: int
  ramp: int
  margin: int
  stride_fraction: float


def tiling(tile: int | Sequence[int], overlap: int | Sequence[int] | None, depth: int,
           ) -> tuple[_AxisTiling, _AxisTiling]:
  """The (height, width) tiling of `tile` (a side, or (height, width)) with `overlap` (one for
  both axes, or (height, width); default half the tile), checked: each tile side a multiple of
  2**depth, each overlap in [0, that side)."""
  unit = 2**depth
  tiles = height_width(tile)
  overlaps = (tuple(t // 2 for t in tiles) if overlap is None else height_width(overlap))
  axes = []
  for t, o in zip(tiles, overlaps, strict=True):
    if t <= 0 or t % unit:
      raise UserError(f'tile={size_text(tiles)}: each side must be a positive multiple of '
                      f'2**depth={unit}')
    if not 0 <= o < t:
      raise UserError(f'overlap={size_text(overlaps)} must be at least 0 and below the tile\'s '
                      f'side ({size_text(tiles)})')
    # Tile starts on multiples of 2**depth keep the pooling grid of the whole image.
    ramp = max(1, min(8, o // 4))
    axes.append(_AxisTiling(t, max(unit, (t - o) // unit * unit), ramp, max(0, o // 2 - ramp),
                            (t - o) / t))
  return axes[0], axes[1]


def predict_logits(model: UNet, variables: Any, images: np.ndarray, *,
                   size: int | Sequence[int] | None = None,
                   tile: int | Sequence[int] | None = None,
                   overlap: int | Sequence[int] | None = None, batch_size: int = 8,
                   tta: bool = False, resample: str = 'bilinear',
                   normalize: str | CTStatistics = 'unit', blend: str = 'ramp') -> np.ndarray:
  """Logits (N, H, W, classes) for images (N, H, W, C): float in [0, 1], uint8 or uint16 (16-bit
  gray; `unit_scaled`).

  `size`: run the network on each image resized to size x size (or to (height, width): a
  workdir's recorded image_size is either), as training resizes its examples to `image_size`
  (PIL's `resample` filter, 'bilinear' or 'bicubic' as the run's data.resample, on the 8- or
  16-bit image when it is one), and resize the logits back to H x W (bilinear, as milesial's
  predict.py does); None runs at H x W.
  `tile`, `overlap`: run overlapping tiles (a side, or (height, width); `tiling`) of the image
  (after any resize) and blend them, for images too large to run whole. `blend`: 'ramp' takes
  each pixel from tiles where it lies at least about overlap/2 from an inner edge (starts on
  multiples of 2**depth: the whole image's logits where that covers the receptive field);
  'gaussian' is nnU-Net's sliding window (gaussian_tiles.py): tiles every (tile - overlap)
  pixels at most, spread evenly, their logits weighed by a Gaussian of sigma tile/8 about each
  tile's centre.
  `tta`: each network input (image or tile) as the mean of its logits over flips (flip_tta.py).
  `normalize`: 'zscore' gives the network each image (after any resize, before tiling) with
  its channels at mean 0 and deviation 1, 'minmax' stretched to [0, 1], a run's CTStatistics
  (its 'ct', `recorded_normalization`) by nnU-Net's CT normalisation, as a run with that
  data.normalize trained.
  """
  if blend not in BLENDS:
    raise UserError(f'blend={blend!r}: use one of {", ".join(BLENDS)}')
  images = np.asarray(images)
  if size:
    from PIL import Image
    height, width = height_width(size)
    logits = predict_logits(
        model, variables,
        np.stack([resize(im, height, width, resample_filter(resample)) for im in images]),
        tile=tile, overlap=overlap, batch_size=batch_size, tta=tta, normalize=normalize,
        blend=blend)
    return np.stack([resize(x, images.shape[1], images.shape[2], Image.BILINEAR)
                     for x in logits])
  images = normalized(unit_scaled(images), normalize)
  fn = eval_apply(model, tta)

  def run(inputs: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(fn(variables, inputs[i:i + batch_size]))
                           for i in range(0, len(inputs), batch_size)])

  if not tile:
    return run(images)
  along_h, along_w = tiling(tile, overlap, model.depth)
  if blend == 'gaussian':
    return _gaussian_sliding_window(run, images, along_h, along_w, model.num_classes)
  return _ramp_tiles(run, images, along_h, along_w, model.num_classes)


def _blended(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
             tile: tuple[int, int], windows: Sequence[tuple[int, int]],
             weights: Callable[[int, int], np.ndarray], classes: int) -> np.ndarray:
  """The sum over `windows` (tile starts) of each tile's logits times `weights(y, x)`, divided
  by the summed weights."""
  th, tw = tile
  out = np.zeros(images.shape[:3] + (classes,), np.float32)
  weight = np.zeros((1,) + images.shape[1:3] + (1,), np.float32)
  for y, x in windows:
    wt = weights(y, x)
    out[:, y:y + th, x:x + tw] += run(images[:, y:y + th, x:x + tw]) * wt
    weight[:, y:y + th, x:x + tw] += wt
  return out / np.maximum(weight, 1e-12)


def _ramp_tiles(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                along_h: _AxisTiling, along_w: _AxisTiling, classes: int) -> np.ndarray:
  """Tiles starting on the pooling grid, each pixel taken from tiles where it lies away from an
  inner edge (weights 0 within `margin`, rising over `ramp`); an image within one tile whole."""
  h, w = images.shape[1:3]
  if h <= along_h.tile and w <= along_w.tile:
    return run(images)
  th, tw = min(along_h.tile, h), min(along_w.tile, w)

  def weights(y: int, x: int) -> np.ndarray:
    wy = _ramp(th, along_h.ramp, along_h.margin, y == 0, y + th == h)
    wx = _ramp(tw, along_w.ramp, along_w.margin, x == 0, x + tw == w)
    return (wy[:, None] * wx[None, :])[None, :, :, None]
  return _blended(run, images, (th, tw), [(y, x) for y in _starts(h, th, along_h.stride)
                                          for x in _starts(w, tw, along_w.stride)], weights,
                  classes)


def _gaussian_sliding_window(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                             along_h: _AxisTiling, along_w: _AxisTiling,
                             classes: int) -> np.ndarray:
  """nnU-Net's predict_sliding_window_return_logits: an image smaller than the tile along an
  axis padded there with 0 (after normalisation) to the tile's size, half before and half after
  (the odd pixel after: its pad_nd_image), tiles weighed by the Gaussian importance map, and the
  logits cropped back to the image."""
  h, w = images.shape[1:3]
  th, tw = along_h.tile, along_w.tile
  (top, bottom), (left, right) = [(max(0, t - s) // 2, max(0, t - s) - max(0, t - s) // 2)
                                  for t, s in ((th, h), (tw, w))]
  padded = np.pad(images, [(0, 0), (top, bottom), (left, right), (0, 0)])
  gaussian = gaussian_importance(th, tw)[None, :, :, None]
  windows = [(y, x) for y in tile_starts(padded.shape[1], th, along_h.stride_fraction)
             for x in tile_starts(padded.shape[2], tw, along_w.stride_fraction)]
  logits = _blended(run, padded, (th, tw), windows, lambda y, x: gaussian, classes)
  return logits[:, top:top + h, left:left + w]


def _check_threshold(model: UNet, threshold: float, regions: Regions | None = None) -> None:
  if not 0 < threshold < 1:
    raise UserError(f'threshold={threshold} must be in (0, 1): the probability above which a '
                    'pixel is foreground')
  if threshold != 0.5 and model.num_classes != 1 and not regions:
    raise UserError(f'threshold={threshold} is for binary models (1 output channel); this one '
                    f'has {model.num_classes} classes and takes the argmax')


def predict(model: UNet, variables: Any, images: np.ndarray, *,
            size: int | Sequence[int] | None = None, tile: int | Sequence[int] | None = None,
            overlap: int | Sequence[int] | None = None, batch_size: int = 8, tta: bool = False,
            threshold: float = 0.5, resample: str = 'bilinear',
            normalize: str | CTStatistics = 'unit',
            largest_component: bool = False, min_region_size: int = 0,
            blend: str = 'ramp', regions: Sequence[Sequence[int]] | None = None,
            region_class_order: Sequence[int] = ()) -> np.ndarray:
  """Class ids (N, H, W) for images (N, H, W, C) or (H, W, C); uint8 and uint16 images are scaled to
  [0, 1] (`unit_scaled`).

  `size`: the network sees each image at size x size (or (height, width)), as in training,
  resized with `resample` and normalised as `normalize` says (see `predict_logits`).
  `tta`: the mean logits over flips (four forward passes; flip_tta.py).
  `tile`, `overlap`, `blend`: tiled, as `predict_logits` runs it.
  Binary models (1 output channel): foreground where the probability exceeds `threshold`
  (milesial's --mask-threshold); others take the argmax.
  `largest_component`: each class kept only in its largest connected region of each image
  (post_processing.keep_largest_component).
  `min_region_size`: each connected region of a class with fewer pixels (at the images' own
  size) set to class 0 (post_processing.remove_small_regions).
  `regions` (a run's data.regions; regions.py): the channels are regions, each a sigmoid, and
  the mask is painted from those above `threshold`, region by region, each as its class of
  `region_class_order` (default: the one class it covers that no later region does); the
  post-processing then acts on each region's pixels (PostProcessing.per_region).
  """
  post = PostProcessing(largest_component, min_region_size)
  painted = painting(regions, region_class_order, model.num_classes, 'the model')
  _check_threshold(model, threshold, painted and painted.regions)
  images = np.asarray(images)
  single = images.ndim == 3
  if single:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != model.in_channels:
    raise UserError(f'images must be (N, H, W, {model.in_channels}) for this model, got shape '
                    f'{tuple(images.shape)}')
  logits = predict_logits(model, variables, images, size=size, tile=tile, overlap=overlap,
                          batch_size=batch_size, tta=tta, resample=resample,
                          normalize=normalize, blend=blend)
  classes = post(classes_from_logits(logits, threshold, painted), painted and painted.regions)
  return classes[0] if single else classes


def classes_from_logits(logits: np.ndarray, threshold: float = 0.5,
                        painted: Painting | None = None) -> np.ndarray:
  """Class ids (N, H, W): for one channel sigmoid(logit) > threshold, else the argmax; with
  `painted` regions, the mask painted from those whose sigmoid > threshold."""
  if painted is not None:
    return paint(np.asarray(logits) > np.log(threshold / (1 - threshold)), painted.order)
  if threshold == 0.5:  # the logit above 0, as training's evaluation takes it
    return np.asarray(predict_classes(jnp.asarray(logits)))
  return (logits[..., 0] > np.log(threshold / (1 - threshold))).astype(np.int32)


def probabilities(logits: np.ndarray, regions: Regions | None = None) -> np.ndarray:
  """(N, H, W, C) float32: the foreground's sigmoid for one channel (each region's with
  `regions`), the softmax otherwise."""
  return np.asarray(losses.probabilities(jnp.asarray(logits, jnp.float32), regions))


def ensemble_probabilities(members: Sequence[tuple[UNet, Any]], images: np.ndarray, *,
                           sizes: Sequence[Any] | None = None,
                           resamples: Sequence[str] | None = None,
                           normalizations: Sequence[str | CTStatistics] | None = None,
                           tile: int | Sequence[int] | None = None,
                           overlap: int | Sequence[int] | None = None, batch_size: int = 8,
                           tta: bool = False, blend: str = 'ramp',
                           regions: Regions | None = None) -> np.ndarray:
  """The mean over `members`, (model, variables) pairs of one task (the same classes), of their
  probabilities (N, H, W, C) for images (N, H, W, C): nnU-Net's ensemble of its folds, which
  averages their softmax outputs. `sizes`, `resamples`, `normalizations`: one `size`,
  `resample` and `normalize` (as `predict_logits` takes them) per member, e.g. each as it
  trained; None: every member at the images' own size, bilinear, scaled to [0, 1]. `tta`
  averages each member's logits over flips first, as nnU-Net mirrors within a fold.
  `regions`: the members' channels are regions, each's sigmoid averaged.
  """
  sizes = [None] * len(members) if sizes is None else sizes
  resamples = ['bilinear'] * len(members) if resamples is None else resamples
  normalizations = ['unit'] * len(members) if normalizations is None else normalizations
  total = None
  for (model, variables), size, resample, normalize in zip(members, sizes, resamples,
                                                           normalizations, strict=True):
    probs = probabilities(predict_logits(model, variables, images, size=size, tile=tile,
                                         overlap=overlap, batch_size=batch_size, tta=tta,
                                         resample=resample, normalize=normalize,
                                         blend=blend), regions)
    total = probs if total is None else total + probs
  return total / np.float32(len(members))


def classes_from_probabilities(probs: np.ndarray, threshold: float = 0.5,
                               painted: Painting | None = None) -> np.ndarray:
  """Class ids (N, H, W): for one channel the probability above `threshold`, else the argmax;
  with `painted` regions, the mask painted from those above `threshold`."""
  if painted is not None:
    return paint(probs > threshold, painted.order)
  if probs.shape[-1] == 1:
    return (probs[..., 0] > threshold).astype(np.int32)
  return probs.argmax(-1).astype(np.int32)


BATCH_SIZE = 8  # images through the network at once (the command line's default)


def _collect(inputs: Sequence[str]) -> list[str]:
  files = []
  for path in inputs:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path)
                     if f.lower().endswith(IMAGE_SUFFIXES))
      if not found:
        raise UserError(f'{path}: no PNG/JPEG/TIFF/BMP/GIF images in this folder')
      files += found
    elif os.path.isfile(path):
      files.append(path)
    elif os.path.exists(path):
      raise UserError(f'{path}: is neither a file nor a folder (a pipe, socket or device); give '
                      'image files or folders')
    else:
      raise UserError(f'{path}: no such file or folder')
  unique, seen = [], set()
  for f in files:  # a file named twice (also through its folder) is one input
    real = os.path.realpath(f)
    if real not in seen:
      seen.add(real)
      unique.append(f)
  return unique


def _output_names(files: Sequence[str], output: str, image_suffix: str = '',
                  mask_suffix: str = '_mask', also: Sequence[tuple[str, str]] = (),
                  inputs: Sequence[str] = ()) -> list[str]:
  """Each input's NAME, its file name without extension and `image_suffix` (which it must
  have), for NAME{mask_suffix}.png in `output`, and each (what, ending) of `also` as
  NAME{ending} (e.g. ('overlay', '_overlay.png')); refuses two inputs of one NAME and a file
  that would be written over an input (of `files`, or of `inputs`: every channel file)."""
  names, written_by = [], {}
  inputs = {os.path.realpath(f) for f in (*files, *inputs)}
  for f in files:
    name = os.path.splitext(os.path.basename(f))[0]
    if image_suffix:
      if not name.endswith(image_suffix):
        raise UserError(with_channel_hint(_misnamed(image_suffix), [image_suffix],
                                          '--image_suffix')(f))
      name = name[:-len(image_suffix)]
    mask = f'{name}{mask_suffix}.png'
    if name in written_by:
      raise UserError(f'{written_by[name]} and {f} would both be written as {mask}; '
                      'rename one, or predict them into separate --output folders')
    for what, file_name in (('mask', mask), *((w, f'{name}{end}') for w, end in also)):
      if os.path.realpath(os.path.join(output, file_name)) in inputs:
        raise UserError(f'{f}: its {what} would be written over the input '
                        f'{os.path.join(output, file_name)}; choose another --output'
                        f'{" or --mask_suffix" if what == "mask" else ""}')
    written_by[name] = f
    names.append(name)
  return names


def _misnamed(image_suffix: str) -> Callable[[str], str]:
  """The refusal of an input file not named as --image_suffix says."""
  return lambda f: (f'{f}: not named NAME{suffix_pattern(image_suffix)}.EXT (--image_suffix '
                    f'{image_suffix}); rename it, or leave it out')


def _read_case(case: str | tuple[str, ...], channels: int) -> np.ndarray:
  """An input's (H, W, C) uint8 (or 16-bit gray's uint16) image: its file (`_read_image`), or the
  stack of its channels' gray files, which must be one size."""
  if isinstance(case, str):
    return _read_image(case, channels)
  return stacked_channels(case, [_read_image(path, 1, channel_file=True)[..., 0]
                                 for path in case])


def _read_image(path: str, channels: int, channel_file: bool = False) -> np.ndarray:
  """An input file's (H, W, channels) uint8 pixels (uint16 of 16-bit gray), as training reads its
  folder's images: for an RGB model a gray one repeated to RGB (as a folder of gray and colour
  images trains), for a gray model a colour one refused (it trained on gray alone). `channel_file`:
  one of a case's gray channel files (--image_suffix)."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      im.load()
      # (16-bit gray in any byte order, I;16 / I;16B / I;16L, as sixteen_bit takes it)
      gray = im.mode in ('L', 'I', 'F', '1', 'LA') or im.mode.startswith('I;16')
      if channel_file and not gray:
        raise UserError(f'{path}: a colour ({im.mode}) image, but --image_suffix names one file '
                        'per channel (each a gray image); save each channel as a gray image')
      if channels == 1 and not gray:
        raise UserError(f'{path}: is a colour ({im.mode}) image but the model takes 1 channel '
                        '(grayscale); convert it or use a model trained on RGB')
      if channels not in (1, 3):
        raise UserError(f'the model takes {channels} channels; one file gives 1 (gray) or 3 '
                        '(RGB): give one gray file per channel, named by --image_suffix (e.g. '
                        "_0000,_0001 for nnU-Net's NAME_0000.png, NAME_0001.png)")
      deep = sixteen_bit(im, path)  # (16-bit gray: kept at 16 bits, as training reads it)
      arr = deep if deep is not None else np.asarray(im.convert('L' if channels == 1 else 'RGB'))
      if channels == 3 and arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
  except UnidentifiedImageError:
    raise UserError(f'{path}: not an image PIL can read (PNG, JPEG, TIFF, BMP, GIF)') from None
  except OSError as e:
    raise UserError(f'{path}: cannot read it as an image ({e})') from None
  return arr[..., None] if arr.ndim == 2 else arr


def _mask_image(classes: np.ndarray, mask_values: list, palette: Sequence[int] = ()) -> Any:
  """Class ids -> a PIL image of the training mask values (gray or RGB); palette masks' values
  are indices, written as a palette image drawn with the training masks' `palette`."""
  from PIL import Image
  values = np.asarray(mask_values if mask_values else [0, 255], np.uint8)
  if len(values) < int(classes.max()) + 1:
    values = np.linspace(0, 255, int(classes.max()) + 1).astype(np.uint8)
  if not palette:
    return Image.fromarray(values[classes])
  image = Image.fromarray(values[classes], 'P')
  image.putpalette(list(palette))
  return image


_OVERLAY_COLOURS = [[255, 40, 40], [40, 200, 40], [40, 120, 255], [255, 200, 0]]


def _class_colours(classes: int, mask_values: list, palette: Sequence[int] = ()) -> np.ndarray:
  """(classes, 3) colours to draw each class in: the training masks' own (an RGB mask's
  colour, a palette mask's palette entry), else a fixed cycle after class 0's black."""
  own = mask_colours(classes, mask_values, palette)
  if own is not None:
    return own
  cycle = [_OVERLAY_COLOURS[(k - 1) % len(_OVERLAY_COLOURS)] for k in range(1, classes)]
  return np.asarray([[0, 0, 0], *cycle], np.float32)


def _write_instances(ids: np.ndarray, output: str, stem: str) -> None:
  """NAME_instances.png, 16-bit gray: each object's id (post_processing.instance_labels)."""
  from PIL import Image
  if ids.max(initial=0) > 65535:
    raise UserError(f'{stem}: {ids.max()} objects do not fit a 16-bit instance image; leave '
                    'out --instances, or predict smaller images')
  tmp = os.path.join(output, f'.{stem}_instances.png.tmp')
  Image.fromarray(ids.astype(np.uint16)).save(tmp, format='PNG')
  os.replace(tmp, os.path.join(output, f'{stem}_instances.png'))


def _overlay(image: np.ndarray, classes: np.ndarray, colours: np.ndarray) -> np.ndarray:
  """The image with every class but 0 (the background, by the sorted values) tinted."""
  rgb = drawable(image)
  alpha = np.where(classes[..., None] > 0, 0.45, 0.0)
  return (rgb * (1 - alpha) + colours[classes] * alpha).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m unet_jax.predict',
                              description='Write a mask PNG for each input image.')
  p.add_argument('inputs', nargs='+', help='image files or folders (PNG, JPEG, TIFF)')
  p.add_argument('--checkpoint', required=True, action='append',
                 help='training workdir or converted checkpoint directory; given several '
                      'times, the masks of the mean of their probabilities (an ensemble, e.g. '
                      'the folds of a cross-validation)')
  p.add_argument('--output', required=True, help='folder for NAME_mask.png (created)')
  p.add_argument('--mask_suffix', default='_mask',
                 help="masks are written as NAME{mask_suffix}.png (default _mask; '' for "
                      "NAME.png, as nnU-Net names its predictions)")
  p.add_argument('--image_suffix', default='',
                 help="taken off each input's NAME, which must end with it (nnU-Net's _0000: "
                      "imagesTs/NAME_0000.png gives NAME{mask_suffix}.png); several, "
                      "comma-separated, name one gray file per channel (_0000,_0001: "
                      "NAME_0000.png and NAME_0001.png are the channels of NAME)")
  p.add_argument('--overlay', action='store_true', help='also write NAME_overlay.png')
  p.add_argument('--instances', action='store_true',
                 help='also write NAME_instances.png: 16-bit, each connected region (4 '
                      'neighbours) of each class but 0 numbered 1, 2, ... (the objects of a '
                      'model trained with --config.border_weight)')
  p.add_argument('--tile', type=parse_size, default=None,
                 help='run large images in overlapping tiles of TILE x TILE (or HEIGHTxWIDTH) '
                      'pixels, each side a multiple of 2**depth')
  p.add_argument('--overlap', type=parse_size, default=None,
                 help='tile overlap, O or HEIGHTxWIDTH (default: half the tile)')
  p.add_argument('--blend', default='ramp', choices=BLENDS,
                 help="how --tile's tiles are blended: ramp (default; each pixel from tiles "
                      "where it lies away from an inner edge) or gaussian (nnU-Net's sliding "
                      'window: each tile weighed by a Gaussian about its centre)')
  p.add_argument('--threshold', type=float, default=0.5,
                 help='binary models: foreground where its probability exceeds this (default '
                      '0.5; milesial\'s --mask-threshold); models of data.regions: each '
                      'region where its probability does')
  p.add_argument('--largest_component', action='store_true',
                 help='keep each class only in its largest connected region of each image, '
                      'the rest background (MONAI\'s KeepLargestConnectedComponent)')
  p.add_argument('--min_region_size', type=int, default=0, metavar='PIXELS',
                 help='set each connected region of a class with fewer pixels than this (in '
                      'the mask as written) to background (scikit-image\'s '
                      'remove_small_objects, MONAI\'s RemoveSmallObjects); default 0: none')
  p.add_argument('--probabilities', action='store_true',
                 help='also write NAME_prob.npy: float32 (H, W, C) probabilities (sigmoid of '
                      'the one channel or of each region, or softmax over the classes)')
  p.add_argument('--tta', action='store_true',
                 help='average the logits over flips (4 forward passes per image)')
  p.add_argument('--batch_size', type=int, default=BATCH_SIZE,
                 help=f'images of one size through the network at once, and held in memory '
                      f'(default {BATCH_SIZE}); larger may be faster on a GPU')
  p.add_argument('--size', type=parse_size, default=None,
                 help="resize images to SIZE x SIZE (or HEIGHTxWIDTH) for the network, masks "
                      "back (default: a training workdir's image_size or image_shape, as it "
                      "trained; 0: each image's own size)")
  p.add_argument('--normalize', default=None,
                 help="for a converted checkpoint that records none: how its images were "
                      "normalised in training, 'unit' (scaled to [0, 1], the default), "
                      "'zscore' (then each image's channels to mean 0, deviation 1) or 'minmax' "
                      "(then each image's channels stretched to [0, 1]); a "
                      "training workdir's own is always used")
  args = p.parse_args(argv)
  from PIL import Image
  from tqdm import tqdm

  try:
    post = PostProcessing(args.largest_component, args.min_region_size)
    files = _collect(args.inputs)
    suffixes = image_suffixes(args.image_suffix, '--image_suffix')
    also = ([('overlay', '_overlay.png')] if args.overlay else []) + (
        [('probabilities', '_prob.npy')] if args.probabilities else []) + (
        [('instances', '_instances.png')] if args.instances else [])
    if len(suffixes) > 1:  # (one gray file per channel: a case is the tuple of its files)
      cases = list(channel_cases(files, suffixes, _misnamed(args.image_suffix),
                                 '--image_suffix').values())
    else:
      cases = files
    names = _output_names([first_file(c) for c in cases], args.output, suffixes[0],
                          args.mask_suffix, also, inputs=files)
    for flag, written in (('overlay', 'overlays'), ('instances', 'instance images')):
      if getattr(args, flag) and args.mask_suffix == f'_{flag}':
        raise UserError(f'--mask_suffix _{flag} would write the masks and the {written} '
                        f'(--{flag}) to the same files; choose another suffix')
    loaded = load_one_task(args.checkpoint, args.normalize)
    model, _, meta = loaded[0]
    members = [(m, v) for m, v, _ in loaded]
    if len(suffixes) > 1 and len(suffixes) != model.in_channels:
      raise UserError(f'--image_suffix {args.image_suffix} names {len(suffixes)} channel files '
                      f'per case, but the model takes {model.in_channels} channels')
    # Each member at its run's size and filter (a workdir's recorded size: an int, or
    # [height, width]; a converted checkpoint records none), unless --size says.
    sizes = [m.get('image_size', 0) if args.size is None else args.size for _, _, m in loaded]
    resamples = [m.get('resample', 'bilinear') for _, _, m in loaded]
    normalizations = [recorded_normalization(m) for _, _, m in loaded]
    depth = max(m.depth for m, _ in members)
    for size in sizes:
      if size and min(height_width(size)) < 2**depth:
        raise UserError(f'--size={size} is below the model\'s minimum {2**depth} (or 0: '
                        'each image at its own size)')
    painted = painting(meta.get('regions'), meta.get('region_class_order', ()),
                       model.num_classes, args.checkpoint[0])
    if painted and args.instances:
      raise UserError('--instances numbers the objects of each class, but this model\'s channels '
                      'are regions that overlap (data.regions); leave it out')
    _check_threshold(model, args.threshold, painted and painted.regions)
    if args.batch_size < 1:
      raise UserError(f'--batch_size={args.batch_size} must be at least 1')
    if args.tile:
      for m, _ in members:  # (their refusals, before any file is written)
        tiling(args.tile, args.overlap, m.depth)
    elif args.blend != 'ramp':
      raise UserError(f'--blend {args.blend} blends the tiles of --tile, which is not given; '
                      'give --tile (e.g. --tile 256), or leave out --blend')
    # Every file is read (decoded) to check it before anything is written, but only its shape
    # is kept: the images are read again a batch at a time, so memory holds one batch of images
    # and their logits, not the whole input (3.3 GB for 40 photos of 1918x1280 before).
    kinds = [(image.shape, image.dtype) for image in
             (_read_case(c, model.in_channels) for c in cases)]
    padded = args.tile and args.blend == 'gaussian'  # (to the tile: _gaussian_sliding_window)
    for c, (shape, _) in zip(cases, kinds, strict=True):
      if not all(sizes) and not padded and min(shape[:2]) < 2**depth:
        raise UserError(f'{first_file(c)}: {shape[1]}x{shape[0]} is smaller than the model\'s '
                        f'minimum {2**depth}x{2**depth}')
    if os.path.exists(args.output) and not os.path.isdir(args.output):
      raise UserError(f'{args.output}: exists and is not a folder; choose another --output')
    try:
      os.makedirs(args.output, exist_ok=True)
    except OSError as e:
      raise UserError(f'{args.output}: cannot create the output folder ({e.strerror})') from None
    # Images of the same size (and bit depth) go through the network together, in batches.
    groups: dict[tuple[tuple[int, ...], np.dtype], list[int]] = {}
    for i, kind in enumerate(kinds):
      groups.setdefault(kind, []).append(i)
    batches = [indices[j:j + args.batch_size] for indices in groups.values()
               for j in range(0, len(indices), args.batch_size)]
    mask_values, palette = meta.get('mask_values', []), meta.get('mask_palette', ())
    colours = _class_colours(label_classes(painted.regions) if painted else
                             max(model.num_classes, 2), mask_values, palette)
    region_sets = painted and painted.regions
    # (a bar in a terminal; into a log file it would write each refresh)
    with tqdm(total=len(cases), unit='image',
              disable=len(cases) < 4 or not sys.stderr.isatty()) as bar:
      for indices in batches:
        batch = np.stack([_read_case(cases[i], model.in_channels) for i in indices])
        if len(members) == 1:  # (thresholds the logits, as training's evaluation does)
          logits = predict_logits(model, members[0][1], batch, size=sizes[0] or None,
                                  tile=args.tile, overlap=args.overlap, tta=args.tta,
                                  batch_size=args.batch_size, resample=resamples[0],
                                  normalize=normalizations[0], blend=args.blend)
          masks = classes_from_logits(logits, args.threshold, painted)
          probs = (probabilities(logits, region_sets) if args.probabilities
                   else [None] * len(indices))
        else:
          probs = ensemble_probabilities(
              members, batch, sizes=[s or None for s in sizes], resamples=resamples,
              normalizations=normalizations, tile=args.tile, overlap=args.overlap,
              batch_size=args.batch_size, tta=args.tta, blend=args.blend,
              regions=region_sets)
          masks = classes_from_probabilities(probs, args.threshold, painted)
          if not args.probabilities:
            probs = [None] * len(indices)
        masks = post(masks, region_sets)
        for i, image, classes, prob in zip(indices, batch, masks, probs, strict=True):
          stem = names[i]
          tmp = os.path.join(args.output, f'.{stem}{args.mask_suffix}.png.tmp')
          _mask_image(classes, mask_values, palette).save(tmp, format='PNG')
          os.replace(tmp, os.path.join(args.output, f'{stem}{args.mask_suffix}.png'))
          if prob is not None:
            tmp = os.path.join(args.output, f'.{stem}_prob.npy.tmp')
            with open(tmp, 'wb') as f:
              np.save(f, prob)
            os.replace(tmp, os.path.join(args.output, f'{stem}_prob.npy'))
          if args.overlay:
            Image.fromarray(_overlay(image, classes, colours)).save(
                os.path.join(args.output, f'{stem}_overlay.png'))
          if args.instances:
            _write_instances(instance_labels(classes), args.output, stem)
          bar.update(1)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if len({size_text(s) if s else '' for s in sizes}) > 1:
    how = 'each checkpoint saw each image at its training image_size'
  elif sizes[0]:
    how = f'the network saw each image at {size_text(sizes[0])}' + (
        ', the training image_size (--size 0: each at its own size)' if args.size is None else '')
  else:
    how = 'each image at its own size'
  if normalizations[0] != 'unit':
    how += {'zscore': ", each image's channels z-scored",
            'minmax': ", each image's channels stretched to [0, 1]"}.get(
                normalizations[0], ", CT-normalised by the training foreground's statistics")
  if args.tta:
    how += ', its logits averaged over flips'
  if len(members) > 1:
    how += f', the mean probabilities of {len(members)} checkpoints'
  print(f'wrote {len(cases)} mask(s) to {os.path.abspath(args.output)} ({how})')
  return 0


class _CallableModule(type(sys)):
  """`unet_jax.predict` is both this module (`python -m unet_jax.predict`) and the function."""

  def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
    return predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == '__main__':
  sys.exit(main())

"""Image files to arrays, and resizing, one rule for training and prediction.

8-bit images are uint8 arrays, scaled to [0, 1] from 255; 16-bit gray ones (a CT, MRI or
microscopy image) uint16 arrays, scaled from 65535 (`unit_scaled`), so that they keep their
65536 levels: scaled to 8 bits, 1000 and 1100 would both read as 4 (PIL's own `convert('L')`
even clips them at 255, which turned such an image almost white).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from unet_jax.ct_normalization import CTStatistics, ct_normalized
from unet_jax.errors import UserError

# data.resample: PIL's filters an image may be resized with (masks: always nearest), by name.
RESAMPLE_FILTERS = ('bilinear', 'bicubic')

# File types read as images (and masks): what PIL reads that image datasets come in, e.g.
# Carvana's GIF masks (milesial/Pytorch-UNet's example data) and BMP.
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.gif')


def files_by_name(folder: str, suffix: str = '', misnamed: Callable[[str], str] | None = None,
                  keep: Callable[[str], bool] | None = None) -> dict[str, str]:
  """NAME -> path of each image file (IMAGE_SUFFIXES) in `folder`, in file-name order. NAME is
  the file name without its extension and without `suffix`, which each file must end with: one
  that does not is refused with `misnamed(path)` as the reason, or skipped without `misnamed`.
  `keep(stem)` false skips a file. Two files of one NAME (x.png and x.jpg) are refused: which
  of them is meant is not known."""
  found: dict[str, str] = {}
  for f in sorted(os.listdir(folder)):
    path, stem = os.path.join(folder, f), os.path.splitext(f)[0]
    if not f.lower().endswith(IMAGE_SUFFIXES) or (keep is not None and not keep(stem)):
      continue
    if suffix:
      if not stem.endswith(suffix):
        if misnamed is None:
          continue
        raise UserError(misnamed(path))
      stem = stem[:-len(suffix)]
    if stem in found:
      raise UserError(f'{found[stem]} and {path}: two files for {stem!r}; keep one')
    found[stem] = path
  return found


def image_suffixes(text: str, flag: str) -> tuple[str, ...]:
  """An image suffix setting (`flag`: where it was given, for refusals) as its suffixes: one
  (or '') for one image file per case, gray or RGB; several, comma-separated, for one gray file
  per channel, in the network's channel order: nnU-Net's `_0000,_0001` reads NAME_0000.png and
  NAME_0001.png as the two channels of case NAME."""
  suffixes = tuple(text.split(','))
  if len(suffixes) == 1:
    return suffixes
  if not all(suffixes) or len(set(suffixes)) < len(suffixes) or any(
      a != b and a.endswith(b) for a in suffixes for b in suffixes):
    raise UserError(f'{flag}={text!r}: give one suffix per channel file, each non-empty, '
                    "distinct and not the end of another, e.g. '_0000,_0001'")
  return suffixes


def _channel_hint(stem: str, suffixes: Sequence[str], flag: str) -> str:
  """Where a file misses the one image suffix as another channel's file of nnU-Net's naming
  would (NAME_0001 beside _0000): how to read such files as channels."""
  channel = re.compile(r'_\d{4}')
  if len(suffixes) != 1 or not channel.fullmatch(suffixes[0]) or not channel.fullmatch(stem[-5:]):
    return ''
  listed = ','.join(sorted((suffixes[0], stem[-5:])))  # (channels in nnU-Net's order)
  return (f"; if it is a channel of a case (nnU-Net's NAME_0000, NAME_0001, ...), list each "
          f"channel's suffix: {flag}={listed}")


def cases_by_name(folder: str, suffixes: Sequence[str], misnamed: Callable[[str], str],
                  flag: str, keep: Callable[[str], bool] | None = None,
                  ) -> dict[str, str | tuple[str, ...]]:
  """NAME -> the image file of each case in `folder` (`files_by_name` for one suffix of
  `image_suffixes`), or for several suffixes the tuple of its channels' files
  (`channel_cases`); `misnamed`, `flag`: as channel_cases takes them."""
  if len(suffixes) == 1:
    return files_by_name(folder, suffixes[0], with_channel_hint(misnamed, suffixes, flag), keep)
  return channel_cases(list(files_by_name(folder, '', None, keep).values()), suffixes, misnamed,
                       flag)


def channel_cases(paths: Sequence[str], suffixes: Sequence[str],
                  misnamed: Callable[[str], str], flag: str) -> dict[str, tuple[str, ...]]:
  """NAME -> the tuple of a case's channel files among `paths`, NAME{suffix}.EXT for each of
  `suffixes` in order, each of which it must have, sorted by NAME. A file without one of them
  is refused with `misnamed(path)` (and how to read it, where its name is another channel's);
  `flag`: the setting of the suffixes, for refusals."""
  refused = with_channel_hint(misnamed, suffixes, flag)
  cases: dict[str, list[str | None]] = {}
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    k = next((k for k, s in enumerate(suffixes) if stem.endswith(s)), None)
    if k is None:
      raise UserError(refused(path))
    case = cases.setdefault(stem[:-len(suffixes[k])], [None] * len(suffixes))
    if case[k] is not None:
      raise UserError(f'{case[k]} and {path}: two files for {stem!r}; keep one')
    case[k] = path
  for name, files in cases.items():
    for suffix, path in zip(suffixes, files, strict=True):
      if path is None:
        raise UserError(f'{next(p for p in files if p)}: case {name!r} has no {name}{suffix}.EXT '
                        f"({flag}={','.join(suffixes)}: one file per channel); add it, or leave "
                        "the case's files out")
  return {name: tuple(cases[name]) for name in sorted(cases)}


def with_channel_hint(misnamed: Callable[[str], str], suffixes: Sequence[str], flag: str,
                   ) -> Callable[[str], str]:
  """`misnamed`, with how to read the file where its name is another channel's (_channel_hint)."""
  return lambda path: misnamed(path) + _channel_hint(
      os.path.splitext(os.path.basename(path))[0], suffixes, flag)


def suffix_pattern(suffix: str) -> str:
  """How a setting's image suffix names files in a refusal: '_0000', or '{_0000,_0001}' for
  one file per channel."""
  return f'{{{suffix}}}' if ',' in suffix else suffix


def stacked_channels(paths: Sequence[str], planes: Sequence[np.ndarray]) -> np.ndarray:
  """A case's (H, W) channel planes, read from `paths`, as one (H, W, C) image; refused where
  they are not one size."""
  for path, plane in zip(paths[1:], planes[1:], strict=True):
    if plane.shape != planes[0].shape:
      raise UserError(f'{path}: is {plane.shape[1]}x{plane.shape[0]} but {paths[0]} is '
                      f'{planes[0].shape[1]}x{planes[0].shape[0]}; the channel files of a case '
                      'must be one size')
  if any(plane.dtype == np.uint16 for plane in planes):  # (an 8-bit one on 16 bits' scale)
    planes = [plane.astype(np.uint16) * np.uint16(257) if plane.dtype == np.uint8 else plane
              for plane in planes]
  return np.stack(planes, axis=-1)


def first_file(image: str | tuple[str, ...]) -> str:
  """A case's image file, or of one file per channel the first channel's (it names the case)."""
  return image if isinstance(image, str) else image[0]


def drawable(image: np.ndarray) -> np.ndarray:
  """An (H, W, C) image as 8-bit RGB to draw: itself when C is 3, else its first channel in
  gray (a gray image; of one file per channel, the first); 16 bits drawn on 8."""
  if image.dtype == np.uint16:
    image = np.round(image / 257).astype(np.uint8)
  return image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, -1)


def _integer_gray(im: Any) -> bool:
  return im.mode == 'I' or im.mode.startswith('I;16')  # (16-bit in either byte order; 32-bit)


def sixteen_bit(im: Any, path: str) -> np.ndarray | None:
  """The (H, W) uint16 pixels of a PIL image of 16-bit or 32-bit integer gray values, in
  either byte order; None for others (8-bit gray and colour modes). Refused: a 32-bit float
  image (its value range is unknown), and values outside 0..65535 (a signed CT slice's
  negative Hounsfield units, which clipping would make all alike)."""
  if im.mode == 'F':
    raise UserError(f'{path}: a 32-bit float image, whose value range is unknown; save it as an '
                    '8- or 16-bit image')
  if not _integer_gray(im):
    return None
  values = np.asarray(im)
  low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
  if low < 0 or high > 65535:
    raise UserError(f'{path}: values {low}..{high} do not fit 16 bits (0..65535); save it '
                    "shifted into them, e.g. a CT's Hounsfield units + 1024 as a 16-bit image")
  return values.astype(np.uint16)


def mask_levels(im: Any, path: str) -> Any:
  """A PIL mask of 16-bit or 32-bit integer gray values as 8-bit gray ('L'); others unchanged.
  Its values are class labels, kept as they are, and must fit 8 bits."""
  from PIL import Image
  if not _integer_gray(im):
    return im
  values = np.asarray(im)
  if values.min() < 0 or values.max() > 255:
    raise UserError(f'{path}: mask values {values.min()}..{values.max()} do not fit 8 bits; '
                    'save masks with values 0..255 (one per class)')
  return Image.fromarray(values.astype(np.uint8), 'L')


def peak_value(dtype: Any) -> int:
  """The white of an image of this dtype: 65535 for uint16 (16-bit gray), else 255."""
  return 65535 if np.dtype(dtype) == np.uint16 else 255


def unit_scaled(images: np.ndarray) -> np.ndarray:
  """Images as float32 in [0, 1]: integer ones divided by their `peak_value` (uint8 by 255,
  uint16 by 65535); float ones taken as already scaled."""
  if not np.issubdtype(images.dtype, np.integer):
    return images.astype(np.float32, copy=False)
  return images.astype(np.float32) / np.float32(peak_value(images.dtype))


NORMALIZATIONS = ('unit', 'zscore', 'minmax', 'ct')
_FLAG_CHOICES = ("use 'unit' (images scaled to [0, 1]), 'zscore' (then each image's channels "
                 "to mean 0, deviation 1) or 'minmax' (then each image's channels stretched to "
                 '[0, 1])')  # (for refusals of a command's --normalize, which takes no 'ct')
NORMALIZATION_CHOICES = ("use 'unit' (images scaled to [0, 1]), 'zscore' (then each image's "
                         "channels to mean 0, deviation 1), 'minmax' (then each image's "
                         "channels stretched to [0, 1]) or 'ct' (nnU-Net's CT normalisation, "
                         "by the training foreground's statistics)")  # (data.normalize's)


def check_normalize_flag(value: str) -> None:
  """A command's --normalize VALUE (convert's, predict's): one of NORMALIZATIONS but 'ct',
  whose statistics only a training run gathers."""
  if value == 'ct':
    raise UserError("--normalize ct: nnU-Net's CT normalisation uses statistics of the training "
                    'data, which only a checkpoint trained here with '
                    "data.normalize='ct' records; predict with such a checkpoint, or give "
                    'unit, zscore or minmax')
  if value not in NORMALIZATIONS:
    raise UserError(f'--normalize {value}: {_FLAG_CHOICES}')


def _over_pixels(where: Any, **initial: float) -> dict[str, Any]:
  """The keywords that take a reduction over an image's pixels to those `where` is true (all
  of them for None; min and max need their `initial` then)."""
  return {} if where is None else {'where': where, **initial}


def zscore(images: Any, where: Any = None) -> Any:
  """Each image's channels (the last axis; the two before it its height and width) shifted
  and scaled to mean 0 and deviation 1 (nnU-Net's ZScoreNormalization: the deviation over the
  pixels, at least 1e-8); with `where` (broadcast to `images`), of those pixels alone. NumPy or
  JAX arrays alike (export runs it inside its artifact)."""
  mean = images.mean(axis=(-3, -2), keepdims=True, **_over_pixels(where))
  return (images - mean) / images.std(axis=(-3, -2), keepdims=True,
                                      **_over_pixels(where)).clip(min=1e-8)


def minmax(images: Any, where: Any = None) -> Any:
  """Each image's channels (as `zscore` takes them) shifted to a minimum of 0 and divided by
  their new maximum, at least 1e-8 (nnU-Net's RescaleTo01Normalization, its rescale_to_0_1);
  with `where`, as those pixels give them. NumPy or JAX arrays alike."""
  shifted = images - images.min(axis=(-3, -2), keepdims=True,
                                **_over_pixels(where, initial=np.inf))
  return shifted / shifted.max(axis=(-3, -2), keepdims=True,
                               **_over_pixels(where, initial=-np.inf)).clip(min=1e-8)


def normalized(images: Any, normalize: str | CTStatistics, inside: Any = None) -> Any:
  """Images scaled to [0, 1] as a run with data.normalize=`normalize` gives them to its
  network: as they are ('unit'), `zscore`d or `minmax`ed; with a run's CTStatistics (its
  'ct', `recorded_normalization`), `ct_normalized`.

  `inside` (NumPy, (.., H, W)): the pixels that count, the others 0 after it, as nnU-Net pads
  its normalised image where a training example's rotation or scaling brought in corners."""
  if isinstance(normalize, CTStatistics):
    out = ct_normalized(images, normalize)
  else:
    where = None if inside is None else inside[..., None]
    out = {'zscore': zscore, 'minmax': minmax}.get(normalize, lambda x, where: x)(images, where)
  return out if inside is None else np.where(inside[..., None], out, np.float32(0))


def height_width(size: int | Sequence[int]) -> tuple[int, int]:
  """A size as (height, width): an int is a square's side; a pair is (height, width)."""
  if isinstance(size, int | np.integer):
    return int(size), int(size)
  height, width = size
  return int(height), int(width)


def training_size(config: Mapping[str, Any]) -> int | list[int]:
  """A run config's image size, as recorded with its checkpoints and reported: image_size (a
  square's side), or image_shape's [height, width] when set."""
  shape = config.get('image_shape') or ()
  return [int(v) for v in shape] if shape else int(config['image_size'])


def palette_colour(palette: Sequence[int], index: int) -> list[int]:
  """A palette's [R, G, B] for `index` (a palette may stop before 256 entries: the rest are
  black)."""
  entry = list(palette[3 * index:3 * index + 3])
  return entry + [0] * (3 - len(entry))


def mask_value_text(value: int | Sequence[int], palette: Sequence[int] = ()) -> str:
  """A training mask value for people: a gray value (255), a colour (#ff0000), or a palette
  index with the colour the palette draws it in (1 (#800000))."""
  if not isinstance(value, int | np.integer):
    return '#' + ''.join(f'{int(c):02x}' for c in value)
  value = int(value)
  if palette:
    return f'{value} ({mask_value_text(palette_colour(palette, value))})'
  return str(value)


def mask_colours(classes: int, mask_values: list, palette: Sequence[int] = (),
                 ) -> np.ndarray | None:
  """(classes, 3) colours the training masks draw each class in (an RGB mask's colour, a palette
  mask's palette entry), or None where they have none (gray values)."""
  if not mask_values or len(mask_values) < classes:
    return None
  if palette:
    return np.asarray([palette_colour(palette, v) for v in mask_values[:classes]], np.float32)
  if isinstance(mask_values[0], list):
    return np.asarray(mask_values[:classes], np.float32)
  return None


def parse_size(text: str) -> int | tuple[int, int]:
  """A command line's size: 'S' (a square's side) or 'HxW' (height x width, as size_text)."""
  import argparse
  try:
    parts = [int(v) for v in text.lower().split('x')]
  except ValueError:
    parts = []
  if len(parts) not in (1, 2) or min(parts) < 0:
    raise argparse.ArgumentTypeError(f'{text!r}: give a size S or HEIGHTxWIDTH, e.g. 64 or '
                                     '320x480')
  return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def size_text(size: int | Sequence[int]) -> str:
  """'64x64', or '48x96' for height 48 and width 96 (height first, as the shapes are)."""
  height, width = height_width(size)
  return f'{height}x{width}'


def resample_filter(name: str) -> int:
  """PIL's filter for a RESAMPLE_FILTERS name."""
  from PIL import Image
  return {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}[name]


def resize(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
  """H x W (x C) -> height x width with PIL's `resample` filter, as training resizes.

  uint8 gray or RGB arrays are resized as PIL images of that kind (training's images and masks),
  uint8 of other channel counts channel by channel as gray ones (PIL's 2- and 4-channel modes
  would weigh the others by the last, as by alpha); others (16-bit images, float images,
  logits) channel by channel as 32-bit float images, 16-bit ones rounded back to uint16 (and
  clipped to 0..65535, as an 8-bit image's filter clips at 0 and 255)."""
  from PIL import Image
  if array.shape[:2] == (height, width):
    return array
  if array.ndim == 3 and (array.shape[-1] != 3 or array.dtype != np.uint8):
    return np.stack([resize(array[..., c], height, width, resample)
                     for c in range(array.shape[-1])], axis=-1)
  if array.dtype == np.uint16:
    return sixteen_bit_plane(resize(array.astype(np.float32), height, width, resample))
  if array.dtype != np.uint8:
    array = array.astype(np.float32)
  return np.asarray(Image.fromarray(array).resize((width, height), resample))


def sixteen_bit_plane(values: np.ndarray) -> np.ndarray:
  """Float pixel values (a 16-bit image's, resampled) rounded and clipped back to uint16."""
  return np.clip(np.rint(values), 0, 65535).astype(np.uint16)

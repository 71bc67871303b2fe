"""Your own data: an `images/` folder and a `masks/` folder, paired by file name.

    ROOT/images/cat_001.jpg   ROOT/masks/cat_001.png
    ROOT/images/cat_002.png   ROOT/masks/cat_002.png

Images: PNG, JPEG, TIFF, BMP or GIF, grayscale or RGB. Masks: one value (gray), palette index
(palette images, as PASCAL VOC's) or colour (RGB) per class; the sorted distinct values become
class ids 0..K-1, and that mapping (`mask_values`) is stored with the dataset and the checkpoint
so predictions can be written back in the same values. If ROOT has `train/` and `test/`
subfolders, each holding `images/` and `masks/`, they are the splits; otherwise 10% of the pairs
(`holdout_percent`; every tenth, sorted by name) are held out for evaluation, or one of
`num_folds` contiguous blocks of them (k-fold cross-validation). Such a folder is prepared once,
as one split `pairs` in name order, and the held-out pairs are picked from it when it is read, so
every fold and share uses the same prepared copy. The folder names and name suffixes can be
set (`FolderLayout`), so milesial/Pytorch-UNet's `data/imgs/NAME.jpg` with
`data/masks/NAME_mask.gif`, and nnU-Net's `imagesTr/NAME_0000.png` with `labelsTr/NAME.png`,
are read as they lie.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import hashlib
import io
import json
import math
import os
import sys
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from unet_jax.datasets.local_info import LocalDatasetInfo
from unet_jax.errors import UserError
from unet_jax.image_io import (
  cases_by_name,
  files_by_name,
  first_file,
  image_suffixes,
  mask_levels,
  sixteen_bit,
  stacked_channels,
  suffix_pattern,
)

# JPEG's compression blends a mask's labels at its edges into new values, each of which would
# be a class: named when a dataset's masks hold more values than the model has classes.
LOSSY_SUFFIXES = ('.jpg', '.jpeg')
# A pair's image: its file, or with several image suffixes its channels' files (FolderLayout).
ImagePaths = str | tuple[str, ...]
UNSPLIT = 'pairs'  # the one prepared split of a folder without train/ and test/ ('all' is tfds's)


@dataclasses.dataclass(frozen=True)
class FolderScan:
  splits: dict[str, list[tuple[ImagePaths, str]]]  # as prepared (unsplit_pairs)
  mask_values: list  # sorted: gray values or palette indices, or [R, G, B] colours
  channels: int  # 1 if every image is gray, else 3; the files per case for one per channel
  palette: list  # every mask a palette image: the first one's palette (R G B per index); else []
  lossy_mask: str  # the first JPEG mask, '' if none


@dataclasses.dataclass(frozen=True)
class FolderLayout:
  """Where a root's files lie, `images/NAME{image_suffix}.EXT` with
  `masks/NAME{mask_suffix}.EXT`, and, for a root without train/ and test/, the pairs held out
  for evaluation: `holdout_percent` of them, or with `num_folds` > 0 the `fold`-th of that many
  blocks, cut from the pairs in name order or, with a `fold_seed` (-1: none), shuffled with it
  first (scikit-learn's KFold(shuffle=True, random_state=fold_seed), as nnU-Net cuts its folds
  with 12345). Several image suffixes, comma-separated, name one gray file per channel
  (`images/NAME_0000.png`, `images/NAME_0001.png` for '_0000,_0001', as nnU-Net names them)."""
  images_dir: str = 'images'
  masks_dir: str = 'masks'
  mask_suffix: str = ''
  image_suffix: str = ''
  holdout_percent: float = 10.0
  num_folds: int = 0
  fold: int = 0
  fold_seed: int = -1

  @property
  def one_folder(self) -> bool:
    """Whether images and masks lie in one folder (told apart by their suffixes)."""
    return os.path.normpath(self.images_dir) == os.path.normpath(self.masks_dir)

  def is_mask(self, stem: str) -> bool:
    """Of a file in the one folder of images and masks: whether it is a mask, by its name."""
    if self.mask_suffix:
      return stem.endswith(self.mask_suffix)
    return not stem.endswith(self.image_suffixes)

  @property
  def image_suffixes(self) -> tuple[str, ...]:
    """image_suffix's suffixes: several (comma-separated) name one gray file per channel."""
    return image_suffixes(self.image_suffix, 'data.image_suffix')


def _list(folder: str, layout: FolderLayout, masks: bool) -> dict[str, ImagePaths]:
  """NAME -> path of the folder's images (with several image suffixes, the tuple of a case's
  channel files: image_io.cases_by_name), or with `masks` of its masks. NAME is the file name
  without its extension and without layout.image_suffix (layout.mask_suffix for a mask), which
  every image (mask) must have; where images and masks share a folder, a suffix tells them
  apart."""
  if not os.path.isdir(folder):
    raise UserError(f'{folder}: no such folder (expected {layout.images_dir}/ and '
                    f'{layout.masks_dir}/ side by side)')
  # (where images and masks share a folder, the other kind's files are skipped)
  keep = (lambda stem: layout.is_mask(stem) == masks) if layout.one_folder else None
  field, kind = ('mask_suffix', 'a mask') if masks else ('image_suffix', 'an image')
  suffix = layout.mask_suffix if masks else layout.image_suffix

  def misnamed(path: str) -> str:
    return (f'{path}: {kind} not named NAME{suffix_pattern(suffix)}.EXT (data.{field}='
            f'{suffix!r}); rename it, or set --config.data.{field}')

  if masks:
    return files_by_name(folder, suffix, misnamed, keep)
  return cases_by_name(folder, layout.image_suffixes, misnamed, '--config.data.image_suffix', keep)


def find_pairs(root: str, layout: FolderLayout = FolderLayout(),
               ) -> dict[str, list[tuple[ImagePaths, str]]]:
  """split ('train', 'test') -> [(image path or paths, mask path)], checking that every image
  has a mask and vice versa: the folder's own train/ and test/, or the layout's split of its
  pairs."""
  pairs = unsplit_pairs(root, layout)
  if UNSPLIT not in pairs:
    return pairs
  return {split: [pairs[UNSPLIT][i] for i in indices]
          for split, indices in split_indices(len(pairs[UNSPLIT]), layout, root).items()}


def unsplit_pairs(root: str, layout: FolderLayout = FolderLayout(),
                  ) -> dict[str, list[tuple[ImagePaths, str]]]:
  """What is prepared: {'train': ..., 'test': ...} for a folder with train/ and test/, else
  {'pairs': every pair}, sorted by name (split_indices picks the held-out ones)."""
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise UserError(f'{root}: dataset folder not found; set --config.data.root to a folder with '
                    f'{layout.images_dir}/ and {layout.masks_dir}/')
  has_splits = os.path.isdir(os.path.join(root, 'train')) and os.path.isdir(
      os.path.join(root, 'test'))
  if layout.one_folder and not (layout.mask_suffix or layout.image_suffix):
    raise UserError(f'data.images_dir and data.masks_dir are one folder ({layout.images_dir!r}):'
                    ' set --config.data.mask_suffix (e.g. _mask) to tell masks from images')
  splits = {}
  for split, sub in ((('train', 'train'), ('test', 'test')) if has_splits else ((UNSPLIT, ''),)):
    images = _list(os.path.join(root, sub, layout.images_dir), layout, masks=False)
    masks = _list(os.path.join(root, sub, layout.masks_dir), layout, masks=True)
    for stem in images:
      if stem not in masks:
        raise UserError(f'{first_file(images[stem])}: has no mask (expected '
                        f'{layout.masks_dir}/{stem}{layout.mask_suffix}.png or similar)')
    for stem in masks:
      if stem not in images:
        raise UserError(f'{masks[stem]}: has no image (expected {layout.images_dir}/{stem}'
                        f'{layout.image_suffixes[0]}.png or similar)')
    if not images:
      raise UserError(f'{os.path.join(root, sub, layout.images_dir)}: no PNG/JPEG/TIFF/BMP/GIF '
                      'images found')
    splits[split] = [(images[s], masks[s]) for s in sorted(images)]
  if has_splits:
    check_own_splits(root, layout)
  else:
    split_indices(len(splits[UNSPLIT]), layout, root)  # (refuses more folds than pairs, up front)
  return splits


def check_own_splits(root: str, layout: FolderLayout) -> None:
  """Refuses a held-out share or folds for a folder whose train/ and test/ are its splits:
  they would be silently unused."""
  if layout.holdout_percent != FolderLayout.holdout_percent:
    raise UserError(f'data.holdout_percent={layout.holdout_percent:g} is for a folder without '
                    f'train/ and test/, but {root} has them (they are the splits); leave it at '
                    f'{FolderLayout.holdout_percent:g}, or put the pairs in one folder')
  if layout.num_folds:
    raise UserError(f'data.num_folds={layout.num_folds} is for a folder without train/ and '
                    f'test/, but {root} has them (they are the splits); leave it at 0, or put '
                    'the pairs in one folder')


def split_indices(n: int, layout: FolderLayout, root: str) -> dict[str, list[int]]:
  """'test' and 'train' -> positions among a folder's n pairs sorted by name: `num_folds`'
  `fold`-th block held out, else `holdout_percent` of them. A single pair is both."""
  if layout.num_folds > n:
    raise UserError(f'data.num_folds={layout.num_folds} is more than the {n} pairs in {root}; '
                    f'use at most {n} folds')
  held_out = (_in_fold(n, layout.num_folds, layout.fold, layout.fold_seed) if layout.num_folds
              else _held_out(n, layout.holdout_percent))
  test = [i for i in range(n) if held_out[i]]
  train = [i for i in range(n) if not held_out[i]]
  return {'test': test, 'train': train or test}


def _held_out(n: int, percent: float) -> list[bool]:
  """Which of n pairs (sorted by name) are held out: spread evenly, the first of them pair 0, so
  that 10% is every tenth (0, 10, 20, ...) and 25% every fourth; about percent/100 of n, at
  least one."""
  share = fractions.Fraction(percent).limit_denominator(10**6) / 100  # (exact: 29% is 29/100)
  return [i == 0 or math.floor(i * share) != math.floor((i - 1) * share) for i in range(n)]


def _in_fold(n: int, num_folds: int, fold: int, seed: int = -1) -> list[bool]:
  """Which of n pairs (sorted by name) make up fold `fold` of `num_folds`: blocks, the first
  n % num_folds of them one pair longer, as scikit-learn's KFold(num_folds) cuts them; every
  pair is in exactly one fold's held-out block. Without a seed (-1) the blocks are contiguous,
  so that pairs whose names run together (slices of one scan, frames of one video, tiles of one
  slide) fall on one side of the split, but at a block's edge; with one, they are cut from the
  pairs shuffled as KFold(shuffle=True, random_state=seed) shuffles them (numpy's
  RandomState(seed).shuffle), which with seed 12345 gives nnU-Net's folds of the same names."""
  sizes = [n // num_folds + (k < n % num_folds) for k in range(num_folds)]
  start = sum(sizes[:fold])
  order = np.arange(n)
  if seed >= 0:
    np.random.RandomState(seed).shuffle(order)
  held_out = set(order[start:start + sizes[fold]].tolist())
  return [i in held_out for i in range(n)]


_EXIF_ORIENTATION = 0x0112  # the tag a camera sets for a photo stored on its side or flipped
_QUARTER_TURNS = (5, 6, 7, 8)  # its values whose upright view swaps width and height


def _read(path: str, mask: bool = False, palettes: list | None = None,
          data: bytes | None = None, orientations: list | None = None) -> np.ndarray:
  """An image as 8-bit gray or RGB, or 16-bit gray (uint16, `sixteen_bit`: kept at 16 bits); a mask
  keeps its values, which must fit 8 bits, and a palette mask its indices (as torchvision's
  VOCSegmentation and milesial's loader read them: the palette is only how they are drawn; appended
  to `palettes`). `data`: the file's bytes, read instead of `path` (named in errors). The pixels as
  stored, whatever the file's EXIF orientation (as PIL, torchvision's `read_image` and milesial's
  loader read them), which is appended to `orientations` (1: none or upright)."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path if data is None else io.BytesIO(data)) as im:
      if orientations is not None:
        orientations.append(int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1))
      if mask and im.mode == 'P':
        if palettes is not None:
          palettes.append(im.getpalette())
        return np.asarray(im)
      if mask:
        im = mask_levels(im, path)
      elif (deep := sixteen_bit(im, path)) is not None:
        return deep
      if im.mode == 'LA' and not mask:  # (gray, its alpha dropped, as predict reads it)
        im = im.convert('L')
      elif im.mode in ('RGBA', 'P', 'CMYK', 'LA', 'YCbCr'):  # (an LA mask: as it always was)
        im = im.convert('RGB')
      elif im.mode not in ('L', 'RGB'):
        im = im.convert('L') if im.mode.startswith(('I', 'F', '1')) else im.convert('RGB')
      return np.asarray(im)
  except (UnidentifiedImageError, OSError) as e:
    raise UserError(f'{path}: cannot read it as an image ({e})') from None


def _dataset_json(root: str, field: str) -> Any:
  """A field of nnU-Net's ROOT/dataset.json; None where it or the file is missing or
  unreadable (what it says only labels and advises)."""
  try:
    with open(os.path.join(root, 'dataset.json'), encoding='utf-8') as f:
      return json.load(f).get(field)
  except (OSError, ValueError, AttributeError):
    return None


def dataset_json_class_names(root: str, mask_values: list) -> tuple[str, ...]:
  """The classes' names from nnU-Net's ROOT/dataset.json (`"labels": {"background": 0, "liver":
  1, ...}`), in the order of `mask_values`; () where it is missing or unreadable or leaves a
  class unnamed (a region, a list of labels, names none): the names only label reports."""
  labels = _dataset_json(root, 'labels')
  if not isinstance(labels, dict):
    return ()
  by_value = {v: str(k) for k, v in labels.items() if isinstance(v, int)
              and not isinstance(v, bool) and k != 'ignore'}
  names = tuple(by_value.get(v) for v in mask_values if isinstance(v, int))
  return names if len(names) == len(mask_values) and all(names) else ()


# nnU-Net's normalisation of a channel by its dataset.json name (casefolded; any other name:
# zscore), as this project's data.normalize where it has one.
_NNUNET_NORMALIZATIONS = {'rgb_to_0_1': 'unit', 'zscore': 'zscore', 'rescale_to_0_1': 'minmax',
                          'ct': 'ct', 'nonorm': None}


def dataset_json_normalization_warning(root: str, normalize: str) -> str:
  """Where nnU-Net's ROOT/dataset.json names channels that nnU-Net would normalise otherwise
  than `normalize` (data.normalize) does: a warning line saying how; else ''."""
  names = _dataset_json(root, 'channel_names')
  if not isinstance(names, dict) or not names:
    return ''
  names = [str(names[k]) for k in sorted(names, key=str)]
  wanted = [_NNUNET_NORMALIZATIONS.get(n.casefold(), 'zscore') for n in names]
  if all(w == normalize for w in wanted):
    return ''
  listed = ', '.join(names)
  if None in wanted or len(set(wanted)) > 1:
    how = ('normalises those channels in ways this project does not (only all channels scaled '
           'to [0, 1], rgb_to_0_1, all stretched to [0, 1], rescale_to_0_1, all by CT '
           'statistics, CT, or all z-scored, zscore or any other name)')
  else:
    how = (f"normalises them as this project's data.normalize='{wanted[0]}' does; set "
           f'--config.data.normalize={wanted[0]} to match it')
  return (f'warning: {os.path.join(root, "dataset.json")} names the channels {listed}, which '
          f"nnU-Net {how}; this run has data.normalize='{normalize}'")


def mask_value_key(value: int | list[int]) -> int:
  """A saved mask value's integer key: the gray value, or 0xRRGGBB for an [R, G, B] one."""
  return ((value[0] << 16) | (value[1] << 8) | value[2]) if isinstance(value, list) else value


def key_mask_value(key: int, rgb: bool) -> int | list[int]:
  """The inverse of `mask_value_key`: an integer key as the value saved for it, [R, G, B] for
  colour masks' 0xRRGGBB."""
  return [(key >> 16) & 255, (key >> 8) & 255, key & 255] if rgb else key


class MaskKeys(NamedTuple):
  keys: np.ndarray  # per pixel: the gray value or palette index, or 0xRRGGBB (_mask_keys)
  rgb: bool         # the file is a colour mask: its keys are colours


def read_mask_keys(path: str) -> MaskKeys:
  """A mask file's per-pixel integer keys, read as training reads masks."""
  mask = _read(path, mask=True)
  return MaskKeys(_mask_keys(mask), mask.ndim == 3)


def _mask_keys(mask: np.ndarray) -> np.ndarray:
  """Per-pixel integer key: the gray value, or 0xRRGGBB for colour masks."""
  if mask.ndim == 2:
    return mask.astype(np.int64)
  m = mask.astype(np.int64)
  return (m[..., 0] << 16) | (m[..., 1] << 8) | m[..., 2]


def scan(root: str, layout: FolderLayout = FolderLayout()) -> FolderScan:
  """Reads every pair once: checks them, and collects what the dataset's metadata records (the
  palette: `predict` draws its masks with it, as the training masks were drawn)."""
  splits = unsplit_pairs(root, layout)
  values: set = set()
  channels = 1
  rgb_masks = False
  palettes: list = []
  lossy = ''  # the first JPEG mask
  turned: list[str] = []  # images with an EXIF orientation, read as stored
  for pairs in splits.values():
    for image_paths, mask_path in pairs:
      orientation: list[int] = []
      image_path = first_file(image_paths)
      image = _read_case(image_paths, orientations=orientation)
      mask = _read(mask_path, mask=True, palettes=palettes)
      if image.shape[:2] != mask.shape[:2]:
        raise UserError(f'{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is '
                        f'{image.shape[1]}x{image.shape[0]}'
                        f'{_turned_hint(orientation[0], image, mask)}')
      if orientation[0] != 1:
        turned.append(f'{image_path} ({orientation[0]})')
      channels = (len(image_paths) if isinstance(image_paths, tuple)
                  else max(channels, 1 if image.ndim == 2 else 3))
      rgb_masks |= mask.ndim == 3
      values.update(np.unique(_mask_keys(mask)).tolist())
      if not lossy and mask_path.lower().endswith(LOSSY_SUFFIXES):
        lossy = mask_path
  if turned:  # (their masks fit the stored pixels; were they drawn on the turned view?)
    print(f'warning: {len(turned)} image(s) carry an EXIF orientation, e.g. {turned[0]}; '
          'training reads the pixels as stored, as their masks lie; if the masks were drawn '
          "on the images as a photo viewer turns them, save the images upright (PIL's "
          'ImageOps.exif_transpose) and prepare again', file=sys.stderr, flush=True)
  if len(values) > 255:
    raise UserError(f'{root}: masks hold {len(values)} distinct values; expected one per class')
  keys = sorted(values)
  mask_values = [key_mask_value(k, rgb_masks) for k in keys]
  every_mask_paletted = len(palettes) == sum(map(len, splits.values()))
  palette = list(palettes[0] or []) if every_mask_paletted else []
  return FolderScan(splits, mask_values, channels, palette, lossy)


def _read_case(paths: ImagePaths, orientations: list | None = None) -> np.ndarray:
  """A case's image (`_read`); for one file per channel (a tuple of paths) the (H, W, C) stack
  of its gray channel files, which must be one size (the first one's orientation appended)."""
  if isinstance(paths, str):
    return _read(paths, orientations=orientations)
  channels = []
  for path in paths:
    channel = _read(path, orientations=orientations if not channels else None)
    if channel.ndim != 2:
      raise UserError(f'{path}: a colour image, but data.image_suffix lists one file per channel '
                      '(each a gray image); save each channel as a gray image, or give one suffix')
    channels.append(channel)
  return stacked_channels(paths, channels)


def _stacked_bytes(stack: np.ndarray) -> bytes:
  """A case's channel stack as a prepared record holds it: zlib of its .npy (read back by
  `_unstacked`, without pickles)."""
  out = io.BytesIO()
  np.save(out, stack, allow_pickle=False)
  return zlib.compress(out.getvalue(), 1)


def _unstacked(data: bytes) -> np.ndarray:
  return np.load(io.BytesIO(zlib.decompress(data)), allow_pickle=False)


def _turned_hint(orientation: int, image: np.ndarray, mask: np.ndarray) -> str:
  """Why an image and its mask differ in size, where its EXIF orientation explains it: the
  mask was drawn on the image as a viewer turns it upright."""
  if orientation not in _QUARTER_TURNS or image.shape[:2] != mask.shape[1::-1]:
    return ''
  return (f'; its EXIF orientation ({orientation}) turns it to {image.shape[0]}x'
          f'{image.shape[1]}, as a photo viewer shows it and the mask was drawn, but training '
          "reads the pixels as stored: save the images upright (PIL's ImageOps.exif_transpose) "
          'and train again')


def fingerprint(root: str, layout: FolderLayout = FolderLayout()) -> str:
  """Changes when any file under ROOT is added, removed, resized or touched, or the layout's
  folders and suffixes (which pair them) change; not with the held-out share or fold, which
  are picked when the prepared pairs are read."""
  h = hashlib.sha1(os.path.abspath(root).encode())
  h.update(repr((layout.images_dir, layout.masks_dir, layout.mask_suffix,
                 layout.image_suffix)).encode())
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      st = os.stat(os.path.join(dirpath, f))
      h.update(f'{os.path.relpath(os.path.join(dirpath, f), root)}:{st.st_size}:'
               f'{st.st_mtime_ns}'.encode())
  return h.hexdigest()[:12]


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """Image + mask folders as a TFDS dataset; one builder config per folder content."""

  # A new version makes folders prepared by an older reader be prepared again.
  VERSION = tfds.core.Version('1.6.0')
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '1.1.0': '16-bit gray images scaled to 8 bits (1.0.0 clipped them at 255).',
                   '1.2.0': "Each example's image file name, as `file_name`.",
                   '1.3.0': 'Palette masks by their indices (1.2.0 took their colours).',
                   '1.4.0': 'Image files kept as they are (1.3.0: zlib of their pixels) and '
                            'masks as PNGs of class ids, decoded when read.',
                   '1.5.0': 'A folder without train/ and test/ as one split, pairs, in name '
                            'order; the held-out pairs picked when read (1.4.0: a copy per '
                            'fold or share, each split in tfds\'s shuffled order).',
                   '1.6.0': 'Stacks of channel files (data.image_suffix) with a 16-bit one kept '
                            'at 16 bits (1.5.0 scaled it to 8).'}

  def __init__(self, *, root: str, layout: FolderLayout = FolderLayout(), **kwargs):
    self._root = os.path.abspath(root)
    self._layout = layout
    config = tfds.core.BuilderConfig(name=f'f{fingerprint(self._root, layout)}',
                                     description=f'images and masks from {self._root}')
    super().__init__(config=config, **kwargs)
    # What pickling keeps (tfds rebuilds a builder from it; grain's worker processes unpickle the
    # data sources, which hold their builder): this __init__'s arguments, not tfds's own.
    self._original_state = {k: v for k, v in self._original_state.items() if k != 'config'} | {
        'root': self._root, 'layout': layout}

  @functools.cached_property
  def _scan(self) -> FolderScan:
    return scan(self._root, self._layout)

  def _info(self) -> tfds.core.DatasetInfo:
    if self.is_prepared():
      # As prepared: its files are those the fingerprint names, so reading them all again
      # (minutes for thousands of photos, at every start) would find what preparing found.
      return LocalDatasetInfo(
          builder=self,
          features=tfds.features.FeatureConnector.from_config(os.fspath(self.data_path)),
          metadata=tfds.core.MetadataDict())  # (tfds fills it from the prepared folder)
    # Encoded bytes, decoded when read (DecodedFolderSource): a photo's own JPEG is a tenth to a
    # twentieth of its pixels under zlib, and decodes faster.
    return LocalDatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),  # the file's bytes
            'mask': tfds.features.Tensor(shape=(), dtype=np.object_),  # a PNG of class ids
            'file_name': tfds.features.Text(),  # (as oxford_iiit_pet's: per-image reports)
        }),
        metadata=tfds.core.MetadataDict(
            mask_values=self._scan.mask_values, root=self._root,
            mask_palette=self._scan.palette, lossy_mask=self._scan.lossy_mask,
            channels=self._scan.channels, channel_files=self._channel_files),
        disable_shuffling=True,  # (records in the order generated: pairs sorted by name)
    )

  def decoded_sources(self) -> dict[str, DecodedFolderSource]:
    """'train' and 'test' -> their records with images and masks decoded: the prepared splits,
    or the layout's split of the prepared `pairs`."""
    channels = self.info.metadata['channels']
    stacked = self.info.metadata.get('channel_files', 1) > 1
    prepared = self.as_data_source()
    if UNSPLIT not in prepared:
      check_own_splits(self._root, self._layout)
      return {split: DecodedFolderSource(source, channels, stacked=stacked)
              for split, source in prepared.items()}
    every = prepared[UNSPLIT]
    return {split: DecodedFolderSource(every, channels, indices, stacked)
            for split, indices in split_indices(len(every), self._layout, self._root).items()}

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(pairs) for split, pairs in self._scan.splits.items()}

  def _generate_examples(self, pairs) -> Iterator[tuple[str, dict[str, Any]]]:
    from PIL import Image
    sorted_keys = np.asarray(self._sorted_keys(), np.int64)
    for key, (image_path, mask_path) in enumerate(pairs):  # (the key orders the records)
      if isinstance(image_path, tuple):  # (one file per channel: their stack)
        image = _stacked_bytes(_read_case(image_path))
      else:
        with open(image_path, 'rb') as f:  # (kept as it is: scan has decoded it once)
          image = f.read()
      mask_keys = _mask_keys(_read(mask_path, mask=True))
      ids = np.searchsorted(sorted_keys, mask_keys).astype(np.uint8)  # all keys are known
      mask = io.BytesIO()
      Image.fromarray(ids, 'L').save(mask, format='PNG', compress_level=1)
      name = os.path.basename(first_file(image_path))
      yield key, {'image': image, 'mask': mask.getvalue(), 'file_name': name}

  @property
  def _channel_files(self) -> int:
    """Files per case: 1, or one per channel for several image suffixes."""
    return len(self._layout.image_suffixes)

  def _sorted_keys(self) -> list[int]:
    return [mask_value_key(v) for v in self._scan.mask_values]


class DecodedFolderSource:
  """A prepared split of an image folder (or, with `indices`, those records of it), each record
  decoded as the folder's files read: `image` (H, W, C) uint8, or uint16 for 16-bit gray (gray
  repeated to RGB where the folder has colour images; with `stacked`, the stack of a case's channel
  files), `mask` (H, W, 1) class ids, `file_name` (of a stack, its first channel's). Random access,
  as grain reads a data source."""

  def __init__(self, source: Any, channels: int, indices: list[int] | None = None,
               stacked: bool = False):
    self._source, self._channels, self._stacked = source, channels, stacked
    self._indices = None if indices is None else tuple(indices)

  def __len__(self) -> int:
    return len(self._source) if self._indices is None else len(self._indices)

  def all_pairs(self) -> DecodedFolderSource:
    """The prepared split these records are taken from, all of it (a folder's pairs, of which
    the held-out share or fold and the rest are each some)."""
    return DecodedFolderSource(self._source, self._channels, None, self._stacked)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return (self[i] for i in range(len(self)))

  def __getitem__(self, index: int) -> dict[str, Any]:
    from PIL import Image
    record = self._source[index if self._indices is None else self._indices[index]]
    name = record['file_name']
    if self._stacked:
      image = _unstacked(record['image'])
    else:
      image = _read(name.decode() if isinstance(name, bytes) else str(name), data=record['image'])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] != self._channels:
      image = np.repeat(image, self._channels, axis=-1)
    with Image.open(io.BytesIO(record['mask'])) as mask:
      ids = np.asarray(mask)
    return {'image': image, 'mask': ids[..., None], 'file_name': name}

"""Your own data: an `images/` folder and a `masks/` folder, paired by file name.

    ROOT/images/cat_001.jpg   ROOT/masks/cat_001.png
    ROOT/images/cat_002.png   ROOT/masks/cat_002.png

Images: PNG, JPEG or TIFF, grayscale or RGB. Masks: one value (gray) or colour (RGB) per class;
the sorted distinct values become class ids 0..K-1, and that mapping (`mask_values`) is stored
with the dataset and the checkpoint so predictions can be written back in the same values. If
ROOT has `train/` and `test/` subfolders, each holding `images/` and `masks/`, they are the splits;
otherwise every tenth pair (sorted by name) is held out for evaluation.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from unet_jax.datasets.local_info import LocalDatasetInfo
from unet_jax.errors import UserError
from unet_jax.image_io import eight_bit

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
HOLDOUT_EVERY = 10


def _list(folder: str) -> dict[str, str]:
  if not os.path.isdir(folder):
    raise UserError(f'{folder}: no such folder (expected images/ and masks/ side by side)')
  return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
          if f.lower().endswith(IMAGE_SUFFIXES)}


def find_pairs(root: str) -> dict[str, list[tuple[str, str]]]:
  """split -> [(image path, mask path)], checking that every image has a mask and vice versa."""
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise UserError(f'{root}: dataset folder not found; set --config.data.root to a folder with '
                    'images/ and masks/')
  has_splits = os.path.isdir(os.path.join(root, 'train')) and os.path.isdir(
      os.path.join(root, 'test'))
  splits = {}
  for split, sub in ((('train', 'train'), ('test', 'test')) if has_splits else (('all', ''),)):
    images = _list(os.path.join(root, sub, 'images'))
    masks = _list(os.path.join(root, sub, 'masks'))
    for stem in images:
      if stem not in masks:
        raise UserError(f'{images[stem]}: has no mask (expected masks/{stem}.png or similar)')
    for stem in masks:
      if stem not in images:
        raise UserError(f'{masks[stem]}: has no image (expected images/{stem}.png or similar)')
    if not images:
      raise UserError(f'{os.path.join(root, sub, "images")}: no PNG/JPEG/TIFF images found')
    splits[split] = [(images[s], masks[s]) for s in sorted(images)]
  if not has_splits:
    pairs = splits.pop('all')
    splits['test'] = pairs[::HOLDOUT_EVERY]
    splits['train'] = [p for i, p in enumerate(pairs) if i % HOLDOUT_EVERY]
    if not splits['train']:
      splits['train'] = splits['test']
  return splits


def _read(path: str, mask: bool = False) -> np.ndarray:
  """An image as 8-bit gray or RGB (16-bit gray scaled to 8); a mask keeps its values, which
  must fit 8 bits."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      im = eight_bit(im, path, mask=mask)
      if im.mode in ('RGBA', 'P', 'CMYK', 'LA', 'YCbCr'):
        im = im.convert('RGB')
      elif im.mode not in ('L', 'RGB'):
        im = im.convert('L') if im.mode.startswith(('I', 'F', '1')) else im.convert('RGB')
      return np.asarray(im)
  except (UnidentifiedImageError, OSError) as e:
    raise UserError(f'{path}: cannot read it as an image ({e})') from None


def mask_value_key(value: int | list[int]) -> int:
  """A saved mask value's integer key: the gray value, or 0xRRGGBB for an [R, G, B] one."""
  return ((value[0] << 16) | (value[1] << 8) | value[2]) if isinstance(value, list) else value


def _mask_keys(mask: np.ndarray) -> np.ndarray:
  """Per-pixel integer key: the gray value, or 0xRRGGBB for colour masks."""
  if mask.ndim == 2:
    return mask.astype(np.int64)
  m = mask.astype(np.int64)
  return (m[..., 0] << 16) | (m[..., 1] << 8) | m[..., 2]


def scan(root: str) -> tuple[dict[str, list[tuple[str, str]]], list, int]:
  """Pairs, the sorted mask values, and the channel count (1 if every image is gray, else 3)."""
  splits = find_pairs(root)
  values: set = set()
  channels = 1
  rgb_masks = False
  for pairs in splits.values():
    for image_path, mask_path in pairs:
      image, mask = _read(image_path), _read(mask_path, mask=True)
      if image.shape[:2] != mask.shape[:2]:
        raise UserError(f'{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is '
                        f'{image.shape[1]}x{image.shape[0]}')
      channels = max(channels, 1 if image.ndim == 2 else 3)
      rgb_masks |= mask.ndim == 3
      values.update(np.unique(_mask_keys(mask)).tolist())
  if len(values) > 255:
    raise UserError(f'{root}: masks hold {len(values)} distinct values; expected one per class')
  keys = sorted(values)
  mask_values = ([[(k >> 16) & 255, (k >> 8) & 255, k & 255] for k in keys] if rgb_masks
                 else keys)
  return splits, mask_values, channels


def fingerprint(root: str) -> str:
  """Changes when any file under ROOT is added, removed, resized or touched."""
  h = hashlib.sha1(os.path.abspath(root).encode())
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      st = os.stat(os.path.join(dirpath, f))
      h.update(f'{os.path.relpath(os.path.join(dirpath, f), root)}:{st.st_size}:'
               f'{st.st_mtime_ns}'.encode())
  return h.hexdigest()[:12]


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """Image + mask folders as a TFDS dataset; one builder config per folder content."""

  # A new version makes folders prepared by an older reader be prepared again.
  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '1.1.0': '16-bit gray images scaled to 8 bits (1.0.0 clipped them at 255).',
                   '1.2.0': "Each example's image file name, as `file_name`."}

  def __init__(self, *, root: str, **kwargs):
    self._root = os.path.abspath(root)
    self._splits, self._mask_values, self._channels = scan(self._root)
    config = tfds.core.BuilderConfig(name=f'f{fingerprint(self._root)}',
                                     description=f'images and masks from {self._root}')
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return LocalDatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(None, None, self._channels), dtype=np.uint8,
                                          encoding='zlib'),
            'mask': tfds.features.Tensor(shape=(None, None, 1), dtype=np.uint8, encoding='zlib'),
            'file_name': tfds.features.Text(),  # (as oxford_iiit_pet's: per-image reports)
        }),
        metadata=tfds.core.MetadataDict(mask_values=self._mask_values, root=self._root),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(pairs) for split, pairs in self._splits.items()}

  def _generate_examples(self, pairs) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    sorted_keys = np.asarray(self._sorted_keys(), np.int64)
    for image_path, mask_path in pairs:
      image = _read(image_path)
      if image.ndim == 2:
        image = image[..., None]
      if image.shape[-1] != self._channels:
        image = np.repeat(image, 3, axis=-1)
      mask_keys = _mask_keys(_read(mask_path, mask=True))
      ids = np.searchsorted(sorted_keys, mask_keys).astype(np.uint8)  # all keys are known
      name = os.path.basename(image_path)
      yield name, {'image': image, 'mask': ids[..., None], 'file_name': name}

  def _sorted_keys(self) -> list[int]:
    return [mask_value_key(v) for v in self._mask_values]

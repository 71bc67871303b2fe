"""Synthetic shapes: grayscale images of ellipses, rectangles and triangles with binary masks.

Generated locally and deterministically (no download), so training runs offline anywhere. Each
example's content depends only on (split, index): preparing twice gives identical files.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from unet_jax.datasets.local_info import LocalDatasetInfo

_SPLITS = {'train': (0, 1.0), 'test': (1, 0.1)}  # split -> (seed, size relative to train)
_SIZES = {64: 2048, 128: 1024, 480: 200}           # image side -> number of training examples


class SyntheticShapesConfig(tfds.core.BuilderConfig):
  def __init__(self, *, size: int, num_train: int, **kwargs):
    super().__init__(name=f'{size}px', description=f'{size}x{size} grayscale, binary masks',
                     **kwargs)
    self.size = size
    self.num_train = num_train


def draw_example(size: int, seed: tuple[int, ...]) -> dict[str, np.ndarray]:
  """One image (uint8, HxWx1) and its mask (uint8 0/1, HxWx1) from a seed."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  # A smooth, random background gradient plus noise: intensity alone cannot separate classes.
  g = rng.uniform(-1, 1, 3)
  background = 0.35 + 0.15 * (g[0] * yy + g[1] * xx) + 0.05 * g[2]
  image = background.copy()
  mask = np.zeros((size, size), bool)
  for _ in range(rng.integers(1, 5)):
    kind = rng.integers(3)
    cy, cx = rng.uniform(0.15, 0.85, 2)
    r = rng.uniform(0.06, 0.22, 2)
    if kind == 0:                                     # ellipse
      shape = ((yy - cy) / r[0]) ** 2 + ((xx - cx) / r[1]) ** 2 <= 1
    elif kind == 1:                                   # rotated rectangle
      a = rng.uniform(0, np.pi)
      u = (yy - cy) * np.cos(a) + (xx - cx) * np.sin(a)
      v = -(yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)
      shape = (np.abs(u) <= r[0]) & (np.abs(v) <= r[1])
    else:                                             # triangle
      angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
      py, px = cy + r[0] * np.sin(angles), cx + r[0] * np.cos(angles)
      signs = []
      for i in range(3):
        j = (i + 1) % 3
        signs.append((px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i]) >= 0)
      shape = (signs[0] == signs[1]) & (signs[1] == signs[2])
    # Shapes are brighter than the background, with their own texture.
    level = rng.uniform(0.2, 0.45)
    image = np.where(shape, background + level + 0.05 * np.sin(40 * (xx + yy) * r[1]), image)
    mask |= shape
  image = image + rng.normal(0, 0.06, image.shape)
  image = np.clip(image * 255, 0, 255).astype(np.uint8)
  return {'image': image[..., None], 'mask': mask.astype(np.uint8)[..., None]}


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """Deterministic synthetic binary segmentation: `synthetic_shapes/64px` (and 128px, 480px)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [SyntheticShapesConfig(size=s, num_train=n) for s, n in _SIZES.items()]

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.size
    return LocalDatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
            'mask': tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
        }),
        supervised_keys=('image', 'mask'),
        metadata=tfds.core.MetadataDict(mask_values=[0, 1]),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(seed, max(1, int(rel * self.builder_config.num_train)))
            for split, (seed, rel) in _SPLITS.items()}

  def _generate_examples(self, split_seed: int, count: int):
    for i in range(count):
      yield i, draw_example(self.builder_config.size, (split_seed, i))

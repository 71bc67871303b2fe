"""nnU-Net v2's intensity augmentations, as its trainer sets up batchgeneratorsv2's transforms.

`augment.intensity_recipe='nnunet'` (configs/nnunet.py) runs these on each training example
(a float32 (H, W, C) image, scaled to [0, 1] and, with data.normalize='zscore' as nnU-Net,
normalised) in nnU-Net's order, each for its share of the examples (`augment.*_prob`,
nnU-Net's `apply_probability`):
- Gaussian noise: a deviation drawn from [0, `noise`] (nnU-Net's `noise_variance=(0, 0.1)`, which
  it uses as the deviation), one noise field added to every channel (`synchronize_channels`);
- multiplicative brightness: each channel times its own factor from [1 - b, 1 + b];
- contrast: each channel's distance from its mean times its own factor from [1 - c, 1 + c],
  then clipped to the channel's range before (`preserve_range`);
- gamma of the inverted image (`inverted_gamma_prob`), then gamma: each channel mapped to
  [0, 1] over its range, raised to its own gamma from `gamma`, mapped back, and its mean and
  standard deviation restored (`retain_stats`).
Every factor and gamma is drawn as nnU-Net's `BGContrast` draws them: half the time below 1,
half above, so (0.7, 1.5) darkens as often as it brightens.
Left out: its Gaussian blur and low-resolution simulation.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from unet_jax.input_pipeline import applies

_EPS = np.float32(1e-7)  # batchgeneratorsv2's clamp on a range or deviation


def bg_contrast(rng: np.random.Generator, low: float, high: float) -> float:
  """batchgeneratorsv2's `BGContrast` draw: with probability 1/2 (when low < 1) from [low, 1),
  else from [max(low, 1), high). The coin is drawn first, whatever `low`."""
  if rng.random() < 0.5 and low < 1:
    return float(rng.uniform(low, 1))
  return float(rng.uniform(max(low, 1), high))


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  """One (H, W) field of N(0, sigma) added to every channel."""
  field = rng.normal(0.0, sigma, image.shape[:2]).astype(np.float32)
  return image + field[..., None]


def brightness(image: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """Each channel times its factor (not clipped)."""
  return image * np.asarray(factors, np.float32)


def contrast(image: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """Each channel's distance from its mean times its factor, clipped to its range before."""
  mean = image.mean(axis=(0, 1))
  low, high = image.min(axis=(0, 1)), image.max(axis=(0, 1))
  out = (image - mean) * np.asarray(factors, np.float32) + mean
  return np.clip(out, low, high)


def gamma(image: np.ndarray, gammas: np.ndarray, invert: bool = False) -> np.ndarray:
  """Each channel mapped to [0, 1] over its range, raised to its gamma, mapped back, then
  shifted and scaled back to its mean and (unbiased) deviation; `invert`: all that on the
  negated image, negated again."""
  x = -image if invert else image
  mean, std = x.mean(axis=(0, 1)), x.std(axis=(0, 1), ddof=1)
  low = x.min(axis=(0, 1))
  span = x.max(axis=(0, 1)) - low
  y = ((x - low) / np.maximum(span, _EPS)) ** np.asarray(gammas, np.float32) * span + low
  y_mean, y_std = y.mean(axis=(0, 1)), y.std(axis=(0, 1), ddof=1)
  y = (y - y_mean) * (std / np.maximum(y_std, _EPS)) + mean
  return (-y if invert else y).astype(np.float32)


def augment(image: np.ndarray, rng: np.random.Generator, aug: ml_collections.ConfigDict,
            ) -> np.ndarray:
  """The augmentations above that `aug` turns on, in nnU-Net's order; parameters are drawn only
  for those that apply, as nnU-Net draws them."""
  channels = image.shape[-1]
  noise, b, c = aug.get('noise', 0.0), aug.get('brightness', 0.0), aug.get('contrast', 0.0)
  gamma_range = tuple(aug.get('gamma', ()) or ())
  if noise and applies(rng, aug.get('noise_prob', 1.0)):
    image = gaussian_noise(image, float(rng.uniform(0.0, noise)), rng)
  if b and applies(rng, aug.get('brightness_prob', 1.0)):
    image = brightness(image, np.array([bg_contrast(rng, 1 - b, 1 + b) for _ in range(channels)]))
  if c and applies(rng, aug.get('contrast_prob', 1.0)):
    image = contrast(image, np.array([bg_contrast(rng, 1 - c, 1 + c) for _ in range(channels)]))
  if gamma_range:
    for invert, prob in ((True, aug.get('inverted_gamma_prob', 0.0)),
                         (False, aug.get('gamma_prob', 1.0))):
      if prob and applies(rng, prob):
        gammas = np.array([bg_contrast(rng, *gamma_range) for _ in range(channels)])
        image = gamma(image, gammas, invert)
  return image.astype(np.float32)

"""nnU-Net v2's intensity augmentations, as its trainer sets up batchgeneratorsv2's transforms.

`augment.intensity_recipe='nnunet'` (configs/nnunet.py) runs these on each training example
(a float32 (H, W, C) image, scaled to [0, 1] and, with data.normalize='zscore' as nnU-Net,
normalised) in nnU-Net's order, each for its share of the examples (`augment.*_prob`,
nnU-Net's `apply_probability`):
- Gaussian noise: a deviation drawn from [0, `noise`] (nnU-Net's `noise_variance=(0, 0.1)`, which
  it uses as the deviation), one noise field added to every channel (`synchronize_channels`);
- Gaussian blur (`blur`, a sigma range in pixels): each channel, with probability
  `blur_channel_prob`, blurred along the height then the width by a sampled Gaussian of its own
  sigma for each axis (its kernel sized and reflect-padded as batchgeneratorsv2's);
- multiplicative brightness: each channel times its own factor from [1 - b, 1 + b];
- contrast: each channel's distance from its mean times its own factor from [1 - c, 1 + c],
  then clipped to the channel's range before (`preserve_range`);
- low-resolution simulation (`low_resolution`, a scale range): each channel, with probability
  `low_resolution_channel_prob`, shrunk by its own scale (nearest-exact) and brought back to its
  size (bilinear, half-pixel centres), as torch's `interpolate` does both;
- gamma of the inverted image (`inverted_gamma_prob`), then gamma: each channel mapped to
  [0, 1] over its range, raised to its own gamma from `gamma`, mapped back, and its mean and
  standard deviation restored (`retain_stats`).
Every factor and gamma is drawn as nnU-Net's `BGContrast` draws them: half the time below 1,
half above, so (0.7, 1.5) darkens as often as it brightens. Sigmas and scales are drawn
uniformly from their range (only where low < high), for each channel that the channel's coin
picks; nnU-Net's coins are drawn for every channel first.
batchgeneratorsv2 before its fix of March 2026 (pull request 21) set every scale of the
low-resolution simulation to 1 for 2D data, so nnU-Net runs with older versions did not shrink
their 2D images; this is the transform as fixed.
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


def uniform_scalar(rng: np.random.Generator, low: float, high: float) -> float:
  """batchgeneratorsv2's `sample_scalar` of a (low, high) range: `low` itself, with nothing
  drawn, when the two are equal; else uniform on [low, high)."""
  return float(low) if low == high else float(rng.uniform(low, high))


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  """One (H, W) field of N(0, sigma) added to every channel."""
  field = rng.normal(0.0, sigma, image.shape[:2]).astype(np.float32)
  return image + field[..., None]


def blur_kernel_size(sigma: float, truncate: float = 6.0) -> int:
  """batchgeneratorsv2's kernel size: the odd integer nearest `sigma * truncate + 0.5`, after
  Python's `round` (halves to even), an even result moved toward that value."""
  n = sigma * truncate + 0.5
  rounded = round(n)
  if rounded % 2 == 1:
    return rounded
  return rounded + 1 if n - rounded >= 0 else rounded - 1


def gaussian_kernel(sigma: float) -> np.ndarray:
  """The normalised 1D Gaussian of `sigma` on `blur_kernel_size(sigma)` evenly spaced taps,
  in float32 as torch builds it."""
  size = blur_kernel_size(sigma)
  half = (size - 1) * 0.5
  x = np.linspace(-half, half, size, dtype=np.float32)
  pdf = np.exp(np.float32(-0.5) * (x / np.float32(sigma)) ** 2)
  return pdf / pdf.sum()


def blur_axis(channel: np.ndarray, sigma: float, axis: int) -> np.ndarray:
  """One (H, W) channel convolved along `axis` with `gaussian_kernel(sigma)`, edges
  reflect-padded (torch's `pad(mode='reflect')`, NumPy's 'reflect': the edge not repeated)."""
  kernel = gaussian_kernel(sigma)
  radius = len(kernel) // 2
  pad = [(0, 0), (0, 0)]
  pad[axis] = (radius, radius)
  padded = np.pad(channel, pad, mode='reflect')
  n = channel.shape[axis]
  out = np.zeros_like(channel)
  for tap, weight in enumerate(kernel):
    out += weight * np.take(padded, np.arange(tap, tap + n), axis=axis)
  return out


def gaussian_blur(image: np.ndarray, sigmas: dict[int, tuple[float, float]]) -> np.ndarray:
  """The channels named in `sigmas` blurred along the height with the first sigma, then the
  width with the second."""
  out = image.copy()
  for c, (sigma_h, sigma_w) in sigmas.items():
    out[..., c] = blur_axis(blur_axis(image[..., c], sigma_h, 0), sigma_w, 1)
  return out


def _nearest_exact_indices(size: int, new_size: int) -> np.ndarray:
  """torch's 'nearest-exact' source index of each output pixel: floor((i + 0.5) * scale), the
  scale size / new_size in float32 and the product rounded to float32 before the floor (as
  torch's CPU kernel calls floorf: 5.5 x 14/11 is 7, not 6.99...), capped at the last pixel."""
  scale = np.float64(np.float32(size) / np.float32(new_size))
  product = ((np.arange(new_size) + 0.5) * scale).astype(np.float32)
  return np.minimum(np.floor(product).astype(np.int64), size - 1)


def _linear_axis(x: np.ndarray, axis: int, new_size: int) -> np.ndarray:
  """torch's linear interpolation along `axis` to `new_size` with align_corners=False: source
  position (i + 0.5) * scale - 0.5, clamped at 0, in float32."""
  size = x.shape[axis]
  scale = np.float32(size) / np.float32(new_size)
  src = np.maximum((np.arange(new_size, dtype=np.float32) + np.float32(0.5)) * scale
                   - np.float32(0.5), np.float32(0))
  i0 = src.astype(np.int64)
  i1 = np.minimum(i0 + 1, size - 1)
  lam = (src - i0).astype(np.float32)
  shape = [1, 1]
  shape[axis] = new_size
  lam = lam.reshape(shape)
  return (np.float32(1) - lam) * np.take(x, i0, axis=axis) + lam * np.take(x, i1, axis=axis)


def low_resolution(image: np.ndarray, scales: dict[int, float]) -> np.ndarray:
  """The channels named in `scales` shrunk to round(side x scale) pixels per side by
  nearest-exact, then brought back to their size by bilinear interpolation (half-pixel
  centres), as batchgeneratorsv2 calls torch's `interpolate`."""
  out = image.copy()
  h, w = image.shape[:2]
  for c, scale in scales.items():
    scale = float(np.float32(scale))  # (held in a float32 tensor there)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = image[..., c][_nearest_exact_indices(h, nh)][:, _nearest_exact_indices(w, nw)]
    out[..., c] = _linear_axis(_linear_axis(small, 0, h), 1, w)
  return out


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


def _picked_channels(rng: np.random.Generator, channels: int, prob: float) -> np.ndarray:
  """The channels a per-channel transform takes: a coin for every channel first (its
  p_per_channel), as batchgeneratorsv2 draws them."""
  return np.flatnonzero(rng.random(channels) < prob)


def augment(image: np.ndarray, rng: np.random.Generator, aug: ml_collections.ConfigDict,
            ) -> np.ndarray:
  """The augmentations above that `aug` turns on, in nnU-Net's order; parameters are drawn only
  for those that apply, as nnU-Net draws them."""
  channels = image.shape[-1]
  noise, b, c = aug.get('noise', 0.0), aug.get('brightness', 0.0), aug.get('contrast', 0.0)
  gamma_range = tuple(aug.get('gamma', ()) or ())
  if noise and applies(rng, aug.get('noise_prob', 1.0)):
    image = gaussian_noise(image, float(rng.uniform(0.0, noise)), rng)
  blur = tuple(aug.get('blur', ()) or ())
  if blur and applies(rng, aug.get('blur_prob', 1.0)):
    picked = _picked_channels(rng, channels, aug.get('blur_channel_prob', 1.0))
    image = gaussian_blur(image, {int(k): (uniform_scalar(rng, *blur), uniform_scalar(rng, *blur))
                                  for k in picked})
  if b and applies(rng, aug.get('brightness_prob', 1.0)):
    image = brightness(image, np.array([bg_contrast(rng, 1 - b, 1 + b) for _ in range(channels)]))
  if c and applies(rng, aug.get('contrast_prob', 1.0)):
    image = contrast(image, np.array([bg_contrast(rng, 1 - c, 1 + c) for _ in range(channels)]))
  low_res = tuple(aug.get('low_resolution', ()) or ())
  if low_res and applies(rng, aug.get('low_resolution_prob', 1.0)):
    picked = _picked_channels(rng, channels, aug.get('low_resolution_channel_prob', 1.0))
    image = low_resolution(image, {int(k): uniform_scalar(rng, *low_res) for k in picked})
  if gamma_range:
    for invert, prob in ((True, aug.get('inverted_gamma_prob', 0.0)),
                         (False, aug.get('gamma_prob', 1.0))):
      if prob and applies(rng, prob):
        gammas = np.array([bg_contrast(rng, *gamma_range) for _ in range(channels)])
        image = gamma(image, gammas, invert)
  return image.astype(np.float32)

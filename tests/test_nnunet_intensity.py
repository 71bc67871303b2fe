"""augment.intensity_recipe='nnunet' against nnU-Net v2's transforms (batchgeneratorsv2),
transcribed here in torch on (C, H, W) tensors as that package writes them, fed the parameters
the example's random stream holds, drawn in nnU-Net's order."""

import ml_collections
import numpy as np
import pytest
import torch

from unet_jax.input_pipeline import preprocess
from unet_jax.nnunet_intensity import bg_contrast, gaussian_blur, low_resolution


def ref_noise(img, sigma, field):
  # GaussianNoiseTransform(synchronize_channels=True): one field, expanded over the channels
  return img + torch.from_numpy(field.astype(np.float32))[None]


def ref_brightness(img, multipliers):
  # MultiplicativeBrightnessTransform
  img = img.clone()
  for c, m in enumerate(multipliers):
    img[c] *= float(m)
  return img


def ref_contrast(img, multipliers):
  # ContrastTransform(preserve_range=True)
  img = img.clone()
  for c, m in enumerate(multipliers):
    mean, minm, maxm = img[c].mean(), img[c].min(), img[c].max()
    img[c] -= mean
    img[c] *= float(m)
    img[c] += mean
    img[c].clamp_(minm, maxm)
  return img


def ref_gamma(img, gammas, invert):
  # GammaTransform(p_retain_stats=1, p_per_channel=1, p_invert_image=0 or 1)
  img = img.clone()
  for c, g in enumerate(torch.Tensor(list(gammas))):
    if invert:
      img[c] *= -1
    mean, std = torch.mean(img[c]), torch.std(img[c])
    minm = torch.min(img[c])
    rnge = torch.max(img[c]) - minm
    img[c] = torch.pow(((img[c] - minm) / torch.clamp(rnge, min=1e-7)), g) * rnge + minm
    mn_here, std_here = torch.mean(img[c]), torch.std(img[c])
    img[c] -= mn_here
    img[c] *= (std / torch.clamp(std_here, min=1e-7))
    img[c] += mean
    if invert:
      img[c] *= -1
  return img


def ref_round_to_nearest_odd(n):
  rounded = round(n)
  if rounded % 2 == 1:
    return rounded
  return rounded + 1 if n - rounded >= 0 else rounded - 1


def ref_build_kernel(sigma, truncate):
  kernel_size = ref_round_to_nearest_odd(sigma * truncate + 0.5)
  ksize_half = (kernel_size - 1) * 0.5
  x = torch.linspace(-ksize_half, ksize_half, steps=kernel_size)
  pdf = torch.exp(-0.5 * (x / sigma).pow(2))
  return pdf / pdf.sum()


def ref_blur_dimension(img, sigma, dim_to_blur, truncate=6):
  # blur_dimension on a (C, H, W) tensor: a 1D kernel along H (0) or W (1), reflect-padded
  kernel = ref_build_kernel(sigma, truncate)
  ksize = kernel.shape[0]
  if dim_to_blur == 0:
    kernel, padding = kernel[None, None, :, None], [0, 0, ksize // 2, ksize // 2]
  else:
    kernel, padding = kernel[None, None, None, :], [ksize // 2, ksize // 2, 0, 0]
  img_padded = torch.nn.functional.pad(img, padding, mode='reflect')
  channels = img_padded.shape[0]
  return torch.nn.functional.conv2d(img_padded[None], kernel.expand(channels, -1, -1, -1),
                                    groups=channels)[0]


def ref_blur(img, channels, sigmas):
  # GaussianBlurTransform(synchronize_channels=False, synchronize_axes=False)
  img = img.clone()
  for i, per_axis in zip(channels, sigmas, strict=True):
    for d in range(2):
      img[i:i + 1] = ref_blur_dimension(img[i:i + 1], per_axis[d], d)
  return img


def ref_low_resolution(img, channels, scales):
  # SimulateLowResolutionTransform(synchronize_channels=False, synchronize_axes=True), as fixed
  img = img.clone()
  orig_shape = img.shape[1:]
  for c, s in zip(channels, scales, strict=True):
    new_shape = [round(i * j.item()) for i, j in zip(orig_shape, s, strict=True)]
    down = torch.nn.functional.interpolate(img[c][None, None], new_shape, mode='nearest-exact')
    img[c] = torch.nn.functional.interpolate(down, orig_shape, mode='bilinear')[0, 0]
  return img


def ref_sample_scalar(draws, value):
  # sample_scalar of a (low, high) tuple, np.random replaced by the test's replay of the stream
  low, high = value
  return low if low == high else draws.uniform(low, high)


def ref_bg_contrast(draws, low, high):
  # BGContrast.sample_contrast, on the test's replay of the stream
  if draws.random() < 0.5 and low < 1:
    return draws.uniform(low, 1)
  return draws.uniform(max(low, 1), high)


NNUNET = dict(noise=0.1, brightness=0.25, contrast=0.25, gamma=(0.7, 1.5), noise_prob=0.1,
              brightness_prob=0.15, contrast_prob=0.15, gamma_prob=0.3, inverted_gamma_prob=0.1,
              blur=(0.5, 1.0), blur_prob=0.2, blur_channel_prob=0.5, low_resolution=(0.5, 1.0),
              low_resolution_prob=0.25, low_resolution_channel_prob=0.5)
ORDER = ('noise', 'blur', 'brightness', 'contrast', 'low_resolution', 'inverted_gamma', 'gamma')


def _augmented(seed, image, mask, **augment):
  aug = ml_collections.ConfigDict(dict(min_scale=1.0, flip_horizontal=False,
                                       flip_vertical=False, intensity_recipe='nnunet', **augment))
  return preprocess({'image': image, 'mask': mask}, mask.shape, np.random.default_rng(seed), aug)


def _nnunet_reference(seed, image, settings):
  """nnU-Net's transforms in its order, each gated by its share, on the stream's draws."""
  draws = np.random.default_rng(seed)
  draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)  # (the scale-crop's)
  img = torch.from_numpy(image / np.float32(255)).permute(2, 0, 1).contiguous()
  channels, applied = img.shape[0], []

  def gate(name):
    prob = settings.get(f'{name}_prob', 1.0)
    on = prob >= 1 or draws.random() < prob
    applied.append(name) if on else None
    return on

  if settings.get('noise') and gate('noise'):
    sigma = draws.uniform(0, settings['noise'])
    img = ref_noise(img, sigma, draws.normal(0, sigma, img.shape[1:]))
  if settings.get('blur') and gate('blur'):
    picked = np.where(draws.random(channels) < settings.get('blur_channel_prob', 1.0))[0]
    sigmas = [[ref_sample_scalar(draws, settings['blur']) for _ in range(2)] for _ in picked]
    img = ref_blur(img, picked, sigmas)
  for name, transform in (('brightness', ref_brightness), ('contrast', ref_contrast)):
    if settings.get(name) and gate(name):
      x = settings[name]
      img = transform(img, [ref_bg_contrast(draws, 1 - x, 1 + x) for _ in range(channels)])
  if settings.get('low_resolution') and gate('low_resolution'):
    picked = torch.where(torch.from_numpy(
        draws.random(channels) < settings.get('low_resolution_channel_prob', 1.0)))[0]
    scales = torch.Tensor([[ref_sample_scalar(draws, settings['low_resolution'])] * 2
                           for _ in picked])
    img = ref_low_resolution(img, picked, scales)
  if settings.get('gamma'):
    for invert, name in ((True, 'inverted_gamma'), (False, 'gamma')):
      if settings.get(f'{name}_prob', 1.0) and gate(name):
        img = ref_gamma(img, [ref_bg_contrast(draws, *settings['gamma'])
                              for _ in range(channels)], invert)
  return img.permute(1, 2, 0).numpy(), applied


@pytest.mark.parametrize('channels', [1, 3])
def test_nnunet_recipe_is_nnunets_transforms_in_its_order(channels):
  rng = np.random.default_rng(channels)
  image = rng.integers(20, 230, (12, 14, channels), np.uint8)
  mask = (rng.random((12, 14)) > 0.5).astype(np.uint8)
  seen = set()
  # Every transform on every example (each draw order and formula at once), then nnU-Net's
  # shares: each transform alone and in company, over 200 examples.
  always = {k: v for k, v in NNUNET.items() if not k.endswith('_prob')}
  for settings, seeds in ((dict(always, inverted_gamma_prob=1.0), range(10)),
                          (NNUNET, range(200))):
    for seed in seeds:
      out = _augmented(seed, image, mask, **settings)
      want, applied = _nnunet_reference(seed, image, settings)
      assert out['image'].dtype == np.float32
      np.testing.assert_allclose(out['image'], want, atol=2e-5, err_msg=f'{seed} {applied}')
      np.testing.assert_array_equal(out['mask'], mask)
      seen.add(tuple(applied))
  assert len(seen) > 6 and ORDER in seen
  # An example with no transform applied is the image as scaled, untouched.
  untouched = [s for s in range(200) if not _nnunet_reference(s, image, NNUNET)[1]]
  assert len(untouched) > 30  # (about a quarter: 0.9 x 0.8 x 0.85 x 0.85 x 0.75 x 0.9 x 0.7)
  np.testing.assert_array_equal(_augmented(untouched[0], image, mask, **NNUNET)['image'],
                                image / np.float32(255))


@pytest.mark.parametrize('shape', [(12, 14), (13, 17), (64, 48)])
def test_blur_and_low_resolution_match_batchgeneratorsv2_at_each_sigma_and_scale(shape):
  rng = np.random.default_rng(shape[0])
  image = rng.random((*shape, 2)).astype(np.float32)
  img = torch.from_numpy(image).permute(2, 0, 1).contiguous()
  # kernels of 1 to 13 taps, another sigma for each axis; the other channel left alone
  for sigmas in [(0.1, 0.5), (0.5, 1.0), (0.75, 1.25), (1.5, 2.0)]:
    want = ref_blur(img, [1], [sigmas]).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(gaussian_blur(image, {1: sigmas}), want, atol=1e-6,
                               err_msg=str(sigmas))
  # every shrunk size from half to whole (14 -> 11 takes torch's float32 rounding of 5.5 x 14/11;
  # the bilinear weights round apart by a few ulp)
  # and a float64 ulp either side of each half-way size, where only the scale as float32 (as
  # batchgeneratorsv2 holds it) rounds the size the same way
  halfway = [(k + 0.5) / shape[0] for k in range(shape[0] // 2, shape[0])]
  for scale in [*np.linspace(0.5, 1.0, 51), *np.nextafter(halfway, 0), *np.nextafter(halfway, 2)]:
    want = ref_low_resolution(img, [0], torch.Tensor([[scale] * 2])).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(low_resolution(image, {0: scale}), want, atol=3e-6,
                               err_msg=str(scale))


def test_gamma_keeps_each_channels_mean_and_deviation_and_draws_as_nnunet():
  rng = np.random.default_rng(5)
  image = rng.integers(0, 256, (16, 16, 3), np.uint8)
  base = image / np.float32(255)
  for seed in range(5):
    out = _augmented(seed, image, np.zeros((16, 16), np.uint8), gamma=(0.7, 1.5))['image']
    assert not np.allclose(out, base)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), base.mean(axis=(0, 1)), atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1)), base.std(axis=(0, 1)), atol=1e-5)
  # BGContrast: half below 1, half above, each uniform on its side.
  draws = np.random.default_rng(0)
  values = np.array([bg_contrast(draws, 0.7, 1.5) for _ in range(4000)])
  assert 0.46 < np.mean(values < 1) < 0.54
  assert values.min() >= 0.7 and values.max() < 1.5
  np.testing.assert_allclose(np.mean(values[values < 1]), 0.85, atol=0.01)
  np.testing.assert_allclose(np.mean(values[values >= 1]), 1.25, atol=0.015)


@pytest.mark.parametrize('normalize', ['zscore', 'minmax'])
def test_normalisation_takes_the_whole_image_before_the_patch_is_cut(normalize):
  # nnU-Net's ZScoreNormalization and RescaleTo01Normalization (rescale_to_0_1), each channel
  # over the whole case, on its own values.
  rng = np.random.default_rng(9)
  image = rng.integers(10, 240, (20, 20, 3), np.uint8)
  image[..., 1] = image[..., 1] // 3 + 40  # (channels of other ranges: each stretched alone)
  mask = np.zeros((20, 20), np.uint8)
  whole = preprocess({'image': image, 'mask': mask}, (20, 20), None, None, normalize=normalize)
  if normalize == 'zscore':
    scaled = image / np.float32(255)
    want = (scaled - scaled.mean(axis=(0, 1))) / scaled.std(axis=(0, 1))
  else:
    shifted = image.astype(np.float32) - image.min(axis=(0, 1))
    want = shifted / shifted.max(axis=(0, 1))
  np.testing.assert_allclose(whole['image'], want, atol=1e-5)
  assert whole['image'].dtype == np.float32
  aug = ml_collections.ConfigDict(dict(min_scale=1.0, flip_horizontal=False, flip_vertical=False))
  for seed in range(3):
    patch = preprocess({'image': image, 'mask': mask}, (20, 20), np.random.default_rng(seed),
                       aug, crop=8, normalize=normalize)['image']
    draws = np.random.default_rng(seed)
    draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)  # (the scale-crop's)
    y0, x0 = draws.integers(0, 13), draws.integers(0, 13)
    np.testing.assert_array_equal(patch, whole['image'][y0:y0 + 8, x0:x0 + 8])

"""augment.intensity_recipe='nnunet' against nnU-Net v2's transforms (batchgeneratorsv2),
transcribed here in torch on (C, H, W) tensors as that package writes them, fed the parameters
the example's random stream holds, drawn in nnU-Net's order."""

import ml_collections
import numpy as np
import pytest
import torch

from unet_jax.input_pipeline import preprocess
from unet_jax.nnunet_intensity import bg_contrast


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


def ref_bg_contrast(draws, low, high):
  # BGContrast.sample_contrast, on the test's replay of the stream
  if draws.random() < 0.5 and low < 1:
    return draws.uniform(low, 1)
  return draws.uniform(max(low, 1), high)


NNUNET = dict(noise=0.1, brightness=0.25, contrast=0.25, gamma=(0.7, 1.5), noise_prob=0.1,
              brightness_prob=0.15, contrast_prob=0.15, gamma_prob=0.3, inverted_gamma_prob=0.1)


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
  for name, transform in (('brightness', ref_brightness), ('contrast', ref_contrast)):
    if settings.get(name) and gate(name):
      x = settings[name]
      img = transform(img, [ref_bg_contrast(draws, 1 - x, 1 + x) for _ in range(channels)])
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
  assert len(seen) > 6 and ('noise', 'brightness', 'contrast', 'inverted_gamma',
                            'gamma') in seen
  # An example with no transform applied is the image as scaled, untouched.
  untouched = [s for s in range(200) if not _nnunet_reference(s, image, NNUNET)[1]]
  assert len(untouched) > 50
  np.testing.assert_array_equal(_augmented(untouched[0], image, mask, **NNUNET)['image'],
                                image / np.float32(255))


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


def test_zscore_normalises_the_whole_image_before_the_patch_is_cut():
  rng = np.random.default_rng(9)
  image = rng.integers(0, 256, (20, 20, 3), np.uint8)
  mask = np.zeros((20, 20), np.uint8)
  whole = preprocess({'image': image, 'mask': mask}, (20, 20), None, None, normalize='zscore')
  scaled = image / np.float32(255)
  want = (scaled - scaled.mean(axis=(0, 1))) / scaled.std(axis=(0, 1))
  np.testing.assert_allclose(whole['image'], want, atol=1e-5)
  assert whole['image'].dtype == np.float32
  aug = ml_collections.ConfigDict(dict(min_scale=1.0, flip_horizontal=False, flip_vertical=False))
  for seed in range(3):
    patch = preprocess({'image': image, 'mask': mask}, (20, 20), np.random.default_rng(seed),
                       aug, crop=8, normalize='zscore')['image']
    draws = np.random.default_rng(seed)
    draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)  # (the scale-crop's)
    y0, x0 = draws.integers(0, 13), draws.integers(0, 13)
    np.testing.assert_array_equal(patch, whole['image'][y0:y0 + 8, x0:x0 + 8])

"""predict's --blend gaussian against nnU-Net's sliding window written again here from its code
(nnunetv2/inference: compute_steps_for_sliding_window, compute_gaussian, and the loop of
predict_sliding_window_return_logits with acvl_utils' pad_nd_image before it), with scipy's 2-D
gaussian_filter as nnU-Net calls it.
Tolerance: logits to 1e-5 of their scale."""

import re

import jax
import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from unet_jax import UNet
from unet_jax.checkpoint import save_pretrained
from unet_jax.errors import UserError
from unet_jax.gaussian_tiles import gaussian_importance, tile_starts
from unet_jax.model import init_variables
from unet_jax.predict import main as predict_main
from unet_jax.predict import predict_logits, probabilities


def nnunet_steps(image_size, tile_size, tile_step_size):
  target = [i * tile_step_size for i in tile_size]
  num_steps = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target, tile_size,
                                                                   strict=True)]
  steps = []
  for dim in range(len(tile_size)):
    max_step_value = image_size[dim] - tile_size[dim]
    actual = max_step_value / (num_steps[dim] - 1) if num_steps[dim] > 1 else 99999999999
    steps.append([int(np.round(actual * i)) for i in range(num_steps[dim])])
  return steps


def nnunet_gaussian(tile_size, sigma_scale=1. / 8, value_scaling_factor=10):
  tmp = np.zeros(tile_size)
  tmp[tuple(i // 2 for i in tile_size)] = 1
  gaussian = gaussian_filter(tmp, [i * sigma_scale for i in tile_size], 0, mode='constant',
                             cval=0)
  gaussian /= np.max(gaussian) / value_scaling_factor
  mask = gaussian == 0
  gaussian[mask] = np.min(gaussian[~mask])
  return gaussian


def nnunet_pad(image, new_shape):
  """pad_nd_image(image, new_shape, 'constant', {'value': 0}, return_slicer=True) on the first
  two axes: padded to at least new_shape, the odd pixel after."""
  difference = [max(0, n - s) for n, s in zip(new_shape, image.shape[:2], strict=True)]
  below = [d // 2 for d in difference]
  above = [d // 2 + d % 2 for d in difference]
  padded = np.pad(image, [*zip(below, above, strict=True), (0, 0)], 'constant',
                  constant_values=0)
  slicer = tuple(slice(b, b + s) for b, s in zip(below, image.shape[:2], strict=True))
  return padded, slicer


def nnunet_sliding_window(apply, image, tile_size, tile_step_size=0.5):
  """Logits (H, W, C) of one image (H, W, C), padded to the tile's size first where smaller."""
  image, revert_padding = nnunet_pad(image, tile_size)
  steps = nnunet_steps(image.shape[:2], tile_size, tile_step_size)
  gaussian = nnunet_gaussian(tile_size)[..., None]
  logits = n_predictions = 0
  for y in steps[0]:
    for x in steps[1]:
      window = (slice(y, y + tile_size[0]), slice(x, x + tile_size[1]))
      prediction = np.asarray(apply(image[window][None]))[0]
      add = np.zeros(image.shape[:2] + (prediction.shape[-1],))
      add[window] = prediction * gaussian
      logits = logits + add
      weight = np.zeros(image.shape[:2] + (1,))
      weight[window] = gaussian
      n_predictions = n_predictions + weight
  return (logits / n_predictions)[revert_padding]


def test_gaussian_map_and_steps_are_nnunets():
  for shape in ((32, 32), (64, 48), (40, 24), (8, 16)):
    np.testing.assert_allclose(gaussian_importance(*shape), nnunet_gaussian(shape), rtol=1e-6)
  for size, tile, step in ((100, 32, 0.5), (70, 32, 0.5), (64, 64, 0.5), (50, 32, 0.25),
                           (33, 32, 1.0), (513, 128, 0.5)):
    assert tile_starts(size, tile, step) == nnunet_steps((size,), (tile,), step)[0]


def test_predict_blends_tiles_as_nnunet(tmp_path, capsys):
  model = UNet(1, 3, base_features=4, depth=2)
  variables = init_variables(model, jax.random.key(5))
  rng = np.random.default_rng(0)
  image = rng.random((58, 75, 1), np.float32)

  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  want = nnunet_sliding_window(apply, image, (32, 32))
  got = predict_logits(model, variables, image[None], tile=32, blend='gaussian')[0]
  tolerance = 1e-5 * np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=tolerance)
  # (the ramp's blend, which starts tiles on multiples of 2**depth, is far outside it)
  ramp = predict_logits(model, variables, image[None], tile=32)[0]
  assert np.abs(ramp - want).max() > 100 * tolerance
  # Another overlap is another step: 24 of 32, nnU-Net's tile_step_size 0.25.
  want = nnunet_sliding_window(apply, image, (32, 32), 0.25)
  got = predict_logits(model, variables, image[None], tile=32, overlap=24, blend='gaussian')[0]
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  # The command line.
  checkpoint = str(tmp_path / 'ckpt')
  save_pretrained(checkpoint, model, variables)
  Image.fromarray((image[..., 0] * 255).round().astype(np.uint8)).save(tmp_path / 'x.png')
  scaled = np.asarray(Image.open(tmp_path / 'x.png'), np.float32)[..., None] / 255
  assert predict_main([str(tmp_path / 'x.png'), '--checkpoint', checkpoint, '--output',
                       str(tmp_path / 'out'), '--tile', '32', '--overlap', '24', '--blend',
                       'gaussian', '--probabilities']) == 0
  np.testing.assert_allclose(
      np.load(tmp_path / 'out' / 'x_prob.npy'),
      probabilities(nnunet_sliding_window(apply, scaled, (32, 32), 0.25)[None])[0], atol=1e-5)
  # An ensemble: the mean of each member's probabilities, each blended so.
  other = init_variables(model, jax.random.key(6))
  save_pretrained(str(tmp_path / 'other'), model, other)
  apply_other = jax.jit(lambda x: model.apply(other, x, train=False))
  assert predict_main([str(tmp_path / 'x.png'), '--checkpoint', checkpoint, '--checkpoint',
                       str(tmp_path / 'other'), '--output', str(tmp_path / 'both'), '--tile',
                       '32', '--blend', 'gaussian', '--probabilities']) == 0
  np.testing.assert_allclose(np.load(tmp_path / 'both' / 'x_prob.npy'), np.mean([
      probabilities(nnunet_sliding_window(a, scaled, (32, 32))[None])[0]
      for a in (apply, apply_other)], axis=0), atol=1e-5)
  capsys.readouterr()
  assert predict_main([str(tmp_path / 'x.png'), '--checkpoint', checkpoint, '--output',
                       str(tmp_path / 'o2'), '--blend', 'gaussian']) == 2
  assert capsys.readouterr().err.strip() == (
      'error: --blend gaussian blends the tiles of --tile, which is not given; give --tile '
      '(e.g. --tile 256), or leave out --blend')
  with pytest.raises(UserError, match=re.escape("blend='cosine': use one of ramp, gaussian")):
    predict_logits(model, variables, image[None], tile=32, blend='cosine')


def test_images_smaller_than_the_tile_are_padded_as_nnunet(tmp_path, capsys):
  """Smaller along one axis, the other, both (even and odd differences), and bigger than a
  tile along neither: each zero-padded about its centre to the tile, as nnU-Net's predictor
  pads it, not run at its own size."""
  model = UNet(1, 2, base_features=4, depth=2)
  variables = init_variables(model, jax.random.key(7))
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  rng = np.random.default_rng(1)
  for shape in ((20, 75), (58, 21), (21, 26), (32, 12), (3, 10)):
    image = rng.random(shape + (1,), np.float32)
    want = nnunet_sliding_window(apply, image, (32, 32))
    got = predict_logits(model, variables, image[None], tile=32, blend='gaussian')[0]
    assert got.shape == want.shape == shape + (2,)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    if min(shape) >= 4:  # (at its own size the network sees another image: far outside)
      unpadded = predict_logits(model, variables, image[None])[0]
      assert np.abs(unpadded - want).max() > 100 * 1e-5 * np.abs(want).max()
  # The command line: an image below the model's minimum (2**depth = 4) is padded to the tile,
  # not refused (as it still is without the Gaussian blend's padding).
  checkpoint = str(tmp_path / 'ckpt')
  save_pretrained(checkpoint, model, variables)
  Image.fromarray((image[..., 0] * 255).round().astype(np.uint8)).save(tmp_path / 'tiny.png')
  scaled = np.asarray(Image.open(tmp_path / 'tiny.png'), np.float32)[..., None] / 255
  assert predict_main([str(tmp_path / 'tiny.png'), '--checkpoint', checkpoint, '--output',
                       str(tmp_path / 'out'), '--tile', '32', '--blend', 'gaussian',
                       '--probabilities']) == 0
  np.testing.assert_allclose(np.load(tmp_path / 'out' / 'tiny_prob.npy'), probabilities(
      nnunet_sliding_window(apply, scaled, (32, 32))[None])[0], atol=1e-5)
  capsys.readouterr()
  assert predict_main([str(tmp_path / 'tiny.png'), '--checkpoint', checkpoint, '--output',
                       str(tmp_path / 'o2'), '--tile', '32']) == 2
  assert capsys.readouterr().err.strip() == (
      f"error: {tmp_path / 'tiny.png'}: 10x3 is smaller than the model's minimum 4x4")

"""The UNet paper's elastic deformation: the resampling against a cubic spline written out and
torch's grid_sample, the displacement field through its drawn nodes, and its place in the
augmentation stream."""

import json

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from test_train import tiny_config

from unet_jax import train
from unet_jax.elastic import deform, displacement_field
from unet_jax.input_pipeline import preprocess


def _b3(t):
  """The cubic B-spline."""
  t = np.abs(t)
  return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def _mirrored(i, n):
  """Index i of an axis of n mirrored about its first and last samples (period 2 (n - 1))."""
  i = np.mod(i, 2 * (n - 1))
  return np.where(i >= n, 2 * (n - 1) - i, i)


def _spline_coefficients(f, axis):
  """The cubic spline's coefficients along `axis`: the ones whose mirrored sequence, weighed
  by the B-spline, gives back every sample (a dense solve of the interpolation condition)."""
  n = f.shape[axis]
  system = np.zeros((n, n))
  for i in range(n):
    for k in (i - 1, i, i + 1):
      system[i, _mirrored(k, n)] += _b3(i - k)
  g = np.moveaxis(f, axis, 0)
  return np.moveaxis(np.linalg.solve(system, g.reshape(n, -1)).reshape(g.shape), 0, axis)


def _reference_deform(image, mask, displacement):
  """Each pixel read at its position plus its displacement, mirrored about the border pixels:
  the image's cubic spline (written out in float64), the mask by torch's grid_sample nearest
  (padding_mode='reflection', align_corners=True)."""
  h, w = mask.shape
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  y, x = rows + displacement[0].astype(float), cols + displacement[1].astype(float)
  fy, fx = np.floor(y).astype(int), np.floor(x).astype(int)
  planes = []
  for c in range(image.shape[-1]):
    coef = _spline_coefficients(_spline_coefficients(image[..., c].astype(float), 0), 1)
    planes.append(sum(coef[_mirrored(fy + a, h), _mirrored(fx + b, w)] * _b3(y - fy - a)
                      * _b3(x - fx - b) for a in range(-1, 3) for b in range(-1, 3)))
  grid = torch.tensor(np.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], -1)[None]).float()
  mask = F.grid_sample(torch.tensor(mask, dtype=torch.float32)[None, None], grid,
                       mode='nearest', padding_mode='reflection', align_corners=True)
  return np.stack(planes, axis=-1), mask[0, 0].numpy()


def test_deform_resamples_by_cubic_spline_and_nearest_mirrored_at_the_edges():
  rng = np.random.default_rng(0)
  for channels, (h, w), sigma in ((1, (33, 41), 10.0), (3, (24, 17), 30.0)):
    image = rng.integers(0, 256, (h, w, channels)).astype(np.uint8)
    mask = rng.integers(0, 4, (h, w)).astype(np.uint8)
    field = displacement_field(rng, h, w, sigma)
    assert np.abs(field).max() > max(h, w) / 3  # (some positions past the edges)
    got_image, got_mask = deform(image, mask, field)
    want_image, want_mask = _reference_deform(image, mask, field)
    assert got_image.dtype == np.float32 and got_mask.dtype == np.uint8
    np.testing.assert_allclose(got_image, want_image, atol=2e-3)  # (of 0..255)
    np.testing.assert_array_equal(got_mask, want_mask)
    assert not np.array_equal(got_mask, mask)
  # No displacement: the example as it was.
  got_image, got_mask = deform(image, mask, np.zeros((2, *mask.shape), np.float32))
  np.testing.assert_allclose(got_image, image.astype(np.float32), atol=1e-4)  # (of 0..255)
  np.testing.assert_array_equal(got_mask, mask)


def test_displacement_field_passes_through_its_drawn_nodes():
  # The paper's 3x3 grid: nodes on the corners, edge centres and centre, each displacement
  # N(0, sigma^2) per axis; the cubic spline passes through them and is smooth between.
  for grid, (h, w) in ((3, (33, 41)), (4, (31, 46))):
    nodes = np.random.default_rng(5).normal(0.0, 10.0, (2, grid, grid))
    field = displacement_field(np.random.default_rng(5), h, w, 10.0, grid)
    assert field.shape == (2, h, w) and field.dtype == np.float32
    at_rows = np.linspace(0, h - 1, grid).round().astype(int)
    at_cols = np.linspace(0, w - 1, grid).round().astype(int)
    np.testing.assert_allclose(field[:, at_rows][:, :, at_cols], nodes, atol=1e-4)
    # Smooth: neighbouring pixels move alike (a step far below sigma).
    assert np.abs(np.diff(field, axis=1)).max() < 3 and np.abs(np.diff(field, axis=2)).max() < 3
  draws = np.concatenate([displacement_field(np.random.default_rng(s), 9, 9, 10.0)[:, ::4, ::4]
                          .ravel() for s in range(300)])
  assert 9 < draws.std() < 11 and abs(draws.mean()) < 1


def _augmented(seed, image, mask, **augment):
  aug = ml_collections.ConfigDict(dict(min_scale=1.0, flip_horizontal=False,
                                       flip_vertical=False, **augment))
  return preprocess({'image': image, 'mask': mask}, mask.shape, np.random.default_rng(seed), aug)


def test_elastic_in_the_stream_deforms_its_share_of_the_examples():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (20, 24, 1)).astype(np.uint8)
  mask = rng.integers(0, 3, (20, 24)).astype(np.uint8)
  deformed = 0
  for seed in range(30):
    draws = np.random.default_rng(seed)
    draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)  # (the crop's)
    applied = draws.random() < 0.5
    field = displacement_field(draws, 20, 24, 4.0, 3)  # (drawn either way)
    want_image, want_mask = deform(image, mask, field) if applied else (image, mask)
    out = _augmented(seed, image, mask, elastic_sigma=4.0, elastic_prob=0.5)
    np.testing.assert_array_equal(out['mask'], want_mask)
    np.testing.assert_allclose(out['image'], np.float32(want_image) / np.float32(255),
                               rtol=1e-6)
    deformed += applied
  assert 8 < deformed < 22
  # Off (the default), the stream is that of a run without it.
  for seed in range(4):
    np.testing.assert_array_equal(_augmented(seed, image, mask, elastic_sigma=0.0)['image'],
                                  _augmented(seed, image, mask)['image'])


def test_a_run_trains_with_elastic_deformation(tmp_path):
  config = tiny_config(num_train_steps=2, eval_every_steps=2, num_sample_images=0,
                       **{'augment.elastic_sigma': 3.0})
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  rows = [json.loads(line) for line in (tmp_path / 'wd' / 'metrics.jsonl').read_text()
          .splitlines()]
  assert np.isfinite(rows[-1]['eval_dice']) and np.isfinite(rows[0]['loss'])

"""Balanced class weights from the training pixels: against scikit-learn's, and through a run
and its resume."""

import numpy as np
import pytest
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight
from test_data_and_checkpoints import make_folder
from test_train import tiny_config

from unet_jax import train
from unet_jax.class_balance import balanced_pos_weight, balanced_weights, pixel_counts
from unet_jax.errors import UserError
from unet_jax.train_checkpoints import latest_saved_meta


def test_balanced_weights_are_scikit_learns():
  rng = np.random.default_rng(0)
  # Label ids 0..3 with 1 ignored: classes 0, 1, 2 are ids 0, 2, 3.
  masks = [rng.choice(4, size=(5 + i, 7), p=[0.6, 0.1, 0.25, 0.05]) for i in range(4)]
  counts = pixel_counts(iter(masks), 3, ignore_id=1)
  pixels = np.concatenate([m.ravel() for m in masks])
  y = np.where(pixels > 1, pixels - 1, pixels)[pixels != 1]
  np.testing.assert_array_equal(counts, np.bincount(y, minlength=3))
  np.testing.assert_allclose(balanced_weights(counts),
                             compute_class_weight('balanced', classes=np.arange(3), y=y),
                             rtol=1e-12)
  binary = [(m > 1).astype(np.uint8) for m in masks]
  counts = pixel_counts(iter(binary), 2)
  y = np.concatenate([m.ravel() for m in binary])
  assert balanced_pos_weight(counts) == pytest.approx((y == 0).sum() / (y == 1).sum(), 1e-12)
  with pytest.raises(UserError, match=r'^class 2 \(tumour\) has no pixels in the training '
                     r'split, so it has no balanced weight; set --config.class_weights'):
    balanced_weights(np.array([5, 3, 0]), ('background', 'liver', 'tumour'))


def test_a_run_balances_its_classes_and_a_resume_keeps_them(tmp_path, capsys):
  for split, n in (('train', 8), ('test', 4)):
    make_folder(tmp_path / 'data' / split, n=n, rgb_masks=False)  # (gray 0, 100, 200)
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(tmp_path / 'data'),
                          'model.in_channels': 3, 'model.num_classes': 3, 'batch_size': 8,
                          'num_train_steps': 2, 'eval_every_steps': 2,
                          'checkpoint_every_steps': 2, 'num_sample_images': 0,
                          'balanced_class_weights': True})
  wd = str(tmp_path / 'wd')
  train.train_and_evaluate(config, wd)
  pixels = np.concatenate([np.asarray(Image.open(p)).ravel() // 100 for p in
                           sorted((tmp_path / 'data' / 'train' / 'masks').iterdir())])
  want = compute_class_weight('balanced', classes=np.arange(3), y=pixels)
  np.testing.assert_allclose(latest_saved_meta(wd)[1]['config']['class_weights'], want,
                             rtol=1e-12)
  out = capsys.readouterr().out
  assert ('balanced_class_weights: class_weights '
          + ', '.join(f'{w:.6g}' for w in want)
          + ' (from the pixels of each class: '
          + ', '.join(f'{n:,}' for n in np.bincount(pixels))) in out
  # Resumed, it weighs as it began, though the data changed.
  Image.fromarray(np.full((20, 24), 200, np.uint8)).save(
      tmp_path / 'data' / 'train' / 'masks' / 'im00.png')
  config.num_train_steps = 4
  train.train_and_evaluate(config, wd)
  assert f'as {wd}/checkpoints/2 recorded them' in capsys.readouterr().out
  step, meta = latest_saved_meta(wd)
  assert step == 4
  np.testing.assert_allclose(meta['config']['class_weights'], want, rtol=1e-12)


def test_a_binary_run_balances_its_foreground(tmp_path, capsys):
  config = tiny_config(num_train_steps=1, eval_every_steps=1, num_sample_images=0,
                       balanced_class_weights=True)
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  meta = latest_saved_meta(str(tmp_path / 'wd'))[1]
  assert meta['config']['pos_weight'] > 1.5  # (the shapes cover less than the background)
  assert f"balanced_class_weights: pos_weight {meta['config']['pos_weight']:.6g}" in (
      capsys.readouterr().out)

"""`python -m unet_jax.evaluate` on a converted checkpoint scores what the PyTorch model it came
from scores, computed in torch. (That a workdir scores what its run logged is tested with the
runs: tests/test_train.py, tests/test_data_and_checkpoints.py.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TFDS_DIR, move_off_init, nchw, nhwc
from test_train import REPO, _env, tiny_config
from torch_reference import SeedUNet

from unet_jax import input_pipeline
from unet_jax.convert import torch_to_flax
from unet_jax.errors import UserError
from unet_jax.evaluate import evaluate_checkpoint


def _torch_scores(ref, config):
  """Per image Dice, IoU and pixel accuracy of a binary torch UNet on the eval split, meaned."""
  source = input_pipeline.load_sources(config)[1]
  dice, iou, acc = [], [], []
  for i in range(len(source)):
    example = input_pipeline.preprocess(input_pipeline._adapt(config, source[i]),
                                        config.image_size, None, None)
    with torch.no_grad():
      pred = nhwc(ref(nchw(example['image'][None])))[0, ..., 0] > 0
    truth = example['mask'] == 1
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    dice.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    iou.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
    acc.append((pred == truth).mean())
  return {'dice': np.mean(dice), 'iou': np.mean(iou), 'pixel_accuracy': np.mean(acc)}


def test_cli_scores_a_converted_checkpoint_as_torch_does(tmp_path):
  config = tiny_config()
  ref = move_off_init(SeedUNet(1, 1, base=4, depth=1), 1, 1, hw=(16, 16))
  # Its threshold moved to the median logit of some eval images, so that it predicts both
  # classes and the scores are not trivially 0.
  example = input_pipeline.load_sources(config)[1][0]
  x = np.stack([input_pipeline.preprocess(input_pipeline._adapt(config, example), 16, None,
                                          None)['image']])
  with torch.no_grad():
    ref.out_conv.conv.bias -= torch.median(ref(nchw(x)))
  torch.save(ref.state_dict(), tmp_path / 'ref.pth')
  converted = torch_to_flax(str(tmp_path / 'ref.pth'), str(tmp_path / 'converted'))
  with pytest.raises(UserError, match='a converted checkpoint records no dataset; name one with '
                     '--config'):
    evaluate_checkpoint(converted)
  out = subprocess.run(
      [sys.executable, '-m', 'unet_jax.evaluate', '--checkpoint', converted, '--config',
       os.path.join(REPO, 'configs', 'base.py'), '--config.image_size=16',
       f'--config.data.data_dir={TFDS_DIR}'],
      cwd=REPO, env=_env(3), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == f"{converted} on 'synthetic_shapes', split test: 204 images at 16x16"
  got = json.loads(lines[-1])
  want = _torch_scores(ref, config)
  assert 0.05 < want['dice'] < 0.95
  for k, v in want.items():  # (a pixel within float rounding of the threshold may flip)
    assert got[k] == pytest.approx(v, abs=1e-3), k

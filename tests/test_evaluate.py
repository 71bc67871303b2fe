"""`python -m unet_jax.evaluate` on a converted checkpoint scores what the PyTorch model it came
from scores, computed in torch. (That a workdir scores what its run logged is tested with the
runs: tests/test_train.py, tests/test_data_and_checkpoints.py.)"""

import csv
import json
import os
import re
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TFDS_DIR, max_rel_err, move_off_init, nchw, nhwc
from test_predict import (
    _largest_components_by_flood_fill,
    _small_regions_removed_by_flood_fill,
    torch_flip_tta,
)
from test_train import REPO, _env, tiny_config
from torch_reference import SeedUNet

from unet_jax import input_pipeline
from unet_jax.checkpoint import model_from_config
from unet_jax.convert import state_dict_to_flax, torch_to_flax
from unet_jax.ensemble import Ensemble
from unet_jax.errors import UserError
from unet_jax.evaluate import _report, evaluate_checkpoint


def _torch_scores(ref, config, tta=False, surface=False, confusion=None, post=None):
  """Per image Dice, IoU and pixel accuracy of a binary torch UNet on the eval split (`tta`:
  of its mean logits over flips; `surface`: also HD95, ASSD and NSD (at `surface` pixels) by
  MONAI; `confusion`: a 2x2
  array to add [[TN, FP], [FN, TP]] to; `post`: applied to each predicted mask first)."""
  source = input_pipeline.load_sources(config)[1]
  dice, iou, acc, hd95, assd, nsd = [], [], [], [], [], []
  for i in range(len(source)):
    example = input_pipeline.preprocess(input_pipeline._adapt(config, source[i]),
                                        config.image_size, None, None)
    x = nchw(example['image'][None])
    with torch.no_grad():
      pred = nhwc(torch_flip_tta(ref, x) if tta else ref(x))[0, ..., 0] > 0
    if post is not None:
      pred = post(pred.astype(np.int32)) == 1
    truth = example['mask'] == 1
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    dice.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    iou.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
    acc.append((pred == truth).mean())
    if confusion is not None:
      confusion += [[(~truth & ~pred).sum(), (~truth & pred).sum()],
                    [(truth & ~pred).sum(), (truth & pred).sum()]]
    if surface:
      hd95.append(_monai_surface(pred, truth)[0])
      assd.append(_monai_surface(pred, truth)[1])
      nsd.append(_monai_nsd(pred, truth, surface))
  scores = {'dice': np.array(dice), 'iou': np.array(iou), 'pixel_accuracy': np.array(acc)}
  return scores | ({'hd95': np.array(hd95), 'assd': np.array(assd), 'nsd': np.array(nsd)}
                   if surface else {})


def _monai_nsd(pred, truth, tolerance):
  """MONAI's normalised surface Dice of one image's boolean masks (0 where one is empty, NaN
  where both are, as MONAI gives them)."""
  import warnings

  from monai.metrics import compute_surface_dice
  p, t = (torch.tensor(np.asarray(m))[None, None] for m in (pred, truth))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # (MONAI's about empty masks)
    return float(compute_surface_dice(p, t, [tolerance], include_background=True))


def _monai_surface(pred, truth):
  """MONAI's HD95 and ASSD of one image's boolean masks; where it gives NaN or infinity (one
  mask or both empty), unet_jax's convention: NaN for both, the diagonal for one."""
  from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
  if not pred.any() or not truth.any():
    return (np.nan,) * 2 if pred.any() == truth.any() else (np.hypot(*truth.shape),) * 2
  p, t = (torch.tensor(np.asarray(m))[None, None] for m in (pred, truth))
  return (float(compute_hausdorff_distance(p, t, include_background=True, percentile=95)),
          float(compute_average_surface_distance(p, t, include_background=True,
                                                 symmetric=True)))


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
  # Names for other classes than the checkpoint's are refused before any compute.
  named = tiny_config(**{'data.class_names': ('background', 'car', 'person')})
  named.model.num_classes = 3  # (the config's model is not the checkpoint's)
  with pytest.raises(UserError, match=re.escape(
      "data.class_names names 3 class(es) but there are 2 (the checkpoint's model has 1 "
      'output class(es)); name each class once, in class-id order')):
    evaluate_checkpoint(converted, named)
  # On 3 devices: the eval batch (16) rounded up to 18, the last one padded.
  csv_path = tmp_path / 'scores.csv'
  out = subprocess.run(
      [sys.executable, '-m', 'unet_jax.evaluate', '--checkpoint', converted, '--config',
       os.path.join(REPO, 'configs', 'base.py'), '--config.image_size=16',
       f'--config.data.data_dir={TFDS_DIR}', '--per_image', str(csv_path)],
      cwd=REPO, env=_env(3), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == f"{converted} on 'synthetic_shapes', split test: 204 images at 16x16"
  assert lines[-1] == f'per-image scores: {csv_path} (204 rows)'
  got = json.loads(lines[-2])
  want = _torch_scores(ref, config)
  assert 0.05 < want['dice'].mean() < 0.95
  for k, v in want.items():  # (a pixel within float rounding of the threshold may flip)
    assert got[k] == pytest.approx(v.mean(), abs=1e-3), k
  # The CSV: each image's scores, in the split's order, as torch computes them.
  umask = os.umask(0o022)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(csv_path).st_mode) == 0o666 & ~umask  # (not mkstemp's 0600)
  with open(csv_path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert [int(r['index']) for r in rows] == list(range(204))
  assert {r['split'] for r in rows} == {'test'} and {r['file_name'] for r in rows} == {''}
  for k, v in want.items():
    per_image = np.array([float(r[k]) for r in rows])
    assert np.mean(np.abs(per_image - v) < 1e-6) > 0.97, k  # (the rare flipped pixel)
    assert per_image.mean() == pytest.approx(got[k], abs=1e-6), k
  # With flip TTA (here in-process, on 8 devices), the scores of torch's mean logits over flips,
  # and their boundary distances as MONAI computes them.
  got = evaluate_checkpoint(converted, config, tta=True, per_image=True, surface=True,
                            confusion=True, nsd_tolerance=1.5)
  want_confusion = np.zeros((2, 2), np.int64)
  want_tta = _torch_scores(ref, config, tta=True, surface=1.5, confusion=want_confusion)
  assert got['nsd_tolerance'] == 1.5 and 0.1 < got['nsd'] < 0.99
  # The confusion matrix, rows the true class: torch's counts (a rare pixel may flip).
  assert np.abs(np.asarray(got['confusion']) - want_confusion).sum() <= 0.001 * 204 * 16 * 16
  assert want_confusion[0, 1] != want_confusion[1, 0]  # (so that rows and columns tell apart)
  assert got['tta'] and abs(got['dice'] - want['dice'].mean()) > 2e-3  # (another prediction)
  for k, v in want_tta.items():
    assert got[k] == pytest.approx(np.nanmean(v), rel=1e-2, abs=1e-3), k
  for k in ('hd95', 'assd', 'nsd'):
    per_image = np.array([np.nan if r[k] is None else r[k] for r in got['per_image']])
    assert np.mean(np.isclose(per_image, want_tta[k], rtol=1e-6, equal_nan=True)) > 0.97, k
  assert 1 < got['hd95'] < np.hypot(16, 16)  # (not the empty masks' diagonal throughout)
  # Post-processed as predict --largest_component: torch's masks reduced by a flood fill.
  got = evaluate_checkpoint(converted, config, per_image=True, largest_component=True)
  want_post = _torch_scores(ref, config, post=_largest_components_by_flood_fill)
  assert got['largest_component'] and abs(got['dice'] - want['dice'].mean()) > 2e-3
  for k, v in want_post.items():
    assert got[k] == pytest.approx(v.mean(), abs=1e-3), k
    per_image = np.array([r[k] for r in got['per_image']])
    assert np.mean(np.abs(per_image - v) < 1e-6) > 0.97, k
  # As predict --min_region_size 5: torch's masks, their 4-connected specks removed.
  got = evaluate_checkpoint(converted, config, per_image=True, min_region_size=5)
  want_small = _torch_scores(ref, config,
                             post=lambda m: _small_regions_removed_by_flood_fill(m, 5))
  assert got['min_region_size'] == 5 and not got['largest_component']
  assert abs(got['dice'] - want['dice'].mean()) > 2e-3
  assert abs(got['dice'] - want_post['dice'].mean()) > 2e-3
  for k, v in want_small.items():
    assert got[k] == pytest.approx(v.mean(), abs=1e-3), k
    per_image = np.array([r[k] for r in got['per_image']])
    assert np.mean(np.abs(per_image - v) < 1e-6) > 0.97, k
  assert (_report([converted], got).split('\n')[0]
          == f'{converted} on \'synthetic_shapes\', split test: 204 images at 16x16, regions '
          'under 5 pixels removed')


@pytest.mark.parametrize('classes', [1, 3])
def test_ensemble_gives_the_log_of_torchs_mean_probabilities(classes):
  # Members of other widths, depths and confidence (one's logits scaled up, one's down), where
  # the mean of probabilities and the mean of logits part ways.
  x = torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(0))
  refs, members, variables = [], [], []
  for k, (base, depth, scale) in enumerate(((4, 1, 1.0), (8, 1, 8.0), (4, 2, 0.2))):
    ref = move_off_init(SeedUNet(1, classes, base=base, depth=depth), 1, classes, seed=k).eval()
    with torch.no_grad():
      ref.out_conv.conv.weight *= scale
      ref.out_conv.conv.bias *= scale
    refs.append(ref)
    config, v, _ = state_dict_to_flax({k: t.detach().numpy().copy()
                                       for k, t in ref.state_dict().items()})
    members.append(model_from_config(config)), variables.append(v)
  with torch.no_grad():
    act = torch.sigmoid if classes == 1 else (lambda t: torch.softmax(t, 1))
    mean = torch.stack([act(r(x)) for r in refs]).mean(0)
  want = nhwc(torch.logit(mean) if classes == 1 else torch.log(mean))
  got = np.asarray(Ensemble(tuple(members)).apply(variables, jnp.asarray(nhwc(x))))
  assert max_rel_err(got, want) <= 1e-4
  mean_logits = nhwc(torch.stack([r(x) for r in refs]).mean(0).detach())
  assert max_rel_err(got, mean_logits) > 1e-2  # (not the mean of the logits)
  with pytest.raises(ValueError, match='for evaluation and prediction only'):
    Ensemble(tuple(members)).apply(variables, jnp.asarray(nhwc(x)), train=True)


class _TorchEnsemble:
  """The logit of the mean sigmoid of binary torch UNets (`tta`: each its mean over flips)."""

  def __init__(self, refs, tta=False):
    self.refs, self.tta = refs, tta

  def __call__(self, x):
    probs = [torch.sigmoid(torch_flip_tta(r, x) if self.tta else r(x)) for r in self.refs]
    return torch.logit(torch.stack(probs).mean(0))


def test_cli_scores_an_ensemble_as_torch_does(tmp_path):
  config = tiny_config()
  example = input_pipeline.load_sources(config)[1][0]
  x = nchw(np.stack([input_pipeline.preprocess(input_pipeline._adapt(config, example), 16, None,
                                               None)['image']]))
  refs, paths = [], []
  for k, (base, depth) in enumerate(((4, 1), (8, 1), (4, 2))):
    ref = move_off_init(SeedUNet(1, 1, base=base, depth=depth), 1, 1, hw=(16, 16), seed=k)
    with torch.no_grad():  # (each predicting both classes, as in the test above)
      ref.out_conv.conv.bias -= torch.median(ref(x))
    torch.save(ref.state_dict(), tmp_path / f'ref{k}.pth')
    refs.append(ref.eval())
    paths.append(torch_to_flax(str(tmp_path / f'ref{k}.pth'), str(tmp_path / f'converted{k}')))
  # A config of one's own, in one's own folder, built on the project's (as configs/ build on
  # base.py): its import works from there too.
  (tmp_path / 'my_config.py').write_text(
      'from configs import base\n\n\ndef get_config():\n  config = base.get_config()\n'
      '  config.image_size = 16\n  return config\n')
  out = subprocess.run(
      [sys.executable, '-m', 'unet_jax.evaluate', *[a for p in paths for a in ('--checkpoint', p)],
       '--config', 'my_config.py', f'--config.data.data_dir={TFDS_DIR}'],
      cwd=tmp_path, env=_env(3), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == ("the mean probabilities of 3 checkpoints on 'synthetic_shapes', split "
                      'test: 204 images at 16x16')
  got = json.loads(lines[-1])
  assert got['step'] == [None, None, None]
  want = _torch_scores(_TorchEnsemble(refs), config)
  members = [_torch_scores(r, config)['dice'].mean() for r in refs]
  assert all(abs(want['dice'].mean() - m) > 2e-3 for m in members)  # (none of them alone)
  for k, v in want.items():  # (a pixel within float rounding of the threshold may flip)
    assert got[k] == pytest.approx(v.mean(), abs=1e-3), k
  # With TTA (each member's mean logits over flips first), per image, on 8 devices.
  got = evaluate_checkpoint(paths, config, tta=True, per_image=True)
  want = _torch_scores(_TorchEnsemble(refs, tta=True), config)
  for k, v in want.items():
    per_image = np.array([r[k] for r in got['per_image']])
    assert np.mean(np.abs(per_image - v) < 1e-6) > 0.97, k


def test_cli_per_image_destination_is_checked_before_compute(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'unet_jax.evaluate', '--checkpoint', str(tmp_path / 'nowhere'),
       '--per_image', str(tmp_path / 'no' / 'scores.csv')],
      cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
  assert out.returncode == 2
  assert out.stderr.strip() == (f'error: --per_image {tmp_path}/no/scores.csv: no such folder '
                                f'{tmp_path}/no; create it or choose another path')
  assert not os.listdir(tmp_path)
  # So is the post-processing's size, before any checkpoint is read.
  out = subprocess.run(
      [sys.executable, '-m', 'unet_jax.evaluate', '--checkpoint', str(tmp_path / 'nowhere'),
       '--min_region_size=-3'], cwd=REPO, env=_env(1), capture_output=True, text=True,
      timeout=600)
  assert (out.returncode, out.stderr) == (2, 'error: min_region_size=-3 must be at least 0 (0: '
                                             'keep regions of any size)\n')

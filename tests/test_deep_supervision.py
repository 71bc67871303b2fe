"""model.deep_supervision: nnU-Net's deep supervision, against a PyTorch reference of its decoder
(a head on every decoder level, the coarsest weighed 0) and of its loss (DeepSupervisionWrapper
over the labels downsampled by torch's nearest-exact interpolation), float32.

Tolerances: losses to 1e-5 relative; gradients within 1e-4 of each tensor's scale.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel_err, nchw, nhwc
from test_train import _run_steps, tiny_config
from torch_reference import DeepSupervisedSeedUNet, SeedUNet, nnunet_deep_supervision_loss

from unet_jax import UNet, losses, train
from unet_jax.checkpoint import load_pretrained_with_metadata, model_config
from unet_jax.convert import flax_to_state_dict, flax_to_torch, torch_to_flax
from unet_jax.deep_supervision import (
  deep_supervision_loss,
  loss_weights,
  nearest_exact_indices,
)
from unet_jax.errors import UserError
from unet_jax.evaluate import evaluate_checkpoint
from unet_jax.export import export_checkpoint
from unet_jax.model import init_variables

GRAD_TOL = 1e-4


def torch_segmentation_loss(logits, target):
  """This project's default loss: cross-entropy + 1 - the soft Dice per image and class,
  background included, smoothed by 1."""
  p = torch.softmax(logits, 1)
  t = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
  dice = (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)
  return F.cross_entropy(logits, target) + 1 - dice.mean()


def _torch_twin(model, variables):
  """The reference with the Flax model's weights (its extra coarsest head, weighed 0, as
  drawn)."""
  ref = DeepSupervisedSeedUNet(model.in_channels, model.num_classes, model.base_features,
                               model.depth)
  state = {k: torch.tensor(v) for k, v in flax_to_state_dict(
      model_config(model), variables, 'seed').items()}
  for k in range(2, model.depth):
    conv = variables['params'][f'ds_out{k}']['conv']
    state[f'ds_out{k}.conv.weight'] = torch.tensor(
        np.asarray(conv['kernel'])[0, 0].T[:, :, None, None].copy())
    state[f'ds_out{k}.conv.bias'] = torch.tensor(np.asarray(conv['bias']))
  missing, unexpected = ref.load_state_dict(state, strict=False)
  assert sorted(missing) == ['ds_out1.conv.bias', 'ds_out1.conv.weight'] and not unexpected
  return ref.train()


def test_loss_and_gradient_match_nnunets_deep_supervision_in_torch():
  model = UNet(2, 3, base_features=4, depth=4, deep_supervision=True)
  variables = init_variables(model, jax.random.key(3))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 32, 48, 2)).astype(np.float32)
  labels = rng.integers(0, 3, (4, 32, 48))
  labels[:, 8:20, 10:30] = 2  # (regions, so that the coarse labels are not all noise)
  ref = _torch_twin(model, variables)
  torch_outputs = ref(nchw(x))
  want = nnunet_deep_supervision_loss(torch_outputs, torch.tensor(labels),
                                      torch_segmentation_loss)
  want.backward()

  def loss_fn(params):
    outputs, _ = model.apply({**variables, 'params': params}, jnp.asarray(x), train=True,
                             all_scales=True, mutable=['batch_stats'])
    return deep_supervision_loss(outputs, jnp.asarray(labels), lambda lg, lb: (
        losses.segmentation_loss(lg, lb, dice_weight=1.0)))[0], outputs

  (got, outputs), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  assert [o.shape[1:3] for o in outputs] == [(32, 48), (16, 24), (8, 12)]
  for ours, theirs in zip(outputs, torch_outputs, strict=False):  # (theirs: 1 more, 4x6)
    assert max_rel_err(ours, nhwc(theirs.detach())) <= 1e-4
  assert abs(float(got) - want.item()) <= 1e-5 * abs(want.item())
  # Every gradient, the heads' included; the coarsest head's, weighed 0, gets none.
  named = dict(ref.named_parameters())
  flat = flax_to_state_dict(model_config(model), {**variables, 'params': grads}, 'seed')
  for k in range(2, model.depth):
    conv = grads[f'ds_out{k}']['conv']
    flat[f'ds_out{k}.conv.weight'] = np.asarray(conv['kernel'])[0, 0].T[:, :, None, None]
    flat[f'ds_out{k}.conv.bias'] = np.asarray(conv['bias'])
  assert named['ds_out1.conv.weight'].grad is None
  compared = 0
  for name, p in named.items():
    if name.startswith('ds_out1.'):
      continue
    assert max_rel_err(flat[name], p.grad.numpy()) <= GRAD_TOL, name
    compared += 1
  assert compared == len(named) - 2
  # The heads do move the loss: the full size's alone differs.
  alone = torch_segmentation_loss(torch_outputs[0], torch.tensor(labels)).item()
  assert abs(alone - want.item()) > 1e-3


def test_labels_are_downsampled_as_torchs_nearest_exact():
  for size, out in ((32, 16), (32, 8), (48, 6), (37, 18), (45, 11), (7, 7)):
    source = torch.arange(size, dtype=torch.float32)[None, None]
    want = F.interpolate(source, size=out, mode='nearest-exact')[0, 0].long().numpy()
    np.testing.assert_array_equal(nearest_exact_indices(size, out), want)
  assert loss_weights(3) == (4 / 7, 2 / 7, 1 / 7)


def test_the_train_step_takes_the_deep_supervision_loss_on_eight_devices():
  config = tiny_config(**{'model.depth': 4, 'model.num_classes': 3,
                          'model.deep_supervision': True, 'image_size': 32})
  rng = np.random.default_rng(1)
  batch = {'image': rng.random((16, 32, 32, 1), np.float32),
           'mask': rng.integers(0, 3, (16, 32, 32)).astype(np.int32)}
  batch['mask'][:, 4:20, 6:26] = 1
  metrics = _run_steps(config, jax.devices(), 'shard_map', [batch])[2][0]
  model = train.build_model(config, None)
  variables = init_variables(model, jax.random.key(config.seed))
  ref = _torch_twin(model, variables)
  outputs = ref(nchw(batch['image']))
  want = nnunet_deep_supervision_loss(outputs, torch.tensor(batch['mask'], dtype=torch.long),
                                      torch_segmentation_loss)
  np.testing.assert_allclose(metrics['loss'], want.item(), rtol=1e-5)
  # ce_loss and dice_loss are the full size's
  full = torch_segmentation_loss(outputs[0], torch.tensor(batch['mask'], dtype=torch.long))
  np.testing.assert_allclose(metrics['ce_loss'] + metrics['dice_loss'], full.item(), rtol=1e-5)


def test_a_run_trains_evaluates_converts_and_starts_others(tmp_path, capsys):
  def config(**more):
    return tiny_config(**{'model.depth': 3, 'model.num_classes': 1, 'num_train_steps': 2,
                          'eval_every_steps': 2, 'checkpoint_every_steps': 2, **more})

  wd = str(tmp_path / 'ds')
  metrics = train.train_and_evaluate(config(**{'model.deep_supervision': True}), wd)
  assert '(base_features=4, depth=3, 1 output channel(s), deep supervision) | ' in (
      capsys.readouterr().out)
  model, variables, _ = load_pretrained_with_metadata(wd)
  assert model_config(model)['deep_supervision'] is True
  assert {'ds_out2', 'out_conv'} <= set(variables['params']) and 'ds_out1' not in variables[
      'params']
  # Evaluation, and export's artifact, are the full-size output's, as the run's.
  assert evaluate_checkpoint(wd)['dice'] == metrics['dice']
  x = np.random.default_rng(2).random((2, 16, 16, 1), np.float32)
  full = np.asarray(model.apply(variables, jnp.asarray(x), train=False))
  served = jax.export.deserialize(export_checkpoint(wd)[0]).call(x)
  np.testing.assert_allclose(np.asarray(served), full, atol=1e-5)
  # flax-to-torch writes the network predict uses: a strict load into the seed's class.
  capsys.readouterr()
  flax_to_torch(wd, str(tmp_path / 'ds.pth'))
  assert capsys.readouterr().err.strip() == (
      f'note: {wd}: its deep supervision heads (ds_out2) are for training only and left out')
  seed = SeedUNet(1, 1, base=4, depth=3)
  seed.load_state_dict(torch.load(tmp_path / 'ds.pth', weights_only=True))
  np.testing.assert_allclose(nhwc(seed.eval()(nchw(x)).detach()), full, atol=1e-5)
  # A file with such heads (nnU-Net's decoder written in the seed's names) is refused, saying so.
  torch.save(DeepSupervisedSeedUNet(1, 1, base=4, depth=3).state_dict(), tmp_path / 'heads.pth')
  with pytest.raises(UserError, match=re.escape(
      f"{tmp_path}/heads.pth: unexpected key 'ds_out1.conv.weight' for a seed-layout UNet of "
      'depth 3, upsample=transpose (deep supervision heads are for training only: leave them '
      'out of the file, and convert the network without them)')):
    torch_to_flax(str(tmp_path / 'heads.pth'), str(tmp_path / 'heads'))
  assert not (tmp_path / 'heads').exists()
  # Resuming with it switched is refused by name.
  with pytest.raises(UserError, match=re.escape(
      f'{wd}/checkpoints/2 was saved by a run with model.deep_supervision=True, this config '
      'has model.deep_supervision=False;')):
    train.train_and_evaluate(config(num_train_steps=4), wd)
  # init_from: a plain run takes its weights without the heads, a deep-supervised one from a
  # plain run's draws its heads.
  train.train_and_evaluate(config(init_from=wd), str(tmp_path / 'plain'))
  plain_model, plain, _ = load_pretrained_with_metadata(str(tmp_path / 'plain'))
  assert 'deep_supervision' not in model_config(plain_model) and 'ds_out2' not in plain['params']
  train.train_and_evaluate(config(**{'model.deep_supervision': True,
                                     'init_from': str(tmp_path / 'plain')}),
                           str(tmp_path / 'again'))
  _, again, _ = load_pretrained_with_metadata(str(tmp_path / 'again'))
  assert 'ds_out2' in again['params']
  assert os.path.isdir(tmp_path / 'again' / 'checkpoints')


def test_a_checkpoint_from_before_the_field_resumes_as_a_plain_run():
  # (its saved model config has no deep_supervision: it means False)
  config = tiny_config(**{'model.depth': 3})
  saved = {'model': model_config(UNet(base_features=4, depth=3))}
  assert 'deep_supervision' not in saved['model']
  train.check_resumable(saved, config, train.build_model(config, None), None, 'old/2')
  config.model.deep_supervision = True
  with pytest.raises(UserError, match=re.escape(
      'old/2 was saved by a run with model.deep_supervision=False, this config has '
      'model.deep_supervision=True;')):
    train.check_resumable(saved, config, train.build_model(config, None), None, 'old/2')


def test_refusals():
  with pytest.raises(UserError, match=re.escape(
      'model.deep_supervision=True needs model.depth of at least 3 (its heads are on the '
      'decoder levels between the bottom and the top), got 2; raise model.depth, or leave '
      'deep_supervision off')):
    train.train_and_evaluate(tiny_config(**{'model.depth': 2, 'model.deep_supervision': True}),
                             '/nonexistent/never')
  x = jnp.zeros((1, 16, 16, 1))
  with pytest.raises(ValueError, match='all_scales=True needs a UNet built with '
                     'deep_supervision=True'):
    UNet(base_features=4, depth=3).init(jax.random.key(0), x, train=True, all_scales=True)


def test_the_pytorch_benchmark_runs_both_sides_with_deep_supervision():
  import json
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, 'benchmarks/compare_pytorch.py', '--size', '32',
                        '--batch', '2', '--base_features', '4', '--steps', '1', '--repeats', '1',
                        '--sides', 'torch,jax_project', '--deep_supervision'], cwd=repo,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  line = json.loads(run.stdout.splitlines()[-1])
  assert line['deep_supervision'] is True and set(line['results']) == {'torch', 'jax_project'}
  assert "nnU-Net's deep supervision (every side)" in run.stdout
  refused = subprocess.run([sys.executable, 'benchmarks/compare_pytorch.py',
                            '--deep_supervision'], cwd=repo, capture_output=True, text=True)
  assert refused.returncode == 1 and refused.stderr.strip() == (
      '--deep_supervision: the jax_plain side has no deep supervision; leave it out '
      '(--sides torch,jax_project)')


def test_remat_keeps_the_deep_supervision_step():
  # (remat recomputes the decoder levels the heads read, as one piece below full resolution)
  rng = np.random.default_rng(4)
  batches = [{'image': rng.random((16, 32, 32, 1), np.float32),
              'mask': (rng.random((16, 32, 32)) > 0.6).astype(np.int32)} for _ in range(2)]
  runs = {}
  for remat in (False, True):
    config = tiny_config(**{'model.depth': 4, 'model.deep_supervision': True,
                            'image_size': 32, 'model.remat': remat})
    runs[remat] = _run_steps(config, jax.devices(), 'shard_map', batches)
  assert 'ds_out2' in runs[False][0] and 'ds_out3' in runs[False][0]
  for a, b in zip(jax.tree.leaves(runs[True]), jax.tree.leaves(runs[False]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

"""Flax vs the independent PyTorch reference, float32, through the real conversion path.

Tolerances: outputs within 1e-4 of the output scale (max |flax - torch| / max |torch|); after one
SGD step every parameter within 1e-4 of its tensor's scale.
"""

import copy
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err, move_off_init, nhwc
from torch_reference import MilesialUNet, SeedUNet

import unet_jax.convert
from unet_jax import load_pretrained
from unet_jax.checkpoint import model_from_config
from unet_jax.convert import state_dict_to_flax, torch_to_flax
from unet_jax.state_dict_io import write_state_dict

OUTPUT_TOL = 1e-4
PARAM_TOL = 1e-4

# (id, reference factory, in_channels, num_classes, (H, W) evaluated, file suffix)
CASES = [
    ('seed-1to1', lambda: SeedUNet(1, 1, base=8, depth=4), 1, 1, (32, 48), '.pth'),
    ('seed-3to2', lambda: SeedUNet(3, 2, base=8, depth=3), 3, 2, (64, 40), '.safetensors'),
    ('milesial-transpose-odd', lambda: MilesialUNet(3, 2, base=8), 3, 2, (37, 45), '.pth'),
    ('milesial-bilinear-odd', lambda: MilesialUNet(1, 3, bilinear=True, base=8), 1, 3, (37, 45),
     '.safetensors'),
    ('milesial-bilinear-bias', lambda: MilesialUNet(2, 1, bilinear=True, base=8, depth=3,
                                                    bias=True), 2, 1, (45, 37), '.pth'),
    ('milesial-transpose-bias-odd', lambda: MilesialUNet(1, 2, base=8, depth=3, bias=True), 1, 2,
     (33, 50), '.safetensors'),
    ('seed-full-size', lambda: SeedUNet(), 1, 1, (32, 32), '.pth'),
]


def _state_dict_np(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _convert_via_file(model, suffix, tmp_path):
  src = os.path.join(tmp_path, 'ref' + suffix)
  write_state_dict(src, _state_dict_np(model), {})
  dest = os.path.join(tmp_path, 'converted')
  torch_to_flax(src, dest)
  return load_pretrained(dest)


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_eval_parity_through_files(case, tmp_path):
  _, make, cin, ncls, hw, suffix = case
  ref = move_off_init(make(), cin, ncls)
  assert not torch.allclose(ref.state_dict()[next(k for k in ref.state_dict()
                                                   if 'running_var' in k)], torch.ones(1))
  model, variables = _convert_via_file(ref, suffix, tmp_path)
  assert (model.in_channels, model.num_classes) == (cin, ncls)
  x = torch.randn(3, cin, *hw)
  with torch.no_grad():
    want = ref.eval()(x)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(x))
  assert max_rel_err(got, nhwc(want)) <= OUTPUT_TOL


def test_parity_catches_an_unflipped_transposed_conv_kernel(tmp_path, monkeypatch):
  real = unet_jax.convert.to_flax

  def unflipped(kind, w):
    if kind == 'conv_transpose':
      return np.transpose(w, (2, 3, 0, 1))
    return real(kind, w)

  monkeypatch.setattr(unet_jax.convert, 'to_flax', unflipped)
  ref = move_off_init(SeedUNet(1, 1, base=8, depth=3), 1, 1)
  model, variables = _convert_via_file(ref, '.pth', tmp_path)
  x = torch.randn(2, 1, 32, 32)
  with torch.no_grad():
    want = ref.eval()(x)
  got = model.apply(variables, nhwc(x), train=False)
  assert max_rel_err(got, nhwc(want)) > 100 * OUTPUT_TOL


TRAIN_CASES = [
    ('seed', lambda: SeedUNet(2, 1, base=8, depth=3), 2, 1, (32, 32)),
    ('milesial-bilinear-odd', lambda: MilesialUNet(1, 2, bilinear=True, base=8, depth=3), 1, 2,
     (29, 35)),
    ('milesial-transpose-odd', lambda: MilesialUNet(3, 1, base=8, depth=3), 3, 1, (35, 29)),
]


def _bce(logits, target):
  return jnp.mean(jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits))))


@pytest.mark.parametrize('case', TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_mode_forward_and_one_sgd_step(case):
  _, make, cin, ncls, hw = case
  ref = move_off_init(make(), cin, ncls)
  config, variables, _ = state_dict_to_flax(_state_dict_np(ref))
  model = model_from_config(config)
  x = torch.randn(4, cin, *hw) * 1.5 + 0.3
  target = (torch.rand(4, ncls, *hw) > 0.5).float()

  # One train-mode forward: same output, same updated running statistics.
  stepped = copy.deepcopy(ref).train()
  out = stepped(x)
  # Jitted: one compilation of the whole network (eager, every op compiles on its own: 3x
  # the time).
  train_apply = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  got, updates = train_apply(variables, nhwc(x))
  assert max_rel_err(got, nhwc(out.detach())) <= OUTPUT_TOL
  _, torch_after_forward, _ = state_dict_to_flax(_state_dict_np(stepped))
  have_stats = dict(jax.tree_util.tree_leaves_with_path(updates['batch_stats']))
  for path, want in jax.tree_util.tree_leaves_with_path(torch_after_forward['batch_stats']):
    assert max_rel_err(have_stats[path], want) <= OUTPUT_TOL, jax.tree_util.keystr(path)

  # One SGD step from the same weights: same new weights.
  lr = 0.1
  loss = torch.nn.functional.binary_cross_entropy_with_logits(out, target)
  torch.optim.SGD(stepped.parameters(), lr=lr).zero_grad()
  loss.backward()
  with torch.no_grad():
    for p in stepped.parameters():
      p -= lr * p.grad
  _, torch_new, _ = state_dict_to_flax(_state_dict_np(stepped))

  def loss_fn(params):
    logits, _ = model.apply({**variables, 'params': params}, nhwc(x), train=True,
                            mutable=['batch_stats'])
    return _bce(logits, jnp.asarray(nhwc(target)))

  jax_loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  assert abs(float(jax_loss) - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
  new_params = jax.tree.map(lambda p, g: p - lr * g, variables['params'], grads)
  flat_new = dict(jax.tree_util.tree_leaves_with_path(new_params))
  flat_old = dict(jax.tree_util.tree_leaves_with_path(variables['params']))
  moved = 0
  for path, want in jax.tree_util.tree_leaves_with_path(torch_new['params']):
    have = np.asarray(flat_new[path])
    assert max_rel_err(have, want) <= PARAM_TOL, jax.tree_util.keystr(path)
    moved += not np.array_equal(np.asarray(flat_old[path]), want)
  assert moved > 0  # the step did change the weights, so the comparison means something

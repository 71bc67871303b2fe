"""config.freeze against torch's requires_grad_(False) (and freeze_batch_norm against its
module.eval()): the same weights and BatchNorm statistics after steps of Adam (SGD) with weight
decay and gradient clipping, 8 devices as 1, a resumed run, and the refusals."""

import copy
import functools
import re

import jax
import numpy as np
import optax
import pytest
import torch
from conftest import max_rel_err, move_off_init, nchw
from test_train import _max_rel, _random_batches, tiny_config
from torch_reference import SeedUNet

from unet_jax import config_checks, load_pretrained, optimizers, parallel, train
from unet_jax.convert import state_dict_to_flax
from unet_jax.errors import UserError
from unet_jax.freezing import (
  frozen_by_config,
  frozen_modules,
  masked_optimizer,
  module_names,
  split,
)
from unet_jax.model import init_variables
from unet_jax.optimizers import clip_grad_norm, learning_rate_schedule

RTOL = 1e-4  # relative to each tensor's scale, after three Adam steps (its small biases: 2e-5)


def _torch_loss(net, batch):
  """The train step's loss for one output channel: BCE + (1 - soft Dice per image, smoothed by
  1 pixel)."""
  logits = net(nchw(batch['image']))
  target = torch.tensor(batch['mask'][:, None], dtype=torch.float32)
  probs = torch.sigmoid(logits)
  inter, denom = (probs * target).sum((2, 3)), (probs + target).sum((2, 3))
  dice = 1 - ((2 * inter + 1) / (denom + 1)).mean()
  return torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + dice


def _assert_close(got, want):
  """Every array of `want` (torch's, converted) matches `got`'s to RTOL of its scale."""
  for path, x in jax.tree_util.tree_leaves_with_path(want):
    value = got
    for key in path:
      value = value[key.key]
    assert max_rel_err(value, x) <= RTOL, jax.tree_util.keystr(path)


def _torch_run(ref, batches, frozen, clip, eval_norms=False, optimizer='adam'):
  """torch's loop: the frozen modules' parameters requires_grad_(False), every parameter given
  to the optimizer (it skips those without a gradient, their weight decay too) and to
  clip_grad_norm_
  (which leaves them out of the norm); `eval_norms`: the frozen modules in eval mode too."""
  net = copy.deepcopy(ref).train()
  for name in frozen:
    getattr(net, name).requires_grad_(False)
    if eval_norms:
      getattr(net, name).eval()
  opt = (torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=0.1) if optimizer == 'adam'
         else torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1))
  for batch in batches:
    opt.zero_grad()
    _torch_loss(net, batch).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()
  return state_dict_to_flax({k: v.detach().numpy().copy() for k, v in net.state_dict().items()})[1]


def _jax_run(config, initial, batches, devices):
  mesh = parallel.make_mesh(devices)
  model = train.build_model(config, parallel.AXIS)
  state = train.create_train_state(config, model, mesh, initial)
  step = parallel.distribute(functools.partial(
      train.train_step, model=model, dice_weight=1.0, frozen=frozen_by_config(config)), mesh,
      'shard_map')
  for batch in batches:
    state, _ = step(state, batch)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                      {'params': state.params, 'batch_stats': state.batch_stats})


# (SGD with eval_norms: there some of up1's weights get gradients at rounding-noise level, which
# Adam's normalisation turns into steps of ~lr that differ by a few percent between frameworks)
@pytest.mark.parametrize('freeze,eval_norms,optimizer', [
    (('encoder',), False, 'adam'), (('down2', 'out_conv'), False, 'adam'),
    (('encoder',), True, 'sgd')])
def test_frozen_modules_train_as_torch_requires_grad_false(freeze, eval_norms, optimizer):
  ref = move_off_init(SeedUNet(1, 1, base=4, depth=2), 1, 1, hw=(16, 16))
  model_fields, initial, _ = state_dict_to_flax(
      {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()})
  clip = 0.05  # (below the gradients' norm: clipping scales every step)
  config = tiny_config(**{'model.depth': 2}, freeze=freeze, optimizer=optimizer,
                       weight_decay=0.1, grad_clip_norm=clip, schedule='constant',
                       learning_rate=1e-2, freeze_batch_norm=eval_norms)
  config.model.update(model_fields)
  batches = _random_batches(3, seed=4)
  frozen = frozen_modules(freeze, module_names(2))
  want = _torch_run(ref, batches, frozen, clip, eval_norms, optimizer)
  # (freezing changes what trains, and eval mode how the frozen modules normalise: the run
  # without either is far outside the tolerance)
  assert _max_rel(_torch_run(ref, batches, (), clip, optimizer=optimizer), want) > 1e-3
  if eval_norms:
    assert _max_rel(_torch_run(ref, batches, frozen, clip, optimizer=optimizer), want) > 1e-3

  got = _jax_run(config, initial, batches, jax.devices()[:1])
  _assert_close(got, want)
  for name in frozen:  # left exactly as they were; their BatchNorm statistics moved, unless
    # in eval mode
    for a, b in zip(jax.tree.leaves(got['params'][name]),
                    jax.tree.leaves(initial['params'][name]), strict=True):
      np.testing.assert_array_equal(a, b)
    if name in initial['batch_stats']:
      moved = _max_rel(got['batch_stats'][name], initial['batch_stats'][name])
      assert moved == 0 if eval_norms else moved > 1e-3
  assert _max_rel(_jax_run(config, initial, batches, jax.devices()), got) <= 1e-5  # 8 as 1


def test_module_names_and_groups():
  names = module_names(3, deep_supervision=True)
  assert names == ['in_conv', 'down1', 'down2', 'down3', 'up1', 'up2', 'up3', 'out_conv',
                   'ds_out2']
  assert frozen_modules(('encoder',), names) == ('in_conv', 'down1', 'down2', 'down3')
  assert frozen_modules(('decoder', 'down3'), names) == ('down3', 'up1', 'up2', 'up3',
                                                          'ds_out2')
  with pytest.raises(UserError, match=re.escape(
      "freeze=('inc',): no module 'inc' in this UNet; name encoder, decoder or modules of "
      'in_conv, down1, down2, down3, up1, up2, up3, out_conv, ds_out2')):
    frozen_modules(('inc',), names)
  with pytest.raises(UserError, match=re.escape(
      "freeze=('encoder', 'decoder', 'out_conv') freezes every module: nothing would train")):
    frozen_modules(('encoder', 'decoder', 'out_conv'), names)
  with pytest.raises(UserError, match=re.escape(
      'freeze_batch_norm=True keeps the BatchNorms of the frozen modules in evaluation mode, '
      'but freeze names none; set --config.freeze (e.g. encoder), or leave freeze_batch_norm '
      'off')):
    config_checks.validate_config(tiny_config(freeze_batch_norm=True),
                                  parallel.make_mesh(jax.devices()[:1]))


def test_a_frozen_run_through_the_loop_resumes_and_refuses_unfreezing(tmp_path, capsys):
  workdir = str(tmp_path / 'wd')
  config = tiny_config(**{'model.depth': 2}, freeze=('encoder,out_conv',), num_train_steps=3)
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert ' of them frozen: in_conv down1 down2 out_conv)' in out
  _, variables = load_pretrained(workdir)
  first = jax.tree.map(np.asarray, variables['params'])
  config.num_train_steps = 6
  train.train_and_evaluate(config, workdir)  # resumed from step 3
  _, variables = load_pretrained(workdir)
  for name in ('in_conv', 'down1', 'down2', 'out_conv', 'up1'):
    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(variables['params'][name]), jax.tree.leaves(first[name]), strict=True))
    assert same == (name != 'up1'), name
  config.freeze = ()
  config.num_train_steps = 9
  with pytest.raises(UserError, match=re.escape(
      "was saved by a run with freeze=('in_conv', 'down1', 'down2', 'out_conv'), this config "
      'has freeze=(); rerun with its settings to resume it, or choose another --workdir for '
      'a new run '
      f'(--config.init_from={workdir}/checkpoints/6 starts it from these weights)')):
    train.train_and_evaluate(config, workdir)
  # Another optimizer with the same modules frozen (named otherwise, a list in the saved
  # config) names the optimizer alone.
  config.freeze, config.optimizer = ('encoder', 'out_conv'), 'sgd'
  with pytest.raises(UserError, match=re.escape(
      'was saved by a run with optimizer=adam, this config has optimizer=sgd; rerun')):
    train.train_and_evaluate(config, workdir)
  config.optimizer, config.lr_multipliers = 'adam', (('up1', 0.5),)
  with pytest.raises(UserError, match=re.escape(
      "was saved by a run with lr_multipliers=[], this config has lr_multipliers=(('up1', "
      '0.5),); rerun')):
    train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
def test_lr_multipliers_train_as_torch_parameter_groups(schedule):
  # torch: a parameter group per multiplier at that multiple of the scheduled rate (set before
  # each step, as LambdaLR sets every group's), one clip_grad_norm_ over all, up2 frozen. (SGD
  # with momentum and weight decay: Adam would turn a few rounding-noise-level gradients of the
  # slow encoder into steps that differ by a fraction of a percent between the frameworks.)
  ref = move_off_init(SeedUNet(1, 1, base=4, depth=2), 1, 1, hw=(16, 16))
  model_fields, initial, _ = state_dict_to_flax(
      {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()})
  clip, multipliers = 0.05, (('encoder', 0.1), ('out_conv', 3.0))
  config = tiny_config(**{'model.depth': 2}, optimizer='sgd', weight_decay=0.1,
                       grad_clip_norm=clip, schedule=schedule, learning_rate=1e-2,
                       warmup_steps=2, num_train_steps=3, freeze=('up2',),
                       lr_multipliers=multipliers)
  config.model.update(model_fields)
  batches = _random_batches(3, seed=5)
  rate = learning_rate_schedule(config)

  def torch_run(scales):
    net = copy.deepcopy(ref).train()
    net.up2.requires_grad_(False)
    groups = {m: [] for m in (1.0, *scales.values())}
    for name, module in net.named_children():
      groups[scales.get(name, 1.0)] += list(module.parameters())
    opt = torch.optim.SGD([{'params': p, 'scale': m} for m, p in groups.items()], lr=1e-2,
                          momentum=0.9, weight_decay=0.1)
    for step, batch in enumerate(batches):
      for group in opt.param_groups:
        group['lr'] = float(rate(step)) * group['scale']
      opt.zero_grad()
      _torch_loss(net, batch).backward()
      torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
      opt.step()
    return state_dict_to_flax({k: v.detach().numpy().copy()
                               for k, v in net.state_dict().items()})[1]

  scales = {'in_conv': 0.1, 'down1': 0.1, 'down2': 0.1, 'out_conv': 3.0}
  want = torch_run(scales)
  assert _max_rel(torch_run({}), want) > 1e-3  # (one rate for all is far outside)
  got = _jax_run(config, initial, batches, jax.devices()[:1])
  _assert_close(got, want)
  for a, b in zip(jax.tree.leaves(got['params']['up2']), jax.tree.leaves(initial['params']['up2']),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  assert _max_rel(_jax_run(config, initial, batches, jax.devices()), got) <= 1e-5  # 8 as 1


@pytest.mark.parametrize('multipliers,message', [
    ((('encoder', 0),), "lr_multipliers: 'encoder' has multiplier 0, which must be above 0 (to "
     'leave modules as they are, freeze them: --config.freeze)'),
    ((('inc', 0.1),), "lr_multipliers=('inc',): no module 'inc' in this UNet"),
    ((('encoder', 0.1), ('down1', 2.0)), "lr_multipliers: down1 is in two entries ('encoder' and "
     "'down1'); give each module one multiplier"),
    (('encoder',), "lr_multipliers: 'encoder' is not a (module, multiplier) pair; e.g. "
     '--config.lr_multipliers="((\'encoder\', 0.1),)"'),
    ((('up1', 0.5),), 'lr_multipliers: up1 is frozen (freeze) and given a multiplier; leave it '
     'out of one of them'),
])
def test_bad_lr_multipliers_are_refused_by_name(multipliers, message):
  with pytest.raises(UserError, match=re.escape(message)):
    config_checks.validate_config(tiny_config(lr_multipliers=multipliers, freeze=('up1',)),
                                  parallel.make_mesh(jax.devices()[:1]))


def test_the_optimizer_keeps_no_state_and_no_update_for_frozen_modules():
  # (The train step also puts the frozen weights back as they were; this is the optimizer's own
  # part, which Door 2's masked_optimizer is in a step of one's own.)
  params = init_variables(train.build_model(tiny_config(**{'model.depth': 2}), None),
                          jax.random.key(0))['params']
  grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float32), params)
  trained, frozen = split(params, ('in_conv', 'down1', 'down2'))
  inner = optax.chain(clip_grad_norm(0.1), optax.add_decayed_weights(0.1), optax.adam(1e-2))
  tx = masked_optimizer(inner, ('encoder',))
  updates, _ = tx.update(grads, tx.init(params), params)
  for name in frozen:
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates[name])), name
  # the trained modules' updates are the inner optimizer's on them alone: its clipping norm
  # and weight decay theirs
  alone, _ = inner.update(split(grads, frozen)[0], inner.init(trained), trained)
  for a, b in zip(jax.tree.leaves({k: updates[k] for k in trained}), jax.tree.leaves(alone),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  # the run's optimizer: Adam's two moments for the trained parameters, none for the frozen
  config = tiny_config(**{'model.depth': 2}, freeze=('encoder',), optimizer='adam',
                       grad_clip_norm=0.1, lr_multipliers=(('out_conv', 2.0),))
  state = optimizers.make_optimizer(config).init(params)
  size = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x))
  assert size == 2 * sum(np.size(x) for x in jax.tree.leaves(trained))

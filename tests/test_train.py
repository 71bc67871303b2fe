"""Training: data parallelism equals one device, multi-process equals one process, resume is
exact, and bad configs fail before any compute with one line."""

import copy
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import (
  TEST_XLA_FLAGS,
  TFDS_DIR,
  max_rel_err,
  move_off_init,
  nchw,
  nhwc,
  without_compilation_cache,
)
from PIL import Image
from torch_reference import MilesialUNet, SeedUNet

from configs import base
from unet_jax import (
  config_checks,
  input_pipeline,
  load_pretrained,
  losses,
  optimizers,
  parallel,
  train,
)
from unet_jax.checkpoint import load_pretrained_with_metadata
from unet_jax.convert import flax_to_torch, state_dict_to_flax, torch_to_flax
from unet_jax.errors import UserError
from unet_jax.evaluate import evaluate_checkpoint
from unet_jax.export import export_checkpoint
from unet_jax.predict import main as predict_main
from unet_jax.predict import predict
from unet_jax.state_dict_io import read_state_dict
from unet_jax.train_checkpoints import TrainCheckpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DP_TOL = 1e-5  # relative, per tensor: only the order of float summation differs


def tiny_config(**overrides):
  config = base.get_config()
  config.model.base_features = 4
  config.model.depth = 1  # the model is tested in test_parity; these test the loop around it
  config.image_size = 16
  config.batch_size = 16
  config.num_train_steps = 6
  config.log_every_steps = 1
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.num_sample_images = 2
  config.data.data_dir = TFDS_DIR
  config.compilation_cache_dir = ''  # (the tests' shared cache is set up in conftest.py)
  return override(config, overrides)


def override(config, overrides):
  """`config` with each dotted field of `overrides` ('model.depth': 2) set."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def _random_batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.random((16, 16, 16, 1), np.float32),
           'mask': (rng.random((16, 16, 16)) > 0.6).astype(np.int32)} for _ in range(n)]


def _run_steps(config, devices, kind, batches, with_state=False, **loss):
  mesh = parallel.make_mesh(devices)
  model = train.build_model(config, parallel.AXIS)
  state = train.create_train_state(config, model, mesh)
  step = parallel.distribute(functools.partial(train.train_step, model=model, dice_weight=1.0,
                                               **loss), mesh, kind)
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append(m)
  local = functools.partial(jax.tree.map, lambda x: np.asarray(x.addressable_data(0)))
  out = local(state.params), local(state.batch_stats), local(metrics)
  return (*out, state) if with_state else out


def _initial_train_logits(config, images, all_scales=False):
  """The config's initial model's training-mode outputs for `images` (before any step)."""
  model = train.build_model(config, None)
  return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                          all_scales=all_scales)[0])(
      train.init_variables(model, jax.random.key(config.seed)), images)


def _max_rel(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-6)), a, b)))


@pytest.mark.parametrize('kind', ['shard_map', 'pmap'])
def test_eight_devices_equal_one_device(kind):
  assert jax.device_count() == 8
  config = tiny_config()
  batches = _random_batches(3)
  # With ignored pixels (label 2, data.ignore_value) spread unevenly: one device's share has
  # none, another's is all ignored, so a loss meaned per device would weigh pixels unequally.
  for b in batches:
    b['mask'][2:6] = np.where(np.random.default_rng(3).random((4, 16, 16)) < 0.5, 2,
                              b['mask'][2:6])
    b['mask'][8:10] = 2
  # (BCE's foreground weight, as torch's, the focal loss's factor and the Tversky term over the
  # global batch: each device's loss is the global one, its gradient that of its own pixels)
  loss = dict(ignore_id=2, pos_weight=4.0, focal_gamma=2.0, tversky=(0.3, 0.7),
              dice_reduction='batch')
  one = _run_steps(config, jax.devices()[:1], kind, batches, **loss)
  eight = _run_steps(config, jax.devices(), kind, batches, **loss)
  # The step's cross-entropy is the weighted one, over the valid pixels.
  logits = _initial_train_logits(config, batches[0]['image'])
  want = losses.segmentation_loss(logits, batches[0]['mask'], dice_weight=1.0, **loss)[1]
  np.testing.assert_allclose(one[2][0]['ce_loss'], want['ce_loss'], rtol=1e-5)
  np.testing.assert_allclose(one[2][0]['dice_loss'], want['dice_loss'], rtol=1e-5)
  plain = losses.segmentation_loss(logits, batches[0]['mask'], dice_weight=1.0, ignore_id=2)[1]
  assert abs(float(want['ce_loss']) - float(plain['ce_loss'])) > 0.1
  per_image = losses.segmentation_loss(logits, batches[0]['mask'], dice_weight=1.0,
                                       **{**loss, 'dice_reduction': 'image'})[1]
  assert abs(float(want['dice_loss']) - float(per_image['dice_loss'])) > 1e-3
  assert _max_rel(eight, one) <= DP_TOL
  # The runs did train: parameters moved, BatchNorm statistics left 0/1.
  start = _run_steps(config, jax.devices()[:1], kind, [])
  assert _max_rel(one[0], start[0]) > 1e-3 and _max_rel(one[1], start[1]) > 1e-3


def test_dice_without_background_through_the_step_on_eight_devices():
  config = tiny_config(**{'model.num_classes': 3})
  batches = _random_batches(2, seed=4)
  for b in batches:
    b['mask'] = b['mask'] + (b['image'][..., 0] > 0.8)  # (classes 0, 1, 2)
  loss = dict(dice_include_background=False, dice_reduction='batch')
  one = _run_steps(config, jax.devices()[:1], 'shard_map', batches, **loss)
  eight = _run_steps(config, jax.devices(), 'shard_map', batches, **loss)
  logits = _initial_train_logits(config, batches[0]['image'])
  want = losses.segmentation_loss(logits, batches[0]['mask'], dice_weight=1.0, **loss)[1]
  np.testing.assert_allclose(one[2][0]['dice_loss'], want['dice_loss'], rtol=1e-5)
  every = losses.segmentation_loss(logits, batches[0]['mask'], dice_weight=1.0,
                                   dice_reduction='batch')[1]
  assert abs(float(want['dice_loss']) - float(every['dice_loss'])) > 1e-3
  assert _max_rel(eight, one) <= DP_TOL


def test_label_smoothing_through_the_step_on_eight_devices():
  # torch's smoothed CrossEntropyLoss with class weights over the valid pixels of the global
  # batch: one device's share all ignored, the others' totals unequal.
  config = tiny_config(**{'model.num_classes': 3})
  batches = _random_batches(2, seed=5)
  for b in batches:
    b['mask'] = b['mask'] + 2 * (b['image'][..., 0] > 0.8)  # (0, 1, 2 and 3; 2 is ignored)
    b['mask'][4:6] = 2
  loss = dict(ignore_id=2, class_weights=(0.3, 1.0, 2.0), label_smoothing=0.2)
  one = _run_steps(config, jax.devices()[:1], 'shard_map', batches, **loss)
  eight = _run_steps(config, jax.devices(), 'shard_map', batches, **loss)
  logits = _initial_train_logits(config, batches[0]['image'])
  mask = batches[0]['mask']
  theirs = np.where(mask == 2, -100, np.where(mask > 2, mask - 1, mask))
  want = torch.nn.functional.cross_entropy(
      torch.tensor(np.asarray(logits)).permute(0, 3, 1, 2), torch.tensor(theirs),
      weight=torch.tensor(loss['class_weights']), ignore_index=-100, label_smoothing=0.2)
  np.testing.assert_allclose(one[2][0]['ce_loss'], want, rtol=1e-5)
  np.testing.assert_allclose(eight[2][0]['ce_loss'], want, rtol=1e-5)
  hard = losses.segmentation_loss(logits, mask, dice_weight=1.0,
                                  **{**loss, 'label_smoothing': 0.0})[1]
  assert abs(float(want) - float(hard['ce_loss'])) > 0.05
  assert _max_rel(eight, one) <= DP_TOL


@pytest.mark.parametrize('classes,reduction,kind,term', [
    (3, 'batch', 'shard_map', 'lovasz'), (1, 'batch', 'pmap', 'lovasz'),
    (1, 'image', 'shard_map', 'lovasz'), (3, 'batch', 'shard_map', 'generalized_dice')])
def test_lovasz_and_generalized_dice_through_the_step_on_eight_devices(classes, reduction, kind,
                                                                        term):
  # Lovász over the global batch: every device sorts every pixel's error; per image, its own.
  # The generalized Dice over the batch: each class's weight from the global batch's counts.
  config = tiny_config(**{'model.num_classes': classes})
  batches = _random_batches(2, seed=6)
  for b in batches:
    b['mask'] = b['mask'] + (classes - 1) * (b['image'][..., 0] > 0.8)
  loss = {term: True, 'dice_reduction': reduction}
  one = _run_steps(config, jax.devices()[:1], kind, batches, **loss)
  eight = _run_steps(config, jax.devices(), kind, batches, **loss)
  logits = _initial_train_logits(config, batches[0]['image'])
  want = losses.segmentation_loss(logits, batches[0]['mask'], dice_weight=1.0, **loss)[1]
  np.testing.assert_allclose(eight[2][0]['dice_loss'], want['dice_loss'], rtol=1e-5)
  plain = losses.segmentation_loss(logits, batches[0]['mask'], dice_weight=1.0,
                                   dice_reduction=reduction)[1]
  assert abs(float(want['dice_loss']) - float(plain['dice_loss'])) > 1e-3
  assert _max_rel(eight, one) <= DP_TOL


@pytest.mark.parametrize('deep', [False, True])
def test_border_weight_maps_through_the_step_on_eight_devices(deep):
  # The batches' 'weight' maps (the UNet paper's term, as the stream gives them) weigh the
  # cross-entropy over the global batch: each device's sum over the global total.
  config = tiny_config(**{'model.depth': 3, 'model.deep_supervision': deep})
  batches = _random_batches(2, seed=8)
  rng = np.random.default_rng(8)
  for b in batches:
    b['weight'] = (rng.random(b['mask'].shape) * 10 * (rng.random(b['mask'].shape) < 0.3)
                   ).astype(np.float32)
    b['weight'][:3] *= 5                                  # (devices' totals unequal)
  one = _run_steps(config, jax.devices()[:1], 'shard_map', batches)
  eight = _run_steps(config, jax.devices(), 'shard_map', batches)
  outputs = _initial_train_logits(config, batches[0]['image'], all_scales=deep)
  logits = outputs[0] if deep else outputs
  want = losses.segmentation_loss(logits, batches[0]['mask'], dice_weight=1.0,
                                  border=batches[0]['weight'])[1]
  np.testing.assert_allclose(eight[2][0]['ce_loss'], want['ce_loss'], rtol=1e-5)
  unweighted = losses.segmentation_loss(logits, batches[0]['mask'], dice_weight=1.0)[1]
  assert abs(float(want['ce_loss']) - float(unweighted['ce_loss'])) > 1e-3
  assert _max_rel(eight, one) <= DP_TOL


def test_ema_of_the_weights_follows_torch_averaged_model():
  # torch's AveragedModel(get_ema_multi_avg_fn(decay), use_buffers=True), told the weights
  # after each step (its first update copies them: the average starts at the initial weights),
  # holds what the step's average holds, BatchNorm statistics included.
  from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
  decay = 0.8
  config = tiny_config(ema_decay=decay)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = train.build_model(config, parallel.AXIS)
  state = train.create_train_state(config, model, mesh)
  step = parallel.distribute(functools.partial(train.train_step, model=model, dice_weight=1.0,
                                               ema_decay=decay), mesh, 'shard_map')
  holder = torch.nn.Module()
  holder.weights = torch.nn.ParameterList(
      [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in jax.tree.leaves(state.params)])
  for i, x in enumerate(jax.tree.leaves(state.batch_stats)):
    holder.register_buffer(f'stat{i}', torch.tensor(np.asarray(x)))
  averaged = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
  averaged.update_parameters(holder)
  for batch in _random_batches(3):
    state, _ = step(state, batch)
    with torch.no_grad():
      for t, x in zip([*holder.weights, *holder.buffers()],
                      jax.tree.leaves((state.params, state.batch_stats)), strict=True):
        t.copy_(torch.tensor(np.asarray(x)))
    averaged.update_parameters(holder)
  want = [t.detach().numpy() for t in [*averaged.module.weights, *averaged.module.buffers()]]
  got = jax.tree.leaves((state.ema['params'], state.ema['batch_stats']))
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert train.variables_of(state) is state.ema
  assert _max_rel(state.ema['params'], state.params) > 1e-3  # an average, not the weights


def test_gradient_accumulation_matches_torch_on_any_device_count():
  # torch's loop: each microbatch a batch of its own for BatchNorm (running statistics updated
  # per microbatch), (loss / k).backward() on each, then one step (SGD with momentum: unlike
  # Adam's, its update scales with the gradient, so a sum in place of the mean would show).
  k, steps = 2, 2
  ref = move_off_init(SeedUNet(1, 1, base=4, depth=1), 1, 1, hw=(16, 16))
  model_fields, initial, _ = state_dict_to_flax(
      {key: v.detach().numpy().copy() for key, v in ref.state_dict().items()})
  config = tiny_config(grad_accum_steps=k, schedule='constant', learning_rate=0.1,
                       optimizer='sgd')
  config.model.update(model_fields)
  batches = _random_batches(steps, seed=2)

  def torch_run(accumulate):
    net = copy.deepcopy(ref).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for batch in batches:
      opt.zero_grad()
      for x, t in zip(np.split(batch['image'], accumulate), np.split(batch['mask'], accumulate),
                      strict=True):
        logits, target = net(nchw(x)), torch.tensor(t[:, None], dtype=torch.float32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        probs = torch.sigmoid(logits)
        inter, denom = (probs * target).sum((2, 3)), (probs + target).sum((2, 3))
        dice = 1 - ((2 * inter + 1) / (denom + 1)).mean()  # (per image, smoothed by 1 pixel)
        ((loss + dice) / accumulate).backward()
      opt.step()
    return state_dict_to_flax({key: v.detach().numpy().copy()
                               for key, v in net.state_dict().items()})[1]

  want = torch_run(k)
  assert _max_rel(torch_run(1), want) > 1e-3  # (microbatches are not the whole batch at once)

  def run(devices, accumulate):
    mesh = parallel.make_mesh(devices)
    model = train.build_model(config, parallel.AXIS)
    state = train.create_train_state(config, model, mesh, initial)
    step = parallel.distribute(functools.partial(
        train.train_step, model=model, dice_weight=1.0, grad_accum_steps=accumulate), mesh,
        'shard_map')
    # The input pipeline's order: each device's slice holds its share of every microbatch.
    order = input_pipeline.microbatch_order(16, accumulate, len(devices))
    for batch in batches:
      state, _ = step(state, jax.tree.map(lambda x: x[order], batch))
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                        {'params': state.params, 'batch_stats': state.batch_stats})

  one = run(jax.devices()[:1], k)
  for path, x in jax.tree_util.tree_leaves_with_path(want):
    got = one
    for key in path:
      got = got[key.key]
    assert max_rel_err(got, x) <= 2e-5, jax.tree_util.keystr(path)
  assert _max_rel(run(jax.devices(), k), one) <= DP_TOL  # 8 devices, 1 example each per micro


def test_gradient_accumulation_through_the_loop(tmp_path, capsys):
  # The loop gives the step its batches in microbatch order for its 8 devices: 2 steps there
  # equal the step on 1 device fed the stream as it comes (microbatch m: examples 8m to 8m+7).
  config = tiny_config(grad_accum_steps=2, num_train_steps=2, eval_every_steps=2,
                       checkpoint_every_steps=2, num_sample_images=0, schedule='constant')
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert ' process(es), batch 16 in 2 microbatches of 8 | 2 steps -> ' in capsys.readouterr().out
  source = input_pipeline.load_sources(config)[0]
  stream = list(input_pipeline.train_dataset(source, config, devices=1))
  params, stats, _ = _run_steps(config, jax.devices()[:1], 'shard_map', stream,
                                grad_accum_steps=2)
  got = _params(tmp_path / 'wd')
  assert _max_rel((got['params'], got['batch_stats']), (params, stats)) <= DP_TOL


def test_shard_map_and_pmap_agree():
  config = tiny_config()
  batches = _random_batches(2, seed=1)
  a = _run_steps(config, jax.devices()[:4], 'shard_map', batches)
  b = _run_steps(config, jax.devices()[:4], 'pmap', batches)
  assert _max_rel(a, b) <= DP_TOL


def test_half_precision_keeps_float32_state():
  config = tiny_config(half_precision=True)
  params, stats, metrics = _run_steps(config, jax.devices()[:2], 'shard_map',
                                      _random_batches(2))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves((params, stats)))
  assert np.isfinite(metrics[-1]['loss'])
  full = _run_steps(tiny_config(), jax.devices()[:2], 'shard_map', _random_batches(2))
  # bf16 compute: the same training, not the same bits.
  assert _max_rel(params, full[0]) > 0
  for half, single in zip(metrics, full[2], strict=True):
    assert abs(half['loss'] - single['loss']) <= 0.02 * single['loss']


# --- the whole loop ---------------------------------------------------------------------------

def _train_cmd(workdir, *flags):
  return [sys.executable, os.path.join(REPO, 'train.py'), '--config',
          os.path.join(REPO, 'configs', 'base.py'), '--workdir', str(workdir),
          '--config.model.base_features=4', '--config.model.depth=1', '--config.image_size=16',
          '--config.num_sample_images=2', '--config.log_every_steps=1',
          '--config.compilation_cache_dir=', *flags]  # conftest's shared cache applies


def _env(devices):
  devices_flag = f'--xla_force_host_platform_device_count={devices}'
  env = dict(os.environ, XLA_FLAGS=f'{TEST_XLA_FLAGS} {devices_flag}', TFDS_DATA_DIR=TFDS_DIR,
             PYTHONUNBUFFERED='1')
  env.pop('CUDA_VISIBLE_DEVICES', None)
  return env


def _params(workdir):
  _, variables = load_pretrained(str(workdir))
  return jax.tree.map(np.asarray, variables)


def test_epoch_steps_count_the_last_partial_batch_exactly():
  assert train.epoch_steps(5, 2048, 16) == 640
  assert train.epoch_steps(1, 10, 4) == 3  # (4 + 4 + 2, as torch's loader without drop_last)
  assert train.epoch_steps(0.07, 100, 1) == 7  # (in floats, 0.07 x 100 is 7.000000000000001)
  assert train.epoch_steps(0.001, 10, 4) == 1


def test_train_end_to_end_outputs(tmp_path, capsys):
  workdir = tmp_path / 'run'
  # Its own data folder: the run prepares the built-in dataset, as a user's first run does.
  # 0.04 epochs of the 2048 training images in batches of 16: 5.12 batches, so 6 steps.
  config = tiny_config(**{'data.data_dir': str(tmp_path / 'tfds'), 'num_epochs': 0.04,
                          'num_train_steps': 1000})
  metrics = train.train_and_evaluate(config, str(workdir))
  assert 0.0 <= metrics['dice'] <= 1.0
  assert config.num_train_steps == 1000  # (the caller's config as it was)
  # Its first line says what trains on what, where.
  params = sum(x.size for x in jax.tree.leaves(load_pretrained(str(workdir))[1]['params']))
  assert re.search(
      rf'^{params:,} parameters \(base_features=4, depth=1, 1 output channel\(s\)\) \| '
      r'synthetic_shapes: 2048 training, 204 eval images at 16x16 \| 8 cpu device\(s\) in 1 '
      rf'process\(es\), batch 16 \| 6 steps \(0.04 epochs\) -> {re.escape(str(workdir))}$',
      capsys.readouterr().out, re.M)
  assert (tmp_path / 'tfds' / 'synthetic_shapes' / '64px').is_dir()
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert {'loss', 'ce_loss', 'dice_loss', 'images_per_sec', 'learning_rate'} <= set(rows[0])
  assert {'eval_dice', 'eval_iou', 'eval_pixel_accuracy'} <= set(rows[2])
  # The cosine schedule's float32 rates, each logged as the schedule's value in its shortest
  # decimal form (not float32's long expansion, 0.0030000000260770321 for 0.003)
  config.num_train_steps = 6
  schedule = optimizers.learning_rate_schedule(config)
  assert [r['learning_rate'] for r in rows] == [
      float(str(np.float32(schedule(s)))) for s in range(6)]
  assert sorted(os.listdir(workdir / 'samples')) == ['step_0000003.png', 'step_0000006.png']
  # `python -m unet_jax.evaluate` scores what the run logged, for the latest and a kept step.
  logged = {r['step']: r for r in rows}
  for path, step in ((workdir, 6), (workdir / 'checkpoints' / '3', 3)):
    got = evaluate_checkpoint(str(path))
    assert (got['step'], got['split'], got['images'], got['image_size']) == (step, 'test', 204, 16)
    assert {k: got[k] for k in ('dice', 'iou', 'pixel_accuracy', 'class_accuracy')} == {
        k: logged[step][f'eval_{k}'] for k in ('dice', 'iou', 'pixel_accuracy', 'class_accuracy')}
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  model, variables, meta = load_pretrained_with_metadata(str(workdir))
  assert meta['step'] == 6 and meta['mask_values'] == [0, 1]
  # A given step (kept: 3 and 6), and the checkpoints folder itself (the latest).
  _, at_3, meta_3 = load_pretrained_with_metadata(str(workdir / 'checkpoints' / '3'))
  assert meta_3['step'] == 3
  assert not np.array_equal(at_3['params']['out_conv']['conv']['kernel'],
                            variables['params']['out_conv']['conv']['kernel'])
  _, latest, meta_c = load_pretrained_with_metadata(str(workdir / 'checkpoints'))
  assert meta_c['step'] == 6
  np.testing.assert_array_equal(latest['params']['out_conv']['conv']['kernel'],
                                variables['params']['out_conv']['conv']['kernel'])
  with pytest.raises(UserError, match='metrics.jsonl: is a file; pass a converted checkpoint'):
    load_pretrained_with_metadata(str(workdir / 'metrics.jsonl'))
  assert model.base_features == 4 and model.depth == 1
  out = model.apply(variables, np.zeros((1, 20, 24, 1), np.float32), train=False)
  assert out.shape == (1, 20, 24, 1)
  # predict on a workdir sees images as training did, at image_size (16) unless told otherwise.
  image = (np.random.default_rng(1).random((40, 24)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / 'x.png')
  for flags, size, said in (([], 16, 'at 16x16, the training image_size'),
                            (['--size', '0'], None, 'each image at its own size')):
    assert predict_main([str(tmp_path / 'x.png'), '--checkpoint', str(workdir), '--output',
                         str(tmp_path / 'masks'), *flags]) == 0
    assert said in capsys.readouterr().out
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / 'masks' / 'x_mask.png')),
        np.asarray([0, 255], np.uint8)[predict(model, variables, image[..., None], size=size)])
  # The workdir exported to PyTorch: the seed's class loads it strictly and computes what the
  # trained Flax model computes; each BatchNorm counted the 6 batches it was updated with.
  flax_to_torch(str(workdir), str(tmp_path / 'trained.pth'))
  state_dict = torch.load(tmp_path / 'trained.pth', weights_only=True)
  assert {int(v) for k, v in state_dict.items() if k.endswith('num_batches_tracked')} == {6}
  ref = SeedUNet(1, 1, base=4, depth=1)
  ref.load_state_dict(state_dict, strict=True)
  x = np.random.default_rng(0).random((2, 16, 24, 1), np.float32)
  with torch.no_grad():
    want = nhwc(ref.eval()(nchw(x)))
  assert max_rel_err(model.apply(variables, x, train=False), want) <= 1e-4
  # The mask values travel where a strict load does not see them: milesial's state_dict entry
  # (its predict.py pops it) and a .safetensors header.
  flax_to_torch(str(workdir), str(tmp_path / 'milesial.pth'), layout='milesial')
  assert torch.load(tmp_path / 'milesial.pth', weights_only=True)['mask_values'] == [0, 1]
  flax_to_torch(str(workdir), str(tmp_path / 'trained.safetensors'))
  assert read_state_dict(str(tmp_path / 'trained.safetensors'))[1] == {'mask_values': [0, 1]}


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  # tensorboardX imports torch when it can (185 MB of a run's peak RSS); the reporter keeps it
  # out, and `import torch` still works afterwards.
  script = f"""
import struct, sys
from unet_jax.reporting import Reporter
reporter = Reporter({str(tmp_path)!r}, total_steps=3, start_step=0, images_per_step=1)
print('torch imported:', 'torch' in sys.modules)
reporter.write(2, {{'loss': 0.25}})
reporter.close()
import torch
from tensorboardX.proto import event_pb2
import glob
data = open(glob.glob({str(tmp_path)!r} + '/events.out.tfevents.*')[0], 'rb').read()
values = []
while data:  # TFRecord: length, its crc, the record, its crc
  n = struct.unpack('<Q', data[:8])[0]
  event = event_pb2.Event.FromString(data[12:12 + n])
  values += [(v.tag, round(v.simple_value, 6), event.step) for v in event.summary.value]
  data = data[16 + n:]
print(values)
"""
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()  # (output to a pipe: the logged row as a plain line)
  assert lines[0] == 'torch imported: False' and lines[2:] == ["[('loss', 0.25, 2)]"], lines
  assert re.fullmatch(r'step 2/3  loss 0\.25  eta \d+s', lines[1]), lines


def test_one_step_run_without_sample_images(tmp_path):
  # A smoke run: one step (shorter than the warmup) and num_sample_images=0 (no PNGs).
  workdir = tmp_path / 'run'
  config = tiny_config(num_train_steps=1, num_sample_images=0)
  metrics = train.train_and_evaluate(config, str(workdir))
  assert 0.0 <= metrics['dice'] <= 1.0
  assert os.listdir(workdir / 'samples') == []
  assert load_pretrained_with_metadata(str(workdir))[2]['step'] == 1


def test_profile_steps_trace_those_steps_for_tensorboard_and_perfetto(tmp_path, capsys):
  import glob
  import gzip
  workdir = tmp_path / 'run'
  config = tiny_config(num_train_steps=4, profile_steps=(2, 3), num_sample_images=0)
  train.train_and_evaluate(config, str(workdir))
  assert (f'profiled steps 2-3 into {workdir}/plugins/profile: tensorboard --logdir {workdir} '
          '(its Profile tab), or its .trace.json.gz at ui.perfetto.dev') in capsys.readouterr().out
  assert len(glob.glob(f'{workdir}/plugins/profile/*/*.xplane.pb')) == 1
  [trace] = glob.glob(f'{workdir}/plugins/profile/*/*.trace.json.gz')
  with gzip.open(trace) as f:
    events = json.load(f)['traceEvents']
  assert sorted(e['args']['step_num'] for e in events if e.get('name') == 'train') == ['2', '3']
  # A resume after them traces nothing.
  train.train_and_evaluate(tiny_config(num_train_steps=6, profile_steps=(2, 3),
                                       num_sample_images=0), str(workdir))
  assert 'profiled' not in capsys.readouterr().out
  assert len(glob.glob(f'{workdir}/plugins/profile/*')) == 1
  # The trace ends after its last step, or with the loop for a run stopped inside the range
  # (early, or by a signal).
  from unet_jax.profiling import StepProfile
  for last, stopped in ((3, False), (5, True)):
    said, where = [], tmp_path / f'to{last}'
    profile = StepProfile((2, last), str(where), True, said.append)
    for step in (1, 2, 3):
      with profile.step(step):
        x = jax.numpy.ones(3) * step
      profile.after(step, x)
    assert bool(said) != stopped
    profile.close()
    assert said == [f'profiled steps 2-3 into {where}/plugins/profile: tensorboard --logdir '
                    f'{where} (its Profile tab), or its .trace.json.gz at ui.perfetto.dev']
    assert len(glob.glob(f'{where}/plugins/profile/*/*.xplane.pb')) == 1


def test_compilation_cache_lets_a_rerun_load_its_steps(tmp_path):
  cache = tmp_path / 'cache'
  flags = ['--config.num_train_steps=3', '--config.eval_every_steps=3',
           '--config.checkpoint_every_steps=3', f'--config.compilation_cache_dir={cache}']
  # JAX logs cache hits at WARNING with log_compiles; tiny steps compile in under its default
  # 1 s threshold for writing an entry.
  env = dict(without_compilation_cache(_env(1)), JAX_LOG_COMPILES='1',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  first = subprocess.run(_train_cmd(tmp_path / 'a', *flags), env=env, capture_output=True,
                         text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-2000:]
  entries = os.listdir(cache)
  assert any('train_step' in name for name in entries), entries
  assert 'Persistent compilation cache hit' not in first.stderr
  second = subprocess.run(_train_cmd(tmp_path / 'b', *flags), env=env, capture_output=True,
                          text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr
  assert sorted(os.listdir(cache)) == sorted(entries)  # nothing compiled afresh
  # The loaded executables compute what the compiled ones did, to the bit.
  a, b = _params(tmp_path / 'a'), _params(tmp_path / 'b')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


_SLOW_UNLINK = """
import time
from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
_unlink = SharedMemoryArray.close_shm_async.__func__
def _slow(cls, shm, unlink):
  time.sleep(0.3)
  _unlink(cls, shm, unlink)
SharedMemoryArray.close_shm_async = classmethod(_slow)
"""


def test_worker_processes_load_the_same_batches(tmp_path):
  # grain's worker processes (data.worker_count) decode the same examples in the same order, and
  # the run frees the shared memory their batches came in before it exits. grain unlinks that
  # memory on a background thread; slowed down here (a sitecustomize), that thread is still busy
  # at exit unless train.py waits for it, and Python's resource tracker then warns of leaked
  # shared_memory objects (seen once in CI without the slowdown).
  hooks = tmp_path / 'hooks'
  hooks.mkdir()
  (hooks / 'sitecustomize.py').write_text(_SLOW_UNLINK)
  env = dict(_env(1), PYTHONPATH=str(hooks))
  flags = ['--config.num_train_steps=3', '--config.eval_every_steps=3',
           '--config.checkpoint_every_steps=3', f'--config.compilation_cache_dir={tmp_path}/c']
  for workers in (0, 2):
    run = subprocess.run(_train_cmd(tmp_path / f'w{workers}', *flags,
                                    f'--config.data.worker_count={workers}'),
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'leaked shared_memory' not in run.stderr, run.stderr[-2000:]
  a, b = _params(tmp_path / 'w0'), _params(tmp_path / 'w2')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('grad_accum_steps', [1, 2])
def test_two_processes_equal_one_process(tmp_path, grad_accum_steps):
  # Both start from the same converted weights (init_from: each process reads the whole tree).
  # With accumulation each process loads its half of every microbatch, in the order its two
  # devices take them (batch 8 in 2 microbatches over 4 devices: one example per device each).
  flags = ['--config.num_train_steps=3', '--config.batch_size=8', '--config.eval_every_steps=3',
           '--config.checkpoint_every_steps=3', f'--config.grad_accum_steps={grad_accum_steps}',
           f'--config.init_from={_converted_reference(tmp_path)}']
  single = subprocess.run(_train_cmd(tmp_path / 'single', *flags), env=_env(4),
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-2000:]
  port = _free_port()
  # Into a data folder of their own, as a first run: process 0 prepares the dataset while
  # process 1 waits (before, process 1's dataset, made before the files, had no splits).
  procs = [subprocess.Popen(
      _train_cmd(tmp_path / 'multi', *flags, f'--coordinator_address=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}',
                 f'--config.data.data_dir={tmp_path / "tfds"}'),
      env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  a, b = _params(tmp_path / 'single'), _params(tmp_path / 'multi')
  assert _max_rel(a, b) <= DP_TOL


def test_resume_on_other_devices_and_data_workers(tmp_path):
  # A checkpoint saved on 2 devices resumes on 4 with 2 data workers (before: restored onto the
  # old devices, then refused by the step; a changed worker count made the data stream's saved
  # state unreadable, so the checkpoint was taken for damaged). It ends where a straight run on
  # 4 devices ends, to the float summation order of the first two steps.
  flags = ['--config.batch_size=8', '--config.checkpoint_every_steps=2',
           '--config.eval_every_steps=10', '--config.schedule=constant']
  for workdir, devices, more in ((tmp_path / 'straight', 4, ['--config.num_train_steps=4']),
                                 (tmp_path / 'moved', 2, ['--config.num_train_steps=2']),
                                 (tmp_path / 'moved', 4, ['--config.num_train_steps=4',
                                                          '--config.data.worker_count=2'])):
    proc = subprocess.run(_train_cmd(workdir, *flags, *more), env=_env(devices),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'resumed from {tmp_path}/moved/checkpoints/2' in proc.stdout + proc.stderr
  assert 'damaged' not in proc.stderr
  # Its output went to a pipe, not a terminal: no progress bar (which would write every refresh
  # into a log file), a plain line per logged row instead, with the time left.
  with open(tmp_path / 'moved' / 'metrics.jsonl') as f:
    logged = {row['step']: row for row in map(json.loads, f)}
  lines = [line.split('  ') for line in proc.stdout.splitlines() if line.startswith('step ')]
  assert [line[:2] for line in lines] == [[f'step {s}/4', f'loss {logged[s]["loss"]:.4g}']
                                          for s in (3, 4)], proc.stdout
  assert re.fullmatch(r'eta \d+s', lines[0][-1]) and lines[1][-1] == (
      f'eval_dice {logged[4]["eval_dice"]:.4g}')
  assert '%|' not in proc.stderr and 'step/s' not in proc.stderr
  # At the end, the last evaluation's scores (a binary model: the means alone).
  assert (f'eval at step 4: dice {logged[4]["eval_dice"]:.4f}  iou {logged[4]["eval_iou"]:.4f}'
          in proc.stdout.splitlines()[-3]), proc.stdout
  assert _max_rel(_params(tmp_path / 'straight'), _params(tmp_path / 'moved')) <= DP_TOL


# --- bad input: one line, before any compute --------------------------------------------------

@pytest.mark.parametrize('overrides,message', [
    (dict(batch_size=12), 'batch_size=12 is not divisible by the 8 devices'),
    (dict(eval_batch_size=4), 'eval_batch_size=4 is not divisible by the 8 devices'),
    (dict(grad_accum_steps=3), 'batch_size=16 is not divisible by grad_accum_steps=3 x the 8 '
     'device(s): each microbatch must split evenly over the devices; use a multiple of 24 '
     '(e.g. --config.batch_size=24)'),
    (dict(grad_accum_steps=0), 'grad_accum_steps=0 must be at least 1 (1: no accumulation)'),
    ({'model.in_channels': 3}, "dataset 'synthetic_shapes' has 1-channel images but "
     'model.in_channels=3'),
    ({'data.name': 'image_folder', 'data.root': '/nonexistent/folder'},
     '/nonexistent/folder: dataset folder not found'),
    ({'data.name': 'oxford_iiit_pet'}, "dataset 'oxford_iiit_pet' is not prepared in"),
    (dict(loss='bce', **{'model.num_classes': 3}), "loss='bce' does not fit model.num_classes=3"),
    (dict(parallel='vmap'), "parallel='vmap': use 'shard_map' or 'pmap'"),
    (dict(optimizer='lamb'), "unknown optimizer 'lamb'"),
    (dict(cpu_scheduler='fast'), "cpu_scheduler='fast': use one of ('memory', 'concurrency')"),
    (dict(batch_size=-8), 'batch_size=-8 must be at least 1'),
    (dict(eval_batch_size=-8), 'eval_batch_size=-8 must be at least 1 '),
    ({'model.depth': 0}, 'model.depth=0 must be at least 1'),
    (dict(num_sample_images=-1), 'num_sample_images=-1 must be at least 0 (0: no sample images)'),
    (dict(learning_rate=-0.001), 'learning_rate=-0.001 must be positive'),
    (dict(learning_rate=float('nan')), 'learning_rate=nan must be positive'),
    (dict(warmup_steps=-5), "warmup_steps=-5 must be at least 0 (or -1: the schedule's own, "
     '50 steps for cosine, none for the others)'),
    (dict(optimizer='adamw', weight_decay=-0.1), 'weight_decay=-0.1 must be at least 0'),
    (dict(dice_weight=-1.0), 'dice_weight=-1.0 must be at least 0'),
    (dict(seed=-3), 'seed=-3 must be at least 0'),
    (dict(grad_clip_norm=-1.0), 'grad_clip_norm=-1.0 must be at least 0'),
    (dict(optimizer='rmsprop', momentum=1.0), 'momentum=1.0 must be in [0, 1)'),
    (dict(schedule='step'), "unknown schedule 'step'; use one of cosine, constant, plateau, "
     "poly"),
    (dict(schedule='poly', poly_power=-1.0), "poly_power=-1.0 must be at least 0: "
     "schedule='poly' lowers the rate as (1 - step / num_train_steps) ** poly_power"),
    (dict(nesterov=True), "nesterov=True needs optimizer='sgd' with momentum > 0, this config "
     "has optimizer='adam', momentum=0.9; set --config.optimizer=sgd --config.momentum=0.99 "
     "(nnU-Net's), or leave nesterov off"),
    (dict(nesterov=True, optimizer='sgd', momentum=0.0), "nesterov=True needs optimizer='sgd' "
     "with momentum > 0, this config has optimizer='sgd', momentum=0.0"),
    (dict(class_weights=(1.0, 2.0)), 'class_weights=(1.0, 2.0) weigh the softmax cross-entropy '
     'of 2 or more classes; with model.num_classes=1 (BCE) set --config.pos_weight instead'),
    ({'class_weights': (1.0, 2.0), 'model.num_classes': 3},
     'class_weights has 2 values but model.num_classes=3: give one weight per class'),
    ({'class_weights': (0.0, 0.0), 'model.num_classes': 2},
     'class_weights=(0.0, 0.0) must be at least 0, and not all 0'),
    ({'pos_weight': 2.0, 'model.num_classes': 2}, 'pos_weight=2.0 weighs the foreground of BCE '
     '(model.num_classes=1); with 2 classes set --config.class_weights instead'),
    (dict(pos_weight=0.0), 'pos_weight=0.0 must be positive'),
    (dict(pos_weight=2.0, balanced_class_weights=True), 'balanced_class_weights=True computes '
     'class_weights (pos_weight for one output channel) from the training pixels; leave those '
     'unset, or set them yourself without it'),
    (dict(tversky=(0.3,)), "tversky=(0.3,) must be two weights (alpha, beta), at least 0 and "
     "not both 0, e.g. --config.tversky='(0.3,0.7)'; () for the soft Dice"),
    (dict(tversky=(0.0, 0.0)), 'tversky=(0.0, 0.0) must be two weights'),
    (dict(dice_reduction='pixels'), "dice_reduction='pixels': use one of ('image', 'batch', "
     "'pooled')"),
    (dict(image_shape=(16,)), "image_shape=(16,) must be (height, width), e.g. "
     "--config.image_shape='(320,480)'; () for image_size x image_size"),
    (dict(image_shape=(1, 32)), 'image_shape=(1, 32) is below 2**model.depth=2'),
    (dict(focal_gamma=-1.0), 'focal_gamma=-1.0 must be at least 0 (0: plain cross-entropy; '
     'the focal loss paper uses 2)'),
    (dict(lovasz=True, tversky=(0.3, 0.7)), 'lovasz=True and tversky=(0.3, 0.7) both replace '
     'the Dice term; set one'),
    (dict(lovasz=True, dice_reduction='pooled'), "lovasz=True takes dice_reduction 'image' (per "
     "image) or 'batch' (over the global batch), not 'pooled'"),
    ({'lovasz': True, 'dice_include_background': False, 'model.num_classes': 3},
     "lovasz=True scores every class present in the truth (its classes='present'); "
     "dice_include_background=False is the Dice term's: leave it True"),
    (dict(ce_weight=-1.0), 'ce_weight=-1.0 must be at least 0'),
    (dict(ce_weight=0.0, dice_weight=0.0), 'ce_weight=0 and dice_weight=0 leave no loss to '
     'train; set either above 0'),
    (dict(generalized_dice=True), "generalized_dice=True weighs each class's counts by 1 / "
     "(its pixels)^2, so dice_smooth=1.0 would outweigh them and hold the term near 0; set "
     "--config.dice_smooth=1e-5 (MONAI's GeneralizedDiceLoss default)"),
    (dict(generalized_dice=True, lovasz=True), 'generalized_dice=True is a Dice term of its '
     'own: set it without --config.tversky and --config.lovasz'),
    (dict(generalized_dice=True, dice_reduction='pooled'), "generalized_dice=True weighs each "
     "class's counts: use dice_reduction 'image' or 'batch', not 'pooled' (which adds the "
     "classes together)"),
    (dict(border_weight=-1.0), "border_weight=-1.0 must be at least 0: the UNet paper's w0 "
     "(its 10; 0: off)"),
    (dict(border_sigma=0.0), "border_sigma=0.0 must be positive: the width in pixels of the "
     "UNet paper's separation term (its 5)"),
    (dict(border_weight=10.0, label_smoothing=0.1), 'border_weight=10.0 and label_smoothing=0.1: '
     'use one of them (torch defines no smoothing of a per-pixel weighted cross-entropy)'),
    (dict(label_smoothing=1.5), 'label_smoothing=1.5 must be in [0, 1] (0: hard targets; '
     'e.g. 0.1)'),
    (dict(label_smoothing=0.1, focal_gamma=2.0), 'label_smoothing=0.1 and focal_gamma=2.0: use '
     'one of them (the focal loss of smoothed targets is not defined by torch or '
     'segmentation_models_pytorch)'),
    ({'plateau.factor': 1.0}, "plateau.factor=1.0 must be in (0, 1): the learning rate's factor"),
    ({'plateau.patience': -1}, 'plateau.patience=-1 must be at least 0'),
    ({'data.worker_count': -1}, 'data.worker_count=-1 must be at least 0'),
    ({'data.sampling': 'random'}, "data.sampling='random' is unknown; use 'epochs' (the "
     "training split shuffled anew for each pass) or 'replacement' (each example drawn on its "
     "own, as nnU-Net)"),
    (dict(num_epochs=-1.0), 'num_epochs=-1 must be at least 0 (0: train for num_train_steps)'),
    ({'data.resample': 'lanczos'}, "data.resample='lanczos': use one of ('bilinear', 'bicubic')"),
    ({'data.holdout_percent': 100.0}, "data.holdout_percent=100 must be above 0 and below 100: "
     "the share of an image folder's pairs held out for evaluation"),
    ({'data.num_folds': 1}, 'data.num_folds=1 must be 2 or more (k-fold cross-validation), '
     'or 0: hold out data.holdout_percent instead'),
    ({'data.num_folds': 5, 'data.fold': 5}, 'data.fold=5 must be in 0..4: which of the '
     'data.num_folds=5 blocks is held out'),
    ({'data.fold': 2}, 'data.fold=2 picks one of data.num_folds blocks, which is 0 (off); set '
     '--config.data.num_folds (e.g. 5)'),
    ({'data.num_folds': 5, 'data.holdout_percent': 20.0}, 'data.num_folds=5 holds out one fold, '
     '1/5 of the pairs, and data.holdout_percent=20 another share; set one of them'),
    ({'data.fold_seed': 12345}, 'data.fold_seed=12345 shuffles the pairs before data.num_folds '
     'folds are cut, which is 0 (off); set --config.data.num_folds (e.g. 5)'),
    ({'data.num_folds': 5, 'data.fold_seed': -2}, "data.fold_seed=-2 must be -1 (contiguous "
     "folds) or a seed in 0..2**32-1 (12345: nnU-Net's folds)"),
    ({'data.num_folds': 5, 'data.fold_seed': 2**32}, 'data.fold_seed=4294967296 must be -1'),
    ({'augment.elastic_sigma': -1.0}, "augment.elastic_sigma=-1.0 must be at least 0: the "
     "grid's displacements' standard deviation in pixels (the UNet paper's 10; 0: off)"),
    ({'augment.elastic_grid': 1}, "augment.elastic_grid=1 must be at least 2: the nodes per "
     "side of the displacements' grid (the UNet paper's 3)"),
    ({'augment.elastic_prob': 1.5}, 'augment.elastic_prob=1.5 must be in [0, 1]: the share of '
     'examples augment.elastic_sigma applies to (1: every one)'),
    ({'augment.rotate_degrees': 200.0}, 'augment.rotate_degrees=200.0 must be in [0, 180]: '
     'angles are drawn from [-rotate_degrees, rotate_degrees] (0: off)'),
    (dict(crop_size=32), 'crop_size=32 must be between 2**model.depth=2 and the smaller side '
     'of image_size=16 (the crops are cut from the resized examples); 0: train on the whole '
     'examples'),
    (dict(crop_size=-8), 'crop_size=-8 must be at least 0 (0: the whole examples)'),
    (dict(crop_foreground=1.5, crop_size=8), 'crop_foreground=1.5 must be in [0, 1]: the '
     'share of crops centred on a foreground pixel'),
    (dict(crop_foreground=0.33), "crop_foreground=0.33 centres some of crop_size's patches on "
     'the foreground, but crop_size is 0 (whole examples); set --config.crop_size'),
    (dict(crop_foreground=0.03, crop_size=8), 'crop_foreground=0.03 centres none of a batch of '
     '16 on the foreground: as nnU-Net, it centres the patches at positions round(16 x (1 - '
     '0.03)) = 16 and after; raise it, or set --config.crop_foreground_random=True to draw for '
     'each patch'),
    ({'augment.gamma': (1.5, 0.7)}, "augment.gamma=(1.5, 0.7) must be (low, high) with 0 < low "
     "<= high, e.g. --config.augment.gamma='(0.7,1.5)' (nnU-Net's); () for none"),
    (dict(poly_every_steps=0), "poly_every_steps=0 must be at least 1: the steps between "
     "lowerings of the poly schedule (nnU-Net's 250: once per epoch)"),
    (dict(dice_smooth=0.0), "dice_smooth=0.0 must be positive: a class absent from an image "
     "and its prediction scores (0 + dice_smooth) / (0 + dice_smooth) = 1 (nnU-Net's 1e-5, "
     "milesial's 1e-6)"),
    ({'augment.gamma_prob': 1.5}, 'augment.gamma_prob=1.5 must be in [0, 1]: the share of '
     'examples augment.gamma applies to (1: every one)'),
    ({'augment.noise': -0.1}, 'augment.noise=-0.1 must be at least 0: the largest standard '
     'deviation of the Gaussian noise (0: none)'),
    ({'data.normalize': 'percentile'}, "data.normalize='percentile' is unknown; use 'unit' "
     "(images scaled to [0, 1]), 'zscore' (then each image's channels to mean 0, deviation 1), "
     "'minmax' (then each image's channels stretched to [0, 1]) or 'ct' (nnU-Net's CT "
     "normalisation, by the training foreground's statistics)"),
    ({'data.normalize': 'ct', 'augment.brightness': 0.2}, "augment.brightness with "
     "augment.intensity_recipe='jitter' clips to [0, 1], which data.normalize='ct' images "
     "are not in; set augment.intensity_recipe='nnunet' (unclipped, as nnU-Net on its normalised "
     "images) or augment.brightness=0"),
    ({'data.normalize': 'zscore', 'augment.contrast': 0.2}, "augment.contrast with "
     "augment.intensity_recipe='jitter' clips to [0, 1], which data.normalize='zscore' images "
     "are not in; set augment.intensity_recipe='nnunet' (unclipped, as nnU-Net on its normalised "
     "images) or augment.contrast=0"),
    ({'augment.intensity_recipe': 'monai'}, "augment.intensity_recipe='monai' is unknown; use "
     "'jitter' (torchvision's ColorJitter, MONAI's gamma and noise) or 'nnunet'"),
    ({'augment.inverted_gamma_prob': 0.1, 'augment.gamma': (0.7, 1.5)},
     "augment.inverted_gamma_prob=0.1 is nnU-Net's gamma of the inverted image: it needs "
     "augment.intensity_recipe='nnunet' and an augment.gamma range"),
    ({'augment.inverted_gamma_prob': 1.5, 'augment.gamma': (0.7, 1.5),
      'augment.intensity_recipe': 'nnunet'}, 'augment.inverted_gamma_prob=1.5 must be in [0, 1]: '
     'the share of examples the gamma of the inverted image applies to (1: every one)'),
    ({'augment.blur': (0.5, 1.0)}, "augment.blur=(0.5, 1.0) is nnU-Net's Gaussian blur: it "
     "needs augment.intensity_recipe='nnunet'"),
    ({'augment.blur': (1.0, 0.5), 'augment.intensity_recipe': 'nnunet'}, "augment.blur=(1.0, "
     "0.5) must be (low, high) with 0 < low <= high (nnU-Net's Gaussian blur: a sigma in pixels "
     "drawn from it), e.g. --config.augment.blur='(0.5,1.0)' (nnU-Net's); () for none"),
    ({'augment.low_resolution': (0.5, 2.0), 'augment.intensity_recipe': 'nnunet'},
     "augment.low_resolution=(0.5, 2.0) must be (low, high) with 0 < low <= high <= 1 "
     "(nnU-Net's low-resolution simulation: a scale drawn from it), e.g. "
     "--config.augment.low_resolution='(0.5,1.0)' (nnU-Net's); () for none"),
    ({'augment.low_resolution': (0.5, 1.0)}, "augment.low_resolution=(0.5, 1.0) is nnU-Net's "
     "low-resolution simulation: it needs augment.intensity_recipe='nnunet'"),
    ({'augment.blur_prob': -0.2}, 'augment.blur_prob=-0.2 must be in [0, 1]: the share of '
     'examples augment.blur applies to (1: every one)'),
    ({'augment.low_resolution_channel_prob': 2.0}, 'augment.low_resolution_channel_prob=2.0 '
     "must be in [0, 1]: the share of an example's channels augment.low_resolution applies to "
     '(1: every one)'),
    ({'augment.scale': (1.4, 0.7)}, "augment.scale=(1.4, 0.7) must be (low, high) with 0 < "
     "low <= high: a size factor drawn from it, e.g. --config.augment.scale='(0.7,1.4)'; () for "
     "none"),
    ({'augment.rotate_prob': 1.2, 'augment.rotate_degrees': 10.0}, 'augment.rotate_prob=1.2 '
     'must be in [0, 1]: the share of examples augment.rotate_degrees applies to (1: every one)'),
    ({'augment.min_scale': 1.5}, 'augment.min_scale=1.5 must be in (0, 1]'),
    ({'augment.min_scale': 0.0}, 'augment.min_scale=0.0 must be in (0, 1]'),
    ({'augment.contrast': 1.0}, 'augment.contrast=1.0 must be in [0, 1): factors are drawn '
     'from [1 - contrast, 1 + contrast]'),
    (dict(ema_decay=1.0), 'ema_decay=1.0 must be in [0, 1) (0: no moving average'),
    *[(dict(profile_steps=steps), f'profile_steps={steps} must be (first, last), steps of the '
       'run with 1 <= first <= last <= num_train_steps=6, e.g. '
       "--config.profile_steps='(10,12)' (after the first step's compilation); () for none")
      for steps in ((0, 2), (3, 2), (5, 7), (3,))],
    (dict(num_epochs=0.01, profile_steps=(3, 2)), 'profile_steps=(3, 2) must be (first, last), '
     "steps of the run with 1 <= first <= last, e.g. --config.profile_steps='(10,12)'"),
    (dict(num_epochs=0.01, profile_steps=(3, 3)), 'profile_steps=(3, 3) must be (first, last), '
     'steps of the run with 1 <= first <= last <= num_train_steps=2, e.g.'),
    ({'data.native_size': 100}, 'data.native_size=100: synthetic_shapes comes in 64, 128, 480'),
    ({'data.eval_split': 'validation'},
     "dataset 'synthetic_shapes' has no split 'validation' (it has test, train); set "
     '--config.data.eval_split'),
    ({'data.image_key': 'img'},
     "dataset 'synthetic_shapes' has no feature 'img' (it has image, mask); set "
     '--config.data.image_key'),
    ({'data.mask_offset': 1}, 'data.mask_offset=1 takes mask value 0 to -1, below 0'),
    ({'data.class_names': ('background', 'pet', 'border')}, 'data.class_names names 3 '
     'class(es) but there are 2 (model.num_classes=1); name each class once, in class-id order'),
    ({'data.class_names': ('background,pet',)}, 'data.class_names names 1 class(es) but there '
     'are 2 (model.num_classes=1); name each class once, in class-id order, as a tuple: '
     '--config.data.class_names="(\'a\', \'b\')"'),
    ({'data.class_names': ('background', '')}, "data.class_names=('background', '') must be "
     "one non-empty name per class, e.g. ('background', 'liver')"),
    (dict(init_from='/nonexistent/ckpt'), 'init_from: /nonexistent/ckpt: no such checkpoint '
     'directory'),
    (dict(init_from=__file__), f'init_from: {__file__}: unknown file type; expected one of '
     '.pth, .pt, .bin, .ckpt, .safetensors'),
])
def test_bad_config_is_refused_before_compute(tmp_path, overrides, message):
  config = tiny_config(**overrides)
  with pytest.raises(UserError, match=re.escape(message)):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()


@pytest.mark.parametrize('overrides,message', [
    (dict(batch_size=1, image_size=2), 'batch_size=1 gives 1 image at image_size=2, whose 1x1 '
     'bottom level (model.depth=1) leaves BatchNorm one value per channel, which PyTorch refuses '
     'in training too; use 2 or more images per step, or image_size=4 or more'),
    (dict(batch_size=2, grad_accum_steps=2, image_size=3), 'batch_size=2 gives 1 image per '
     'microbatch (grad_accum_steps=2) at image_size=3, whose 1x1 bottom level'),
    (dict(batch_size=1, image_size=16, crop_size=2), 'batch_size=1 gives 1 image at '
     'crop_size=2, whose 1x1 bottom level (model.depth=1) leaves BatchNorm one value per '
     'channel, which PyTorch refuses in training too; use 2 or more images per step, or '
     'crop_size=4'),
])
def test_one_value_per_channel_for_batch_norm_is_refused(overrides, message):
  # Reachable on one device only (on more, each holds at least one image of the microbatch).
  mesh = parallel.make_mesh(jax.devices()[:1])
  with pytest.raises(UserError, match=re.escape(message)):
    config_checks.validate_config(tiny_config(**overrides), mesh)
  # One more image, or a 2x2 bottom level, is allowed.
  config_checks.validate_config(tiny_config(batch_size=2, image_size=2), mesh)
  config_checks.validate_config(tiny_config(batch_size=1, image_size=4), mesh)


def test_loss_options_reach_the_train_step(tmp_path):
  # The same first step, its Dice term smoothed by 1 pixel or by nnU-Net's 1e-5: the logged
  # cross-entropy is the same, the Dice term not (tested against nnU-Net's formula in
  # test_losses); its targets smoothed: the other way round (against torch's there); the
  # Lovász loss in the Dice's place (test_lovasz), and the generalized Dice.
  logged = []
  for i, fields in enumerate([dict(dice_smooth=1.0), dict(dice_smooth=1e-5),
                              dict(label_smoothing=0.1), dict(lovasz=True),
                              {'generalized_dice': True, 'model.num_classes': 2,
                               'dice_smooth': 1e-5},
                              {'model.num_classes': 2, 'dice_smooth': 1e-5},
                              dict(ce_weight=0.0, dice_weight=2.0),
                              dict(border_weight=10.0)]):
    workdir = tmp_path / f'wd{i}'
    train.train_and_evaluate(tiny_config(num_train_steps=1, eval_every_steps=1,
                                         num_sample_images=0, **fields), str(workdir))
    logged.append(json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[0]))
  assert logged[0]['ce_loss'] == logged[1]['ce_loss']
  assert abs(logged[0]['dice_loss'] - logged[1]['dice_loss']) > 1e-4
  assert logged[0]['dice_loss'] == logged[2]['dice_loss']
  assert abs(logged[0]['ce_loss'] - logged[2]['ce_loss']) > 1e-3
  assert logged[0]['ce_loss'] == logged[3]['ce_loss']  # the Lovász term in the Dice's place
  assert abs(logged[0]['dice_loss'] - logged[3]['dice_loss']) > 1e-3
  assert logged[4]['ce_loss'] == logged[5]['ce_loss']
  assert abs(logged[4]['dice_loss'] - logged[5]['dice_loss']) > 1e-3
  # The cross-entropy weighed 0: the loss is the Dice term's alone (the cross-entropy logged).
  assert logged[6]['ce_loss'] == logged[0]['ce_loss']
  np.testing.assert_allclose(logged[6]['loss'], 2.0 * logged[6]['dice_loss'], rtol=1e-6)
  np.testing.assert_allclose(logged[0]['loss'], logged[0]['ce_loss'] + logged[0]['dice_loss'],
                             rtol=1e-6)
  # The UNet paper's weight map: the cross-entropy weighed, the Dice term not.
  assert logged[7]['dice_loss'] == logged[0]['dice_loss']
  assert abs(logged[7]['ce_loss'] - logged[0]['ce_loss']) > 1e-4


def test_cli_errors_are_one_line(tmp_path):
  env = _env(8)
  proc = subprocess.run(_train_cmd(tmp_path / 'wd', '--config.batch_size=12'), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: batch_size=12 is not divisible')
  proc = subprocess.run(_train_cmd(tmp_path / 'wd', '--config.modle.depth=3'), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'modle' in proc.stderr
  assert not (tmp_path / 'wd').exists()


def _converted_reference(tmp_path, cls=SeedUNet):
  """A PyTorch reference UNet of tiny_config's shape, off its initialisation, converted."""
  ref = move_off_init(cls(1, 1, base=4, depth=1), 1, 1, hw=(16, 16))
  torch.save(ref.state_dict(), tmp_path / 'ref.pth')
  return torch_to_flax(str(tmp_path / 'ref.pth'), str(tmp_path / 'converted'))


def test_init_from_starts_from_those_weights_and_a_resume_from_its_own(tmp_path):
  # milesial's layout, which the way back (flax-to-torch) then takes by default.
  converted = _converted_reference(tmp_path, MilesialUNet)
  _, want = load_pretrained(converted)
  config = tiny_config(init_from=converted, num_train_steps=1, schedule='constant',
                       learning_rate=1e-12)
  mesh = parallel.make_mesh(jax.devices()[:2])
  initial, layout = train.load_initial_weights(config, train.build_model(config, parallel.AXIS))
  assert layout == 'milesial'
  state = train.create_train_state(config, train.build_model(config, parallel.AXIS), mesh,
                                   initial)
  assert int(state.step) == 0
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((want['params'], want['batch_stats'])), strict=True):
    np.testing.assert_array_equal(a, b)
  # The PyTorch file itself, converted in memory, gives the same.
  from_file, layout = train.load_initial_weights(
      tiny_config(init_from=str(tmp_path / 'ref.pth')), train.build_model(config, parallel.AXIS))
  assert layout == 'milesial'
  for a, b in zip(jax.tree.leaves(from_file), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  # Through the loop: one step at a vanishing learning rate stays at the converted weights.
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  for a, b in zip(jax.tree.leaves(_params(tmp_path / 'wd')['params']),
                  jax.tree.leaves(want['params']), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
  # A resume takes its own checkpoint, and does not need init_from any more.
  shutil.rmtree(converted)
  config.num_train_steps = 2
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert load_pretrained_with_metadata(str(tmp_path / 'wd'))[2]['step'] == 2
  # Back to PyTorch in the layout it came from (kept through the resume): milesial's class
  # loads it strictly (its predict.py pops mask_values first, as here).
  flax_to_torch(str(tmp_path / 'wd'), str(tmp_path / 'back.pth'))
  state_dict = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert state_dict.pop('mask_values') == [0, 1]
  MilesialUNet(1, 1, base=4, depth=1).load_state_dict(state_dict, strict=True)


def test_init_new_head_fine_tunes_weights_trained_for_other_classes(tmp_path):
  # milesial's pretrained Carvana UNet has 2 classes; fine-tuned here for 3.
  ref = move_off_init(MilesialUNet(1, 2, base=4, depth=1), 1, 2, hw=(16, 16))
  torch.save(ref.state_dict(), tmp_path / 'ref.pth')
  _, want = load_pretrained(torch_to_flax(str(tmp_path / 'ref.pth'), str(tmp_path / 'conv')))
  config = tiny_config(init_from=str(tmp_path / 'ref.pth'), **{'model.num_classes': 3})
  model = train.build_model(config, parallel.AXIS)
  with pytest.raises(UserError, match=re.escape(
      "this config's has num_classes=3; set --config.model.num_classes=2 (or "
      "--config.init_new_head=True to start the output layer anew, for this config's 3 "
      'classes)')):
    train.load_initial_weights(config, model)
  config.init_new_head = True
  initial, layout = train.load_initial_weights(config, model)
  assert layout == 'milesial' and 'out_conv' not in initial['params']
  state = train.create_train_state(config, model, parallel.make_mesh(jax.devices()[:2]),
                                   initial)
  # Every layer but the output one from the file; that one as a new run draws it.
  fresh = train.init_variables(model, jax.random.key(config.seed))
  got = {'params': state.params, 'batch_stats': state.batch_stats}
  for path, value in jax.tree_util.tree_leaves_with_path(got):
    source = fresh if path[1].key == 'out_conv' else want
    np.testing.assert_array_equal(value, functools.reduce(lambda t, k: t[k.key], path, source))
  assert state.params['out_conv']['conv']['kernel'].shape[-1] == 3
  # It needs init_from.
  with pytest.raises(UserError, match='^init_new_head=True draws the output layer anew for '
                     'weights taken with init_from, which is not set'):
    config_checks.validate_config(tiny_config(init_new_head=True), parallel.make_mesh())


def test_init_from_a_different_model_is_one_line_before_compute(tmp_path):
  converted = _converted_reference(tmp_path)
  config = tiny_config(init_from=converted, **{'model.base_features': 8, 'model.depth': 2})
  with pytest.raises(UserError, match=r'its weights are for a UNet with base_features=4, '
                     r"depth=1, this config's has base_features=8, depth=2; set "
                     r'--config.model.base_features=4 --config.model.depth=1$'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()


def test_plateau_schedule_and_best_checkpoint_across_a_resume(tmp_path, capfd):
  # An evaluation and a checkpoint every step, patience 1: at this rate the tiny model's Dice
  # jumps, then falls back and climbs slowly, so the rate halves after the third step, and
  # the best checkpoint is the first.
  flags = {'schedule': 'plateau', 'learning_rate': 0.1, 'eval_every_steps': 1,
           'checkpoint_every_steps': 1, 'keep_checkpoints': 1, 'num_sample_images': 0,
           'plateau.patience': 1, 'plateau.factor': 0.5, 'num_train_steps': 4}
  config = tiny_config(**flags)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  out = capfd.readouterr().out
  assert 'not improved for more than 1 evaluation: learning rate 0.1 -> 0.05' in out
  assert 'best by eval Dice: step 1, as ' in out

  def rows(workdir):
    return [{k: r[k] for k in ('step', 'learning_rate', 'eval_dice')}
            for r in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())]

  # torch's ReduceLROnPlateau, told the run's eval Dice after each step, sets the rates the
  # run logged (each row's rate is the one its step used).
  torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
  torch_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
      torch_opt, 'max', factor=0.5, patience=1)
  straight = rows(tmp_path / 'straight')
  for row in straight:
    np.testing.assert_allclose(row['learning_rate'], torch_opt.param_groups[0]['lr'], rtol=1e-6)
    torch_plateau.step(row['eval_dice'])
  assert straight[-1]['learning_rate'] <= config.learning_rate / 2
  # 3 steps, then resumed to 4: the plateau's state comes back with the checkpoint.
  train.train_and_evaluate(tiny_config(**dict(flags, num_train_steps=3)),
                           str(tmp_path / 'resumed'))
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert rows(tmp_path / 'resumed') == straight
  for a, b in zip(jax.tree.leaves(_params(tmp_path / 'resumed')),
                  jax.tree.leaves(_params(tmp_path / 'straight')), strict=True):
    np.testing.assert_array_equal(a, b)
  # The best step outlives the resume (before, only the run that scored it knew it was best,
  # and the resumed run's first save deleted it), and `checkpoints/best` names it.
  assert max(straight, key=lambda r: r['eval_dice'])['step'] == 1
  for run in ('straight', 'resumed'):
    assert sorted(os.listdir(tmp_path / run / 'checkpoints')) == ['1', '4']
    _, best, meta = load_pretrained_with_metadata(str(tmp_path / run / 'checkpoints' / 'best'))
    assert meta['step'] == 1
    _, first, _ = load_pretrained_with_metadata(str(tmp_path / 'straight' / 'checkpoints' / '1'))
    for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(first), strict=True):
      np.testing.assert_array_equal(a, b)


def test_plateau_lowering_in_a_warmup_names_the_rates_the_steps_use(tmp_path, capfd):
  # Patience 0 in a 10-step warmup: the printed lowering's rates are the next step's, at the
  # old and the new scale (they were learning_rate's, 0.1 -> 0.05, whatever the warmup).
  config = tiny_config(schedule='plateau', learning_rate=0.1, warmup_steps=10,
                       eval_every_steps=1, checkpoint_every_steps=100, num_sample_images=0,
                       num_train_steps=5, **{'plateau.patience': 0, 'plateau.factor': 0.5})
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  lowered = re.findall(r'learning rate (\S+) -> (\S+)\n', capfd.readouterr().out)
  rows = [json.loads(r) for r in (tmp_path / 'wd' / 'metrics.jsonl').read_text().splitlines()]
  rates = [r['learning_rate'] for r in rows]
  assert lowered, rates
  for old, new in lowered:
    # The step after the lowering used the new rate; without it, twice that.
    after = rates.index(float(new))
    assert after > 0 and float(old) == pytest.approx(2 * float(new), rel=1e-6)
    assert float(old) < config.learning_rate


def test_early_stopping_saves_stops_and_counts_on_after_a_resume(tmp_path, capfd):
  # At this rate the tiny model's Dice jumps at step 1, then falls back (as in the plateau
  # test): patience 2 stops the run at step 3, with a checkpoint there.
  config = tiny_config(learning_rate=0.1, schedule='constant', eval_every_steps=1,
                       checkpoint_every_steps=10, num_sample_images=0, early_stop_patience=2)
  workdir = tmp_path / 'wd'
  train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(r) for r in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3]
  best = rows[0]['eval_dice']
  assert max(r['eval_dice'] for r in rows) == best
  assert (f'eval Dice has not improved on {best:.4f} for 2 evaluations: stopped early at '
          'step 3') in capfd.readouterr().out
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  # The same command again: still stopped, nothing trained.
  train.train_and_evaluate(config, str(workdir))
  assert 'stopped early at step 3 (early_stop_patience=2); nothing to do' in capfd.readouterr().out
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 3
  # A larger patience trains on, counting on from the checkpoint's 2 evaluations without a
  # gain: the next one without makes 3 (a count started afresh would not stop there).
  config.early_stop_patience = 3
  train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(r) for r in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3, 4] and rows[3]['eval_dice'] < best
  assert 'for 3 evaluations: stopped early at step 4' in capfd.readouterr().out


def test_a_resume_with_another_batch_size_continues_the_data_stream(tmp_path, monkeypatch, capfd):
  # The checkpoint records the examples consumed: 2 steps of 8, then steps of 16 from example
  # 16 (before, the stream restarted at step x the new batch size, skipping examples 16 to 31).
  first_batches = []
  real = input_pipeline.train_dataset

  def spy(source, config, *args):
    first_batches.append(None)

    def batches():
      for i, batch in enumerate(real(source, config, *args)):
        if i == 0:
          first_batches[-1] = (source, batch)
        yield batch
    return batches()

  monkeypatch.setattr(input_pipeline, 'train_dataset', spy)
  config = tiny_config(batch_size=8, eval_batch_size=16, num_train_steps=2,
                       checkpoint_every_steps=2, eval_every_steps=10, num_sample_images=0)
  workdir = str(tmp_path / 'wd')
  train.train_and_evaluate(config, workdir)
  config.batch_size, config.num_train_steps = 16, 3
  train.train_and_evaluate(config, workdir)
  assert ('batch_size is now 16: the data continues after the 16 examples the checkpoint '
          'consumed') in capfd.readouterr().out
  source, resumed = first_batches[-1]
  config.batch_size, config.num_train_steps = 8, 4
  stream = list(real(source, config))  # batches of 8 from the start
  np.testing.assert_array_equal(resumed['image'], np.concatenate(
      [stream[2]['image'], stream[3]['image']]))
  np.testing.assert_array_equal(resumed['mask'], np.concatenate(
      [stream[2]['mask'], stream[3]['mask']]))
  saved = TrainCheckpoints(workdir, 2)
  assert saved.saved_meta(3)['examples_seen'] == 16 + 16
  saved.close()


def test_non_square_images_train_evaluate_predict_and_export_at_their_shape(tmp_path, capsys):
  # image_shape=(height, width): 16x32 examples (2:1, as Cityscapes), not squashed to a square.
  workdir = tmp_path / 'wd'
  config = tiny_config(image_shape=(16, 32), num_train_steps=2, eval_every_steps=2,
                       checkpoint_every_steps=2)
  metrics = train.train_and_evaluate(config, str(workdir))
  assert '2048 training, 204 eval images at 16x32' in capsys.readouterr().out
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['eval_dice'] == metrics['dice']
  sample = Image.open(workdir / 'samples' / 'step_0000002.png')
  assert sample.size == (3 * 32 + 2 * 2, 2 * (16 + 2))  # 2 rows of image | truth | prediction
  # evaluate scores it as the run did (its preprocessing at 16x32), and says the shape.
  got = evaluate_checkpoint(str(workdir))
  assert got['dice'] == metrics['dice'] and got['image_size'] == [16, 32]
  # The recorded size is what predict and export take by default.
  model, variables, meta = load_pretrained_with_metadata(str(workdir))
  assert meta['image_size'] == [16, 32]
  image = (np.random.default_rng(1).random((40, 70)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert predict_main(['--checkpoint', str(workdir), str(tmp_path / 'x.png'),
                       '--output', str(tmp_path / 'out'), '--probabilities']) == 0
  assert 'the network saw each image at 16x32, the training image_size' in \
      capsys.readouterr().out
  written = np.asarray(Image.open(tmp_path / 'out' / 'x_mask.png'))
  # (in, as training resizes: PIL's bilinear filter to 32 wide, 16 high; out, the logits back)
  small = np.asarray(Image.fromarray(image).resize((32, 16), Image.BILINEAR), np.float32) / 255
  logits = np.asarray(model.apply(variables, small[None, ..., None], train=False))[0, ..., 0]
  back = np.asarray(Image.fromarray(logits).resize((70, 40), Image.BILINEAR))
  assert written.shape == (40, 70)
  np.testing.assert_array_equal(written, np.where(back > 0, 255, 0))
  # (The masks of a 2-step model may be all background: the probabilities tell more.)
  np.testing.assert_allclose(np.load(tmp_path / 'out' / 'x_prob.npy')[..., 0],
                             1 / (1 + np.exp(-back)), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(predict(model, variables, image[..., None], size=(16, 32)),
                                back > 0)
  data, about = export_checkpoint(str(workdir))
  assert (about['size'], about['height'], about['width']) == ([16, 32], 16, 32)
  assert about['resample'] == 'bilinear'  # (how the run resized its images)
  assert 'class_names' not in about  # (the run named no classes)
  x = np.random.default_rng(0).random((3, 16, 32, 1), np.float32)
  np.testing.assert_allclose(jax.export.deserialize(data).call(x),
                             model.apply(variables, x, train=False), rtol=1e-5, atol=1e-6)


def test_ema_run_evaluates_serves_and_resumes_its_average(tmp_path):
  import orbax.checkpoint as ocp
  flags = dict(ema_decay=0.5, schedule='constant', eval_every_steps=2, checkpoint_every_steps=1,
               num_sample_images=2)
  workdir = tmp_path / 'wd'
  train.train_and_evaluate(tiny_config(num_train_steps=1, **flags), str(workdir))
  train.train_and_evaluate(tiny_config(num_train_steps=2, **flags), str(workdir))
  first, last = (ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / n / 'state')
                 for n in ('1', '2'))
  # The resumed run averaged on from the saved average: step 2's is 0.5 x step 1's + 0.5 x
  # step 2's weights (BatchNorm statistics too).
  for avg, before, now in zip(jax.tree.leaves(last['ema']), jax.tree.leaves(first['ema']),
                              jax.tree.leaves({k: last[k] for k in ('batch_stats', 'params')}),
                              strict=True):
    np.testing.assert_allclose(avg, 0.5 * before + 0.5 * now, rtol=1e-6, atol=1e-7)
  # What readers load is the average, not the last weights: the checkpoint holds both.
  _, served, _ = load_pretrained_with_metadata(str(workdir))
  for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(last['ema']), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _max_rel(last['ema']['params'], last['params']) > 1e-3
  # ... and the run's evaluation scored the same weights.
  logged = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])
  got = evaluate_checkpoint(str(workdir))
  assert {k: got[k] for k in ('dice', 'iou')} == {k: logged[f'eval_{k}'] for k in ('dice', 'iou')}
  # An export serves the average too, at the run's image_size by default.
  data, about = export_checkpoint(str(workdir))
  assert about['size'] == 16 and about['step'] == 2
  x = np.random.default_rng(0).random((2, 16, 16, 1), np.float32)
  model = train.build_model(tiny_config(), None)
  np.testing.assert_allclose(jax.export.deserialize(data).call(x),
                             model.apply(last['ema'], x, train=False), rtol=1e-5, atol=1e-6)
  # Turning the average off (or on) for a resume is refused: the state has another form.
  with pytest.raises(UserError, match='was saved by a run with ema_decay=0.5, this config has '
                     'ema_decay=0.0; rerun with its settings'):
    train.train_and_evaluate(tiny_config(num_train_steps=3, **dict(flags, ema_decay=0.0)),
                             str(workdir))

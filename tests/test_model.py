"""The Flax modules on their own: sizes, shapes, and the pieces PyTorch defines precisely."""

import os
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import USER_LEVEL, max_rel_err, nchw, nhwc
from torch_reference import MilesialUNet, SeedUNet

from unet_jax import UNet, init_variables
from unet_jax.checkpoint import abstract_variables
from unet_jax.model import BatchNorm, upsample_bilinear_align_corners


def n_params(model: UNet) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_variables(model)['params']))


def test_seed_parameter_counts():
  # Numbers stated by the seed article (SEED.md); eval_shape allocates nothing.
  assert n_params(UNet()) == 31_036_481
  assert n_params(UNet(in_channels=3, num_classes=2)) == 31_037_698


@pytest.mark.parametrize('kwargs,ref', [
    (dict(upsample='bilinear'), lambda: MilesialUNet(1, 1, bilinear=True)),
    (dict(in_channels=3, num_classes=2, conv_bias=True),
     lambda: MilesialUNet(3, 2, bias=True)),
    (dict(base_features=16, depth=3), lambda: SeedUNet(1, 1, base=16, depth=3)),
    (dict(base_features=8, depth=5, upsample='bilinear'),
     lambda: MilesialUNet(1, 1, bilinear=True, base=8, depth=5)),
])
def test_parameter_counts_match_pytorch(kwargs, ref):
  assert n_params(UNet(**kwargs)) == sum(p.numel() for p in ref().parameters())


@pytest.mark.parametrize('hw', [(480, 480), (37, 45), (16, 16), (17, 64), (100, 31)])
@pytest.mark.parametrize('upsample', ['transpose', 'bilinear'])
def test_output_has_input_size_for_any_size(hw, upsample):
  model = UNet(in_channels=3, num_classes=4, upsample=upsample)
  x = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
  variables = abstract_variables(model)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert out.shape == (2, *hw, 4)


def test_init_variables_equals_model_init():
  # The compiled initialisation (smallest input, lower LLVM level on CPU) draws the variables of
  # a plain jitted model.init on another input, to the bit. (Traced inside a caller's jit, as
  # train.create_train_state does, it is tested in test_step_compilation.)
  model = UNet(in_channels=3, num_classes=2, base_features=4, depth=2, upsample='bilinear',
               conv_bias=True, axis_name='data')
  key = jax.random.key(7)
  x = jnp.zeros((2, 20, 24, model.in_channels))
  want = jax.jit(lambda k: model.clone(axis_name=None).init(k, x, train=False)).lower(
      key).compile(USER_LEVEL)(key)
  got = init_variables(model, key)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrong_channel_count_is_a_clear_error():
  model = UNet(in_channels=3)
  msg = r'expects NHWC input with 3 channels, got shape \(1, 8, 8, 1\)'
  with pytest.raises(ValueError, match=msg):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False))


def test_too_small_input_is_a_clear_error():
  model = UNet()
  with pytest.raises(ValueError, match='UNet of depth 4 needs H and W of at least 16, got 15x40'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 15, 40, 1)), train=False))


@pytest.mark.parametrize('field', ['in_channels', 'num_classes', 'base_features', 'depth'])
def test_empty_model_sizes_are_a_clear_error(field):
  # num_classes=0 raised ZeroDivisionError in an initialiser, depth=0 an indexing error.
  model = UNet(**{'in_channels': 1, field: 0})
  with pytest.raises(ValueError, match=f'UNet {field} must be at least 1, got 0'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False))


def test_batchnorm_matches_torch_over_several_train_steps():
  torch_bn = torch.nn.BatchNorm2d(5)
  with torch.no_grad():
    torch_bn.weight.uniform_(0.5, 1.5)
    torch_bn.bias.uniform_(-1, 1)
  bn = BatchNorm()
  variables = {'params': {'scale': torch_bn.weight.detach().numpy(),
                          'bias': torch_bn.bias.detach().numpy()},
               'batch_stats': {'mean': np.zeros(5, np.float32), 'var': np.ones(5, np.float32)}}
  for step in range(3):
    x = torch.randn(3, 5, 7, 6) * (step + 1) + step
    want = torch_bn.train()(x)
    got, updates = bn.apply(variables, nhwc(x), train=True, mutable=['batch_stats'])
    variables = {**variables, **updates}
    assert max_rel_err(got, nhwc(want)) < 1e-5
    np.testing.assert_allclose(variables['batch_stats']['mean'], torch_bn.running_mean, rtol=1e-5,
                               atol=1e-6)
    # The unbiased variance in the running update is what sets PyTorch apart from flax.
    np.testing.assert_allclose(variables['batch_stats']['var'], torch_bn.running_var, rtol=1e-5)
  x = torch.randn(2, 5, 4, 4)
  got = bn.apply(variables, nhwc(x), train=False)
  assert max_rel_err(got, nhwc(torch_bn.eval()(x))) < 1e-5


def test_batchnorm_refuses_one_value_per_channel_in_training_as_torch_does():
  # torch: "Expected more than 1 value per channel when training"; before, the UNet normalised
  # the single value to the bias and trained on. Two values (two images of 1x1) are fine.
  model = UNet(1, 1, base_features=2, depth=2)
  variables = init_variables(model, jax.random.key(0))
  one = jnp.ones((1, 4, 7, 1))  # the bottom level is 1x1
  with pytest.raises(ValueError, match=re.escape(
      'Expected more than 1 value per channel when training, got input size (1, 1, 1, 8) '
      '(NHWC) at BatchNorm down2/conv/norm1; use a batch of more than one image')):
    model.apply(variables, one, train=True, mutable=['batch_stats'])
  with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
    torch.nn.BatchNorm2d(8).train()(torch.ones(1, 8, 1, 1))
  # Under a mapped axis the count is the global batch's: one image per member of an axis of 2.
  bottom = BatchNorm()
  bn_vars = bottom.init(jax.random.key(0), jnp.ones((1, 1, 1, 3)), train=False)
  synced = jax.vmap(lambda x: bottom.clone(axis_name='b').apply(
      bn_vars, x, train=True, mutable=['batch_stats'])[0], axis_name='b')
  assert synced(jnp.arange(6.0).reshape(2, 1, 1, 1, 3)).shape == (2, 1, 1, 1, 3)
  with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
    synced(jnp.ones((1, 1, 1, 1, 3)))
  two = jnp.concatenate([one, -one])
  logits, _ = model.apply(variables, two, train=True, mutable=['batch_stats'])
  assert bool(jnp.isfinite(logits).all())
  # Initialising from a dummy batch of one in training mode stays allowed (its output is not
  # used, and flax code often initialises so).
  assert jax.tree.structure(model.init(jax.random.key(0), one, train=True)) == \
      jax.tree.structure(variables)


@pytest.mark.parametrize('hw', [(1, 1), (2, 3), (7, 5), (30, 31)])
def test_bilinear_upsample_is_align_corners_true(hw):
  x = torch.randn(2, 3, *hw)
  want = F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)
  got = upsample_bilinear_align_corners(jnp.asarray(nhwc(x)))
  assert max_rel_err(got, nhwc(want)) < 1e-6
  # jax.image.resize's half-pixel centres would be visibly different: the test can tell.
  if min(hw) > 1:
    other = jax.image.resize(jnp.asarray(nhwc(x)), (2, 2 * hw[0], 2 * hw[1], 3), 'bilinear')
    assert max_rel_err(other, nhwc(want)) > 1e-3


def test_model_runs_in_bfloat16_with_float32_state():
  model = UNet(base_features=4, depth=2, dtype=jnp.bfloat16)
  variables = init_variables(model, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out, updates = model.apply(variables, jnp.ones((2, 16, 16, 1)), train=True,
                             mutable=['batch_stats'])
  assert out.dtype == jnp.float32 and out.shape == (2, 16, 16, 1)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))


def test_model_stays_float32_under_jax_enable_x64():
  # Code that turns on 64-bit types for other work gets the same float32 UNet: flax's
  # initialisers default to float64 there, which made the kernels float64 and every conv with
  # them (and the ratio of integer counts in pixel accuracy).
  from unet_jax.losses import per_image_scores
  model = UNet(base_features=4, depth=2)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 1)), jnp.float32)
  init = jax.jit(lambda key: model.init(key, x, train=False))  # traced anew in each mode
  want = init(jax.random.key(0))
  with jax.enable_x64(True):
    variables = init(jax.random.key(0))
    for got, w in zip(jax.tree.leaves(variables), jax.tree.leaves(want), strict=True):
      assert got.dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(got), np.asarray(w))

    def loss(params):
      y, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.mean(jnp.square(y))
    grads = jax.jit(jax.grad(loss))(variables['params'])
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    logits = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    assert logits.dtype == jnp.float32
    scores = per_image_scores(logits, (x[..., 0] > 0).astype(jnp.int32))
    assert {k: v.dtype for k, v in scores.items()} == dict.fromkeys(scores, jnp.float32)


@pytest.mark.parametrize('kwargs', [
    # base 64 at 64x64: the banded weight gradient at the top and Winograd's conv (128 channels).
    dict(base_features=64), dict(upsample='bilinear', conv_bias=True, num_classes=3),
    dict(transpose_conv='xla', conv_weight_grad='xla', max_pool='xla', bn_relu='xla',
         skip_concat='concat', small_maps='xla', few_channels='xla', wide_convs='xla'),
    dict(remat=True), dict(dtype=jnp.bfloat16)])
def test_model_and_losses_trace_under_strict_numpy_settings(kwargs):
  # Codebases that set jax_numpy_rank_promotion='raise' or jax_numpy_dtype_promotion='strict'
  # (flax's own layers allow both): every per-channel vector meets the activations reshaped to
  # their rank, and no integer or bool meets a float implicitly. Traced, not compiled.
  from unet_jax.losses import per_image_scores, segmentation_loss
  model = UNet(**{'base_features': 4, 'depth': 2, **kwargs})
  x = jnp.zeros((2, 64, 64, 1), jnp.float32)
  labels = jnp.zeros((2, 64, 64), jnp.int32)
  k = model.num_classes
  options = (dict(class_weights=(0.2, 1.0, 3.0), focal_gamma=2.0, ignore_id=2) if k > 1 else
             dict(pos_weight=2.0, tversky=(0.3, 0.7), ignore_id=1))
  with jax.numpy_rank_promotion('raise'), jax.numpy_dtype_promotion('strict'):
    variables = jax.eval_shape(lambda key: model.init(key, x, train=False), jax.random.key(0))

    def loss(params, batch_stats):
      y, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                         mutable=['batch_stats'])
      smoothed = {**options, 'focal_gamma': 0.0, 'label_smoothing': 0.1, 'tversky': None,
                  'lovasz': True}
      return (segmentation_loss(y, labels, dice_weight=1.0, **options)[0]
              + segmentation_loss(y, labels, dice_weight=1.0, **smoothed)[0])
    jax.jit(jax.grad(loss)).lower(variables['params'], variables['batch_stats'])
    jax.jit(lambda v: per_image_scores(model.apply(v, x, train=False), labels)).lower(variables)


def test_as_nnx_trains_as_the_linen_step(tmp_path):
  # Flax NNX users: the same weights in an NNX module train exactly as the linen step does
  # (BatchNorm's statistics updated in place), and come back out for saving and conversion.
  import optax
  from flax import nnx

  from unet_jax import load_pretrained
  from unet_jax.checkpoint import save_pretrained
  from unet_jax.errors import UserError
  from unet_jax.nnx_interop import as_nnx, nnx_variables
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 1)), jnp.float32)
  y = (x > 0.5).astype(jnp.float32)
  model = UNet(base_features=4, depth=2)
  variables = init_variables(model, jax.random.key(0))
  tx = optax.adam(1e-2)

  @jax.jit
  def linen_step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                    train=True, mutable=['batch_stats'])
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  @nnx.jit
  def nnx_step(net, optimizer):
    def loss_fn(net):
      return optax.sigmoid_binary_cross_entropy(net(x, train=True, mutable=['batch_stats']),
                                                y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(net)
    optimizer.update(net, grads)
    return loss

  params, batch_stats, opt_state = variables['params'], variables['batch_stats'], tx.init(
      variables['params'])
  net = as_nnx(model, variables)
  optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)
  for _ in range(2):
    params, batch_stats, opt_state, want_loss = linen_step(params, batch_stats, opt_state)
    np.testing.assert_array_equal(np.asarray(nnx_step(net, optimizer)), np.asarray(want_loss))
  got = nnx_variables(net)
  want = {'params': params, 'batch_stats': batch_stats}
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(net(x, train=False)),
                                np.asarray(model.apply(want, x, train=False)))
  # Saved as a converted checkpoint, what load_pretrained (and predict, convert) open.
  loaded_model, loaded = load_pretrained(save_pretrained(str(tmp_path / 'nnx'), model, got))
  assert loaded_model == model
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(UserError, match=r"variables for as_nnx: variable '\S+' has shape \(8,\), "
                                      r"the model expects \(16,\)"):
    as_nnx(UNet(base_features=8, depth=2), variables)
  with pytest.raises(UserError, match=r"variables to save: variable '\S+' has shape \(8,\)"):
    save_pretrained(str(tmp_path / 'other'), UNet(base_features=8, depth=2), got)
  assert not (tmp_path / 'other').exists()


def test_nchw_helper_roundtrip():
  x = np.random.randn(2, 3, 4, 5).astype(np.float32)
  np.testing.assert_array_equal(nhwc(nchw(x.transpose(0, 2, 3, 1))), x.transpose(0, 2, 3, 1))


def test_readme_door_2_block_runs():
  # The newcomer's block, run as the README has it but on a small model (the full-size run is
  # a minute of compiling): its API calls must keep working.
  readme = open(os.path.join(os.path.dirname(__file__), '..', 'README.md')).read()
  start = readme.index('```python', readme.index('## Door 2')) + len('```python')
  block = readme[start:readme.index('```', start)]
  small = {'UNet(in_channels=1, num_classes=1)':
           'UNet(in_channels=1, num_classes=1, base_features=4, depth=2)',
           '(2, 128, 128, 1)': '(2, 32, 32, 1)'}
  for full, reduced in small.items():
    assert full in block, f'README Door 2 changed: update this test ({full!r})'
    block = block.replace(full, reduced)
  scope: dict = {}
  exec(compile(block, 'README.md (Door 2)', 'exec'), scope)  # noqa: S102 - our own README
  assert scope['logits'].shape == (2, 32, 32, 1)
  assert np.isfinite(float(scope['loss']))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), scope['params'],
                         init_variables(scope['model'], jax.random.key(0))['params'])
  assert all(jax.tree.leaves(changed))  # the step updated every parameter
  # Door 2's NNX block, on the same model and weights.
  start = readme.index('```python', readme.index('- Flax NNX:')) + len('```python')
  nnx_block = textwrap.dedent(readme[start:readme.index('```', start)])
  exec(compile(nnx_block, 'README.md (Door 2, NNX)', 'exec'), scope)  # noqa: S102
  loss = scope['nnx_train_step'](scope['net'], scope['optimizer'], scope['x'], scope['y'])
  assert np.isfinite(float(loss))
  assert jax.tree.structure(scope['nnx_variables'](scope['net'])) == jax.tree.structure(
      {'params': scope['params'], 'batch_stats': scope['batch_stats']})

"""The speed levers compute what the plain XLA ops compute: each is switchable and checked here."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

from unet_jax import UNet, init_variables
from unet_jax import model as model_module
from unet_jax.conv_kernels import (
  _conv,
  banded_weight_grad,
  conv3x3,
  im2col_conv3x3,
  winograd_conv3x3,
)
from unet_jax.levers import CPU_SCHEDULERS, FORWARD_MODE, LEVERS
from unet_jax.model import Conv1x1, ConvTranspose2x2
from unet_jax.norm_kernels import batch_norm_relu
from unet_jax.pool_kernels import max_pool_2x2


@pytest.mark.parametrize('stream_bands', [False, True])
@pytest.mark.parametrize('shape', [(2, 64, 64, 8, 16), (1, 67, 70, 3, 5), (2, 9, 130, 4, 4)])
def test_banded_weight_grad_matches_xla(shape, stream_bands):
  n, h, w, c, o = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w, c), np.float32))
  dy = jnp.asarray(rng.standard_normal((n, h, w, o), np.float32))
  kernel = jnp.asarray(rng.standard_normal((3, 3, c, o), np.float32))
  _, vjp = jax.vjp(lambda k: _conv(x, k), kernel)
  want = vjp(dy)[0]
  got = banded_weight_grad(x, dy, stream_bands=stream_bands)
  assert max_rel_err(got, want) < 1e-5
  # The two forms run the same GEMMs in the same order.
  np.testing.assert_array_equal(got, banded_weight_grad(x, dy, stream_bands=not stream_bands))
  # Through the custom VJP, both gradients.
  got_dx, got_dw = jax.vjp(functools.partial(conv3x3, stream_bands=stream_bands), x, kernel)[1](dy)
  want_dx, want_dw = jax.vjp(_conv, x, kernel)[1](dy)
  assert max_rel_err(got_dx, want_dx) < 1e-6 and max_rel_err(got_dw, want_dw) < 1e-5


# im2col: small maps, even and odd. Winograd: even and odd sizes (odd ones are padded, then
# cropped), a 1x1 map, and more than 128 channels.
@pytest.mark.parametrize('conv,shape,forward_tol', [
    (im2col_conv3x3, (2, 8, 8, 6, 5), 1e-6), (im2col_conv3x3, (1, 3, 7, 4, 2), 1e-6),
    (winograd_conv3x3, (2, 8, 10, 6, 5), 1e-5), (winograd_conv3x3, (1, 9, 7, 4, 3), 1e-5),
    (winograd_conv3x3, (2, 1, 1, 3, 2), 1e-5), (winograd_conv3x3, (1, 16, 12, 130, 129), 1e-5)])
def test_gemm_convs_match_xla(conv, shape, forward_tol):
  n, h, w, c, o = shape
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((n, h, w, c), np.float32))
  kernel = jnp.asarray(rng.standard_normal((3, 3, c, o), np.float32))
  dy = jnp.asarray(rng.standard_normal((n, h, w, o), np.float32))
  y, vjp = jax.vjp(conv, x, kernel)
  want_y, want_vjp = jax.vjp(_conv, x, kernel)
  assert max_rel_err(y, want_y) < forward_tol
  for got, want in zip(vjp(dy), want_vjp(dy), strict=True):
    assert max_rel_err(got, want) < 1e-5


@pytest.mark.parametrize('stream_bands', [False, True])
def test_banded_weight_grad_is_sensitive(stream_bands):
  x = jnp.ones((1, 16, 16, 2))
  first, last = [[0, 0, 0], [0, 1, 1], [0, 1, 1]], [[0, 1, 1], [0, 1, 1], [0, 0, 0]]
  for row, want in ((0, first), (15, last)):
    dy = jnp.zeros((1, 16, 16, 3)).at[0, row, 0, 0].set(1.0)
    dw = banded_weight_grad(x, dy, stream_bands=stream_bands)
    # Output pixel (row, 0) sees only taps that land inside the image.
    np.testing.assert_array_equal(np.asarray(dw[:, :, 0, 0]), want)


def test_gemm_transpose_conv_matches_xla():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 7, 6), np.float32))
  layer = ConvTranspose2x2(4, 'gemm')
  variables = layer.init(jax.random.key(0), x)
  g = jnp.asarray(np.random.default_rng(2).standard_normal((2, 10, 14, 4), np.float32))
  got, got_vjp = jax.vjp(layer.apply, variables, x)
  want, want_vjp = jax.vjp(ConvTranspose2x2(4, 'xla').apply, variables, x)
  assert max_rel_err(got, want) < 1e-6
  for got_grad, want_grad in zip(jax.tree.leaves(got_vjp(g)), jax.tree.leaves(want_vjp(g)),
                                 strict=True):
    assert max_rel_err(got_grad, want_grad) < 1e-6


@pytest.mark.parametrize('shape', [(2, 8, 10, 3), (1, 9, 7, 2)])
def test_max_pool_matches_torch_including_ties(shape):
  import torch
  rng = np.random.default_rng(4)
  # Values from a small set, so that windows hold ties at non-zero values as well as at zero.
  x = rng.integers(-2, 3, shape).astype(np.float32)
  g = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32)
  y, vjp = jax.vjp(max_pool_2x2, jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(g))
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  yt = torch.nn.functional.max_pool2d(xt, 2)
  yt.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1))
  # Also what flax's reduce_window pool computes, gradient included.
  want_y, want_vjp = jax.vjp(
      lambda v: nn.max_pool(v, (2, 2), strides=(2, 2), padding='VALID'), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(want_vjp(jnp.asarray(g))[0]))


def test_conv1x1_matches_flax_conv():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 7, 6), np.float32))
  variables = Conv1x1(3).init(jax.random.key(0), x)
  want = nn.Conv(3, (1, 1)).apply(variables, x)
  assert max_rel_err(Conv1x1(3).apply(variables, x), want) < 1e-6


def _grads(model, variables, x):
  def loss(params):
    y, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.mean(jnp.square(y - 0.5))
  return jax.jit(jax.grad(loss))(variables['params'])


def _grads_and_forward(model, variables, x):
  """_grads and _forward together, as one jitted program."""
  def loss(params):
    y, updates = model.apply({**variables, 'params': params}, x, train=True,
                             mutable=['batch_stats'])
    return jnp.mean(jnp.square(y - 0.5)), (y, updates['batch_stats'])
  return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])


def test_winograd_lever_keeps_training_gradients():
  # base 32, depth 3 at 38x34: down2 (9x8 map, odd height) and up1 have 128-channel convs and
  # parts, which take Winograd's conv; the 4x4 bottom takes the im2col GEMM.
  x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 38, 34, 1), np.float32))
  plain = UNet(base_features=32, depth=3, wide_convs='xla')
  variables = init_variables(plain, jax.random.key(0))
  model = UNet(base_features=32, depth=3, wide_convs='winograd')
  assert 'winograd_conv3x3' in str(jax.make_jaxpr(
      lambda v: model.apply(v, x, train=True, mutable=['batch_stats']))(variables))
  for g, w in zip(jax.tree.leaves(_grads(model, variables, x)),
                  jax.tree.leaves(_grads(plain, variables, x)), strict=True):
    assert max_rel_err(g, w) < 1e-4
  (y, stats), (want_y, want_stats) = _forward(model, variables, x), _forward(plain, variables, x)
  assert max_rel_err(y, want_y) < 1e-5
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats), strict=True):
    assert max_rel_err(a, b) < 1e-5
  assert max_rel_err(_eval(model, variables, x), _eval(plain, variables, x)) < 1e-5


def test_levers_keep_training_gradients():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 66, 64, 1), np.float32))
  # 66x64 takes the banded weight gradient at the top (66 rows: the last band part empty), 33x32
  # an odd height, and depth 3 reaches an 8x8 map (im2col GEMM).
  plain = UNet(base_features=4, depth=3, transpose_conv='xla', conv_weight_grad='xla',
               max_pool='xla', bn_relu='xla', skip_concat='concat', small_maps='xla',
               few_channels='xla')
  variables = init_variables(plain, jax.random.key(0))
  want = _grads(plain, variables, x)
  want_y, want_stats = _forward(plain, variables, x)
  # (remat with the default levers: test_remat_is_bit_identical.)
  for levers in [dict(), dict(conv_weight_grad='xla'), dict(max_pool='xla'),
                 dict(bn_relu='xla'), dict(skip_concat='concat'), dict(small_maps='xla'),
                 dict(few_channels='xla'),
                 dict(transpose_conv='xla', remat=True)]:
    model = UNet(base_features=4, depth=3, **levers)
    got, (y, stats) = _grads_and_forward(model, variables, x)  # one compilation per model
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert max_rel_err(g, w) < 1e-4, levers
    assert max_rel_err(y, want_y) < 1e-5, levers
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats), strict=True):
      assert max_rel_err(a, b) < 1e-5, levers


@pytest.mark.parametrize('in_channels', [1, 3])
def test_few_channels_takes_the_image_conv_and_no_other(in_channels):
  # The image's conv (1 or 3 channels, full resolution) becomes a GEMM; every other conv keeps
  # XLA's (8 channels and up here; 16x16 maps, so small_maps leaves them alone).
  x = jnp.zeros((2, 32, 32, in_channels), jnp.float32)

  def convs(few_channels):
    model = UNet(in_channels, base_features=8, depth=1, conv_weight_grad='xla',
                 few_channels=few_channels)
    variables = init_variables(model, jax.random.key(0))
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables))
    return jaxpr.count('conv_general_dilated['), jaxpr.count('dot_general[')

  (gemm_convs, gemm_dots), (xla_convs, xla_dots) = convs('gemm'), convs('xla')
  assert (gemm_convs, gemm_dots) == (xla_convs - 1, xla_dots + 1)


_CPU_KERNELS = dict(conv_weight_grad='banded', wide_convs='winograd')


@pytest.mark.parametrize('platform', ['cpu', 'gpu', 'tpu'])
def test_auto_levers_pick_the_cpu_kernels_on_cpu_only(monkeypatch, platform):
  # The whole training gradient is traced: 'auto' must trace to exactly the named choice. The
  # mask max-pool is the default on every platform (faster on an H100 too).
  monkeypatch.setattr(model_module, '_platform', lambda: platform)
  x = jnp.zeros((2, 32, 32, 1), jnp.float32)
  # 128 channels at 16x16 (down1): Winograd's conv applies there.
  auto = UNet(base_features=64, depth=2)
  variables = init_variables(auto, jax.random.key(0))

  def traced(model):
    def loss(params):
      y, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return y.sum()
    return str(jax.make_jaxpr(jax.grad(loss))(variables['params']))

  resolved = _CPU_KERNELS if platform == 'cpu' else {k: 'xla' for k in _CPU_KERNELS}
  resolved = {**resolved, 'max_pool': 'masks'}
  got = traced(auto)
  assert got == traced(UNet(base_features=64, depth=2, **resolved))
  for name in resolved:  # each lever on its own: the other choice traces differently
    other = 'xla' if resolved[name] != 'xla' else _CPU_KERNELS[name]
    assert got != traced(UNet(base_features=64, depth=2, **{**resolved, name: other})), name
  assert ('winograd_conv3x3' in got) == (platform == 'cpu')
  # With remat (the memory setting) 'auto' leaves Winograd's conv out on every platform.
  assert 'winograd_conv3x3' not in traced(UNet(base_features=64, depth=2, remat=True))


def _dot(a, b):
  return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_forward_mode_levers_let_jax_jvp_differentiate_the_unet():
  # Forward mode through FORWARD_MODE's levers against reverse mode through the default ones
  # (their custom VJPs; the other levers as default in both) on the same weights. 16x16 at
  # depth 2 takes the image's GEMM conv, the 8x8 and 4x4 GEMM convs and the split concat.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 1), np.float32))
  weights = jnp.asarray(rng.standard_normal((2, 16, 16, 1), np.float32))
  forward = UNet(base_features=4, depth=2, **FORWARD_MODE)
  default = UNet(base_features=4, depth=2)
  variables = init_variables(default, jax.random.key(0))
  params = variables['params']
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  tangent = treedef.unflatten(
      [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)])

  def loss_of(model):
    def loss(params):
      y, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(jnp.tanh(y) * weights)
    return loss

  # The training loss's derivative along `tangent`, and a Hessian-vector product (forward over
  # reverse, as HVPs are usually taken, against reverse over reverse).
  derivative, hvp = jax.jit(lambda p, t: (jax.jvp(loss_of(forward), (p,), (t,))[1],
                                          jax.jvp(jax.grad(loss_of(forward)), (p,), (t,))[1]))(
      params, tangent)
  want_derivative, want_hvp = jax.jit(lambda p, t: (
      _dot(jax.grad(loss_of(default))(p), t),
      jax.grad(lambda q: _dot(jax.grad(loss_of(default))(q), t))(p)))(params, tangent)
  assert max_rel_err(derivative, want_derivative) < 1e-5
  for got, want in zip(jax.tree.leaves(hvp), jax.tree.leaves(want_hvp), strict=True):
    assert max_rel_err(got, want) < 1e-4
  # The input Jacobian in eval mode: <u, J t> = <J^T u, t>.
  t, u = (jnp.asarray(rng.standard_normal(x.shape, np.float32)) for _ in range(2))
  jt = jax.jit(lambda a, b: jax.jvp(lambda z: forward.apply(variables, z, train=False), (a,),
                                    (b,))[1])(x, t)
  jtu = jax.vjp(jax.jit(lambda z: default.apply(variables, z, train=False)), x)[1](u)[0]
  assert max_rel_err(jnp.vdot(jt, u), jnp.vdot(jtu, t)) < 1e-5


def test_forward_mode_switches_exactly_the_custom_vjp_levers():
  hand_written = {'conv_weight_grad': 'banded', 'max_pool': 'masks', 'bn_relu': 'fused',
                  'wide_convs': 'winograd'}
  assert FORWARD_MODE.keys() == hand_written.keys()
  # Traced and lowered, not compiled. 128 channels at 16x16 (down1): Winograd's conv applies.
  x = jnp.zeros((2, 32, 32, 1), jnp.float32)

  def lower_jvp(model):
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)

    def loss(params, batch_stats):
      y, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                         mutable=['batch_stats'])
      return y.sum()
    jax.jit(lambda p, b: jax.jvp(lambda q: loss(q, b), (p,), (p,))).lower(
        variables['params'], variables['batch_stats'])

  lower_jvp(UNet(base_features=64, depth=1, **FORWARD_MODE))
  for name, choice in hand_written.items():
    with pytest.raises(TypeError, match='forward-mode autodiff'):
      lower_jvp(UNet(base_features=64, depth=1, **{**FORWARD_MODE, name: choice}))


def test_levers_under_gspmd_split_the_batch_over_devices():
  # A researcher's own step: jax.jit with the batch sharded over 8 devices, XLA partitioning it
  # (GSPMD). Every lever but the banded weight gradient splits by device with no gather of
  # activations; the banded one's loop over image bands cannot be split, so XLA gathers its
  # input onto every device (README, Door 2). And the partitioned step computes what 1 device
  # computes.
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((8, 64, 64, 1), np.float32))
  labels = jnp.asarray(rng.random((8, 64, 64, 1)) > 0.5, jnp.float32)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ('data',))
  whole, split = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  def grads_of(model):
    def grads(variables, x, labels):
      def loss(params):
        y, _ = model.apply({**variables, 'params': params}, x, train=True,
                           mutable=['batch_stats'])
        return jnp.mean(jnp.square(jax.nn.sigmoid(y) - labels))
      return jax.grad(loss)(variables['params'])
    return grads

  def partitioned(model, variables, x, labels):
    return jax.jit(grads_of(model), in_shardings=(whole, split, split),
                   out_shardings=whole).lower(variables, x, labels).compile()

  # Depth 3 at 64x64, base 32: the image's GEMM conv, Winograd's conv (128 channels at 16x16),
  # the 8x8 GEMM conv, mask max-pool, fused BatchNorm+ReLU, GEMM transposed conv, split concat.
  wide = UNet(base_features=32, depth=3, conv_weight_grad='xla')
  wide_variables = jax.eval_shape(lambda key: init_variables(wide, key), jax.random.key(0))
  assert 'winograd' in str(jax.make_jaxpr(grads_of(wide))(wide_variables, x, labels))
  assert 'all-gather' not in partitioned(wide, wide_variables, x, labels).as_text()
  banded = wide.clone(conv_weight_grad='banded')
  assert 'all-gather' in partitioned(banded, wide_variables, x, labels).as_text()
  # The numbers, on a UNet of depth 1 (16x16: the image's conv and the 8x8 bottom as GEMMs,
  # mask max-pool, fused BatchNorm+ReLU, GEMM transposed conv, split concat): deeper ones at
  # initialisation are too ill-conditioned in float32 to compare closely (permuting the batch on
  # 1 device moved the depth-3 gradient by 1e-3 of its norm, 2e-7 in float64).
  x, labels = x[:, :16, :16], labels[:, :16, :16]
  model = UNet(base_features=8, depth=1, conv_weight_grad='xla')
  variables = init_variables(model, jax.random.key(0))
  want = jax.jit(grads_of(model))(variables, x, labels)
  got = partitioned(model, variables, x, labels)(variables, jax.device_put(x, split),
                                                 jax.device_put(labels, split))
  delta = jax.tree.map(jnp.subtract, got, want)
  relative = float(_dot(delta, delta) / _dot(want, want)) ** 0.5
  assert relative < 1e-5, relative


def _forward(model, variables, x):
  y, updates = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x)
  return y, updates['batch_stats']


def _eval(model, variables, x):
  return jax.jit(functools.partial(model.apply, train=False))(variables, x)


def test_fused_batch_norm_relu_gradient_matches_autodiff():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 3), np.float32) * 3 + 1)
  scale = jnp.asarray(rng.standard_normal(3, np.float32))
  bias = jnp.asarray(rng.standard_normal(3, np.float32))
  g = jnp.asarray(rng.standard_normal((2, 5, 6, 3), np.float32))

  def plain(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    return jax.nn.relu((x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias)

  want_y, want_vjp = jax.vjp(plain, x, scale, bias)
  (y, mean, var), vjp = jax.vjp(lambda *a: batch_norm_relu(*a, 1e-5, None), x, scale, bias)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
  got = vjp((g, jnp.zeros_like(mean), jnp.zeros_like(var)))
  for a, b in zip(got, want_vjp(g), strict=True):
    assert max_rel_err(a, b) < 1e-5


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_fused_batch_norm_relu_backward_masks_where_the_forward_output_is_zero(dtype):
  # The backward's ReLU mask must be exactly the forward output's (y > 0), also in bfloat16
  # where values near zero round (the small bias puts many of them there).
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((4, 9, 7, 5)), dtype)
  scale = jnp.asarray(rng.standard_normal(5), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(5) * 1e-3, jnp.float32)
  g = rng.standard_normal((4, 9, 7, 5)).astype(np.float32)
  (y, mean, var), vjp = jax.vjp(lambda *a: batch_norm_relu(*a, 1e-5, None), x, scale, bias)
  dx, dscale, dbias = vjp((jnp.asarray(g, dtype), jnp.zeros_like(mean), jnp.zeros_like(var)))
  # float64 textbook gradient with the mask taken from the forward's output.
  dz = np.where(np.asarray(y, np.float32) > 0, np.asarray(jnp.asarray(g, dtype), np.float64), 0)
  xf = np.asarray(x, np.float64)
  rstd = 1 / np.sqrt(np.asarray(var, np.float64) + 1e-5)
  xhat = (xf - np.asarray(mean, np.float64)) * rstd
  want_dx = np.asarray(scale, np.float64) * rstd * (
      dz - dz.mean((0, 1, 2)) - xhat * (dz * xhat).mean((0, 1, 2)))
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert max_rel_err(dbias, dz.sum((0, 1, 2))) < 1e-5
  assert max_rel_err(dscale, (dz * xhat).sum((0, 1, 2))) < 1e-4
  assert max_rel_err(dx, want_dx) < tol


def test_remat_is_bit_identical():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64, 64, 1), np.float32))
  model = UNet(base_features=4, depth=2)
  variables = init_variables(model, jax.random.key(0))
  a = _grads(model, variables, x)
  b = _grads(model.clone(remat=True), variables, x)
  for g, w in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_benchmark_lever_table_matches_the_model():
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'compare_pytorch.py')
  spec = importlib.util.spec_from_file_location('compare_pytorch', path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert bench.LEVERS == LEVERS
  assert bench.CPU_SCHEDULERS == CPU_SCHEDULERS

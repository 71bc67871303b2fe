"""The speed levers compute what the plain XLA ops compute: each is switchable and checked here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

from unet_jax import UNet
from unet_jax.conv_kernels import _conv, banded_weight_grad, conv3x3
from unet_jax.model import ConvTranspose2x2


@pytest.mark.parametrize('shape', [(2, 64, 64, 8, 16), (1, 67, 70, 3, 5), (2, 9, 130, 4, 4)])
def test_banded_weight_grad_matches_xla(shape):
  n, h, w, c, o = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w, c), np.float32))
  dy = jnp.asarray(rng.standard_normal((n, h, w, o), np.float32))
  kernel = jnp.asarray(rng.standard_normal((3, 3, c, o), np.float32))
  _, vjp = jax.vjp(lambda k: _conv(x, k), kernel)
  want = vjp(dy)[0]
  assert max_rel_err(banded_weight_grad(x, dy), want) < 1e-5
  # Through the custom VJP, both gradients.
  got_dx, got_dw = jax.vjp(conv3x3, x, kernel)[1](dy)
  want_dx, want_dw = jax.vjp(_conv, x, kernel)[1](dy)
  assert max_rel_err(got_dx, want_dx) < 1e-6 and max_rel_err(got_dw, want_dw) < 1e-5


def test_banded_weight_grad_is_sensitive():
  x = jnp.ones((1, 16, 16, 2))
  dy = jnp.zeros((1, 16, 16, 3)).at[0, 0, 0, 0].set(1.0)
  dw = banded_weight_grad(x, dy)
  # Output pixel (0, 0) sees only taps that land inside the image: kh, kw in {1, 2}.
  np.testing.assert_array_equal(np.asarray(dw[:, :, 0, 0]), [[0, 0, 0], [0, 1, 1], [0, 1, 1]])


def test_gemm_transpose_conv_matches_xla():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 7, 6), np.float32))
  layer = ConvTranspose2x2(4, 'gemm')
  variables = layer.init(jax.random.key(0), x)
  want = ConvTranspose2x2(4, 'xla').apply(variables, x)
  assert max_rel_err(layer.apply(variables, x), want) < 1e-6


def _grads(model, variables, x):
  def loss(params):
    y, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.mean(jnp.square(y - 0.5))
  return jax.jit(jax.grad(loss))(variables['params'])


def test_levers_keep_training_gradients():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 72, 66, 1), np.float32))
  plain = UNet(base_features=4, depth=2, transpose_conv='xla', conv_weight_grad='xla')
  variables = plain.init(jax.random.key(0), x, train=False)
  want = _grads(plain, variables, x)
  for levers in [dict(), dict(remat=True), dict(conv_weight_grad='xla'),
                 dict(transpose_conv='xla', remat=True)]:
    got = _grads(UNet(base_features=4, depth=2, **levers), variables, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert max_rel_err(g, w) < 1e-4, levers


def test_remat_is_bit_identical():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64, 64, 1), np.float32))
  model = UNet(base_features=4, depth=2)
  variables = model.init(jax.random.key(0), x, train=False)
  a = _grads(model, variables, x)
  b = _grads(model.clone(remat=True), variables, x)
  for g, w in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

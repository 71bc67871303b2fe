"""Training-mode BatchNorm followed by ReLU, with a hand-written backward pass.

Autodiff of `relu(batch_norm(x))` keeps several full-size intermediates alive until the backward
pass (the centred input, the normalised input, the ReLU mask) and walks the activation many
times. `batch_norm_relu` keeps only its input and its output (the output is the next conv's
input, which is kept anyway) and computes the input gradient in two passes, the textbook

    dx = scale * rstd * (dz - mean(dz) - xhat * mean(dz * xhat)),   dz = g * (y > 0)

with the means taken over the global batch when `axis_name` is given (SyncBN), as the forward
statistics are. The forward arithmetic is the same expression as `model.BatchNorm`'s.

Per-channel vectors meet the activations reshaped to their rank (`_per_channel`), never by
implicit rank promotion, so the UNet also traces under `jax_numpy_rank_promotion='raise'`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _per_channel(v: jax.Array, x: jax.Array) -> jax.Array:
  """A (C,) vector shaped (1, ..., 1, C) to broadcast against x, whose last axis is C."""
  return v.reshape((1,) * (x.ndim - 1) + (-1,))


def batch_statistics(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance, over the global batch with axis_name.

  Two passes (mean, then centred squares) as PyTorch does; E[x^2]-E[x]^2 loses digits.
  """
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.square(x - _per_channel(mean, x)).mean(axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return mean, var


def normalise(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array,
              epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias, in the arithmetic order BatchNorm uses."""
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return (x - _per_channel(mean, x)) * _per_channel(mul, x) + _per_channel(bias, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_relu(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                    axis_name: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """relu(BatchNorm(x)) over the last axis; returns (y, batch mean, biased var).

  Statistics and arithmetic are float32 whatever x's dtype; y has x's dtype. The batch
  statistics are returned for the running averages only: they carry no gradient.
  """
  return _fwd(x, scale, bias, epsilon, axis_name)[0]


def _fwd(x, scale, bias, epsilon, axis_name):
  xf = x.astype(jnp.float32)
  mean, var = batch_statistics(xf, axis_name)
  y = jax.nn.relu(normalise(xf, scale, bias, mean, var, epsilon).astype(x.dtype))
  return (y, mean, var), (x, y, scale, mean, var)


def _bwd(epsilon, axis_name, residuals, cotangents):
  x, y, scale, mean, var = residuals
  # The statistics feed only the running averages, which are not differentiated.
  g = cotangents[0].astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  rstd = jax.lax.rsqrt(var + epsilon)
  dz = jnp.where(y > 0, g, jnp.zeros_like(g))
  xhat = (x.astype(jnp.float32) - _per_channel(mean, x)) * _per_channel(rstd, x)
  dbias = dz.sum(axes)
  dscale = (dz * xhat).sum(axes)
  count = float(np.prod([x.shape[a] for a in axes]))  # a Python number: x's float type
  mean_dz, mean_dz_xhat = dbias / count, dscale / count
  if axis_name is not None:
    mean_dz = jax.lax.pmean(mean_dz, axis_name)
    mean_dz_xhat = jax.lax.pmean(mean_dz_xhat, axis_name)
  dx = _per_channel(scale * rstd, x) * (
      dz - _per_channel(mean_dz, x) - xhat * _per_channel(mean_dz_xhat, x))
  return dx.astype(x.dtype), dscale, dbias


batch_norm_relu.defvjp(_fwd, _bwd)

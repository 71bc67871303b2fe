"""Training-mode BatchNorm followed by ReLU, with a hand-written backward pass.

Autodiff of `relu(batch_norm(x))` keeps several full-size intermediates alive until the backward
pass (the centred input, the normalised input, the ReLU mask) and walks the activation many
times. `batch_norm_relu` keeps only its input (its output is the next conv's input, kept by that
conv) and computes the input gradient in two passes over the cotangent and the input, the textbook

    dx = scale * rstd * (dz - mean(dz) - xhat * mean(dz * xhat)),   dz = g * (y > 0)

with the means taken over the global batch when `axis_name` is given (SyncBN), as the forward
statistics are. The ReLU mask (y > 0) is recomputed from x with the forward's own expression
rather than read from y: each backward pass then reads two full-size arrays instead of three
(the backward is memory-bound; on a GPU that is 2 of BatchNorm's 11 passes over memory).
The forward arithmetic is the same expression as `model.BatchNorm`'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def batch_statistics(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance, over the global batch with axis_name.

  Two passes (mean, then centred squares) as PyTorch does; E[x^2]-E[x]^2 loses digits.
  """
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.square(x - mean).mean(axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return mean, var


def normalise(x: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array,
              epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias, in the arithmetic order BatchNorm uses."""
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return (x - mean) * mul + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_relu(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                    axis_name: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """relu(BatchNorm(x)) over the last axis; returns (y, batch mean, biased var).

  Statistics and arithmetic are float32 whatever x's dtype; y has x's dtype. The batch
  statistics are returned for the running averages only: they carry no gradient.
  """
  return _fwd(x, scale, bias, epsilon, axis_name)[0]


def _pre_relu(x, scale, bias, mean, var, epsilon):
  """BatchNorm(x) in x's dtype: the forward's value before the ReLU, bit for bit."""
  return normalise(x.astype(jnp.float32), scale, bias, mean, var, epsilon).astype(x.dtype)


def _fwd(x, scale, bias, epsilon, axis_name):
  mean, var = batch_statistics(x.astype(jnp.float32), axis_name)
  y = jax.nn.relu(_pre_relu(x, scale, bias, mean, var, epsilon))
  return (y, mean, var), (x, scale, bias, mean, var)


def _bwd(epsilon, axis_name, residuals, cotangents):
  x, scale, bias, mean, var = residuals
  # The statistics feed only the running averages, which are not differentiated.
  g = cotangents[0].astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  rstd = jax.lax.rsqrt(var + epsilon)
  dz = jnp.where(_pre_relu(x, scale, bias, mean, var, epsilon) > 0, g, jnp.zeros_like(g))
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dbias = dz.sum(axes)
  dscale = (dz * xhat).sum(axes)
  count = np.prod([x.shape[a] for a in axes])
  mean_dz, mean_dz_xhat = dbias / count, dscale / count
  if axis_name is not None:
    mean_dz = jax.lax.pmean(mean_dz, axis_name)
    mean_dz_xhat = jax.lax.pmean(mean_dz_xhat, axis_name)
  dx = (scale * rstd) * (dz - mean_dz - xhat * mean_dz_xhat)
  return dx.astype(x.dtype), dscale, dbias


batch_norm_relu.defvjp(_fwd, _bwd)

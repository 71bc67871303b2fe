"""3x3 convolution with a faster weight gradient on CPU.

XLA's CPU backend computes the weight gradient of a 3x3 convolution at high resolution and few
channels far below the speed of the forward pass (about 45 against 170 GFLOP/s at 128x128x64
here). `conv3x3` keeps XLA's forward and input gradient and computes the weight gradient as a
sum of GEMMs over bands of a few image rows: each band's patches (kw taps side by side, 3x the
band's size) stay in cache, and each kernel row kh is one (band, 3*C_in)^T x (band, C_out) GEMM.
That measured about 2x XLA at 128x128 and 1.5x at 64x64; lower resolutions use XLA's own.

At the bottom of the U (8x8 maps, 512-1024 channels) XLA's convolution runs far below peak in all
three directions; `im2col_conv3x3` writes the conv as one GEMM over the 9 shifted copies of the
(small) input, so the forward, input gradient and weight gradient are all plain GEMMs: about
1.6x faster there, slower from 16x16 up (measured with benchmarks/, see README).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ('NHWC', 'HWIO', 'NHWC')
BAND_ROWS = 8
MIN_PIXELS_FOR_BANDS = 64 * 64  # below this XLA's own weight gradient is as fast
MAX_PIXELS_FOR_IM2COL = 8 * 8  # above this the 9x copy of the input costs more than it saves


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS)


def banded_weight_grad(x: jax.Array, dy: jax.Array, rows: int = BAND_ROWS) -> jax.Array:
  """d(sum(conv(x, w) * dy)) / dw for a 3x3, stride-1, pad-1 conv; (3, 3, C_in, C_out) float32."""
  n, h, w, c = x.shape
  o = dy.shape[-1]
  bands = -(-h // rows)
  extra = bands * rows - h  # zero rows contribute nothing to the sum
  xp = jnp.pad(x, ((0, 0), (1, 1 + extra), (1, 1), (0, 0)))
  dy = jnp.pad(dy, ((0, 0), (0, extra), (0, 0), (0, 0)))
  # Band b needs padded rows [b*rows, b*rows + rows + 2).
  index = jnp.arange(bands)[:, None] * rows + jnp.arange(rows + 2)[None, :]
  x_bands = xp[:, index].reshape(n * bands, rows + 2, w + 2, c)
  dy_bands = dy.reshape(n * bands, rows, w, o)

  def accumulate(acc, band):
    xb, db = band
    cols = jnp.concatenate([xb[:, kw:kw + w, :] for kw in range(3)], axis=-1)  # rows+2, w, 3c
    d2 = db.reshape(rows * w, o)
    per_kh = [jnp.matmul(cols[kh:kh + rows].reshape(rows * w, 3 * c).T, d2,
                         preferred_element_type=jnp.float32) for kh in range(3)]
    return acc + jnp.concatenate(per_kh), None

  acc, _ = lax.scan(accumulate, jnp.zeros((9 * c, o), jnp.float32), (x_bands, dy_bands))
  return acc.reshape(3, 3, c, o)


@jax.custom_vjp
def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  """3x3 conv, stride 1, zero padding 1, NHWC x HWIO; the banded weight gradient when large."""
  return _conv(x, w)


def _fwd(x, w):
  return _conv(x, w), (x, w)


def _bwd(residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(functools.partial(_conv, w=w), x)
  (dx,) = input_vjp(dy)
  if x.shape[1] * x.shape[2] >= MIN_PIXELS_FOR_BANDS:
    dw = banded_weight_grad(x, dy).astype(w.dtype)
  else:
    _, weight_vjp = jax.vjp(functools.partial(_conv, x), w)
    (dw,) = weight_vjp(dy)
  return dx, dw


conv3x3.defvjp(_fwd, _bwd)


def im2col_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  """3x3 conv, stride 1, zero padding 1, NHWC x HWIO, as one (N*H*W, 9*C_in) x (9*C_in, C_out)
  GEMM; autodiff turns it into GEMMs for both gradients. For small maps only (9x the input)."""
  n, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Column order (kh, kw, c) matches the row-major reshape of the HWIO kernel.
  cols = jnp.concatenate([xp[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], axis=-1)
  y = jnp.dot(cols.reshape(n * h * wd, 9 * c), w.reshape(9 * c, w.shape[-1]),
              preferred_element_type=jnp.float32)
  return y.reshape(n, h, wd, w.shape[-1]).astype(x.dtype)

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


def banded_weight_grad(x: jax.Array, dy: jax.Array, rows: int = BAND_ROWS,
                       stream_bands: bool = False) -> jax.Array:
  """d(sum(conv(x, w) * dy)) / dw for a 3x3, stride-1, pad-1 conv; (3, 3, C_in, C_out) float32.

  Both forms run the same GEMMs in the same order (bit-identical results); they differ in
  memory. Measured on the seed UNet's training step at 1x480x480 (XLA's buffers per image):
  without remat, copied bands 1000 MiB against 1161 streamed; with remat 678 against 593.
  """
  if stream_bands:
    return _streamed_bands_weight_grad(x, dy, rows)
  return _copied_bands_weight_grad(x, dy, rows)


def _band_weight_grad(xb: jax.Array, db: jax.Array) -> jax.Array:
  """One band's share of the weight gradient, (9 * C_in, C_out) in (kh, kw, c) row order.

  xb: the band's rows of x with one halo row and the conv's zero column on each side,
  (rows + 2, w + 2, C_in); db: the band's rows of dy, (rows, w, C_out). The kw taps sit side by
  side (3x the band, in cache) and each kernel row kh is one GEMM."""
  rows, w, o = db.shape
  c = xb.shape[-1]
  cols = jnp.concatenate([xb[:, kw:kw + w, :] for kw in range(3)], axis=-1)  # rows+2, w, 3c
  d2 = db.reshape(rows * w, o)
  per_kh = [jnp.matmul(cols[kh:kh + rows].reshape(rows * w, 3 * c).T, d2,
                       preferred_element_type=jnp.float32) for kh in range(3)]
  return jnp.concatenate(per_kh)


def _copied_bands_weight_grad(x: jax.Array, dy: jax.Array, rows: int) -> jax.Array:
  """The weight gradient from a banded copy of x (1.25x its size, with the halo rows).

  XLA builds the copy in one fusion with x's producer (BatchNorm+ReLU of the previous conv),
  so x itself need not be kept from the forward pass: the better choice without remat."""
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
    return acc + _band_weight_grad(*band), None

  acc, _ = lax.scan(accumulate, jnp.zeros((9 * c, o), jnp.float32), (x_bands, dy_bands))
  return acc.reshape(3, 3, c, o)


def _streamed_bands_weight_grad(x: jax.Array, dy: jax.Array, rows: int) -> jax.Array:
  """The weight gradient with each band sliced out of x inside its scan step.

  One scan step per (image, band): the band's rows (with the conv's zero padding) are sliced
  out of x and dy inside the step, so no copy of the whole map is made. x must be materialised
  for that: the better choice with remat, where x is recomputed next to this use anyway.
  """
  if x.shape[1] < rows + 2:  # too short to slice a band with its halo rows: pad (small maps)
    extra = rows + 2 - x.shape[1]
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    dy = jnp.pad(dy, ((0, 0), (0, extra), (0, 0), (0, 0)))  # zero rows add nothing
  n, h, _, c = x.shape
  o = dy.shape[-1]
  bands = -(-h // rows)

  def band_rows(a: jax.Array, image: jax.Array, first: jax.Array, size: int) -> jax.Array:
    """Rows [first, first + size) of image `image` of a, zero outside [0, h)."""
    start = jnp.clip(first, 0, h - size)
    block = lax.dynamic_slice(a, (image, start, 0, 0), (1, size) + a.shape[2:])[0]
    wanted = first + jnp.arange(size)
    block = block[jnp.clip(wanted - start, 0, size - 1)]
    return jnp.where(((wanted >= 0) & (wanted < h))[:, None, None], block, 0)

  def accumulate(acc, step):
    image, band = step // bands, step % bands
    xb = band_rows(x, image, band * rows - 1, rows + 2)  # the band and one halo row each side
    db = band_rows(dy, image, band * rows, rows)
    xb = jnp.pad(xb, ((0, 0), (1, 1), (0, 0)))  # the conv's zero columns
    return acc + _band_weight_grad(xb, db), None

  acc, _ = lax.scan(accumulate, jnp.zeros((9 * c, o), jnp.float32), jnp.arange(n * bands))
  return acc.reshape(3, 3, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, w: jax.Array, stream_bands: bool = False) -> jax.Array:
  """3x3 conv, stride 1, zero padding 1, NHWC x HWIO; the banded weight gradient when large.

  stream_bands: which form of `banded_weight_grad` (same numbers; see there for memory)."""
  return _conv(x, w)


def _fwd(x, w, stream_bands):
  return _conv(x, w), (x, w)


def _bwd(stream_bands, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(functools.partial(_conv, w=w), x)
  (dx,) = input_vjp(dy)
  if x.shape[1] * x.shape[2] >= MIN_PIXELS_FOR_BANDS:
    dw = banded_weight_grad(x, dy, stream_bands=stream_bands).astype(w.dtype)
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

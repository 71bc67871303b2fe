"""3x3 convolutions that run faster on CPU than XLA's own, each computing the same numbers.

XLA's CPU backend computes the weight gradient of a 3x3 convolution at high resolution and few
channels far below the speed of the forward pass (about 45 against 170 GFLOP/s at 128x128x64
here). `conv3x3` keeps XLA's forward and input gradient and computes the weight gradient as a
sum of GEMMs over bands of a few image rows: each band's patches (kw taps side by side, 3x the
band's size) stay in cache, and each kernel row kh is one (band, 3*C_in)^T x (band, C_out) GEMM.
That measured about 2x XLA at 128x128 and 1.5x at 64x64; lower resolutions use XLA's own.

At the bottom of the U (8x8 maps, 512-1024 channels) XLA's convolution runs far below peak in all
three directions; `im2col_conv3x3` writes the conv as one GEMM over the 9 shifted copies of the
(small) input, so the forward, input gradient and weight gradient are all plain GEMMs: about
1.6x faster there, slower from 16x16 up (measured with benchmarks/, see README). The same GEMM
serves the UNet's first conv, whose input has only the image's few channels at full resolution.

Convolutions with at least 128 input and output channels (for the seed UNet at 128x128 every
level below the top but down1's first conv; at 480x480 likewise) use Winograd's F(2x2, 3x3) in
`winograd_conv3x3` (maps above 8x8; im2col below): per 2x2 output block and per input and output
channel 16 multiplies instead of 36, written as element-wise transforms around 16 GEMMs of
(tiles, C_in) x (C_in, C_out); its input and weight gradients are GEMMs of the same size. With
64 channels the transforms cost more than the products save (measured, see README).
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
# At most this many input channels (the image's), the 9x copy is small at any resolution: 9
# columns for a grey image, where XLA's conv of one channel runs far below its rate (model.py).
MAX_CHANNELS_FOR_IM2COL = 4
MIN_CHANNELS_FOR_WINOGRAD = 128  # below this (in or out) the transforms cost more than they save


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
  # dx is the conv of dy with w flipped in space and its in/out channels swapped, written out:
  # JAX's own transpose rule hands XLA the kernel as (kh, kw, out, in), which XLA's CPU backend
  # copies to its fast convolutions' (kh, kw, in, out) outside loops but not in a loop body (the
  # gradient accumulation scan), where it ran on XLA's generic emitter at 1/6 the speed.
  dx = _conv(dy, jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3))
  if x.shape[1] * x.shape[2] >= MIN_PIXELS_FOR_BANDS:
    dw = banded_weight_grad(x, dy, stream_bands=stream_bands).astype(w.dtype)
  else:
    _, weight_vjp = jax.vjp(functools.partial(_conv, x), w)
    (dw,) = weight_vjp(dy)
  return dx, dw


conv3x3.defvjp(_fwd, _bwd)


def im2col_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  """3x3 conv, stride 1, zero padding 1, NHWC x HWIO, as one (N*H*W, 9*C_in) x (9*C_in, C_out)
  GEMM; autodiff turns it into GEMMs for both gradients. For small maps or few input channels
  only: it copies the input 9 times."""
  n, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Column order (kh, kw, c) matches the row-major reshape of the HWIO kernel. The taps are
  # stacked on an axis of their own, not concatenated along channels: that concatenation, with
  # the image as input, came out wrong (0.06-0.4 relative in 2 steps) from XLA's CPU backend on 8
  # devices with LLVM at -O0 (the tests' setting), the legacy fusion emitters and the memory
  # scheduler together (step_compilation.py); the stacked form is the same numbers either way.
  cols = jnp.stack([xp[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], axis=3)
  y = jnp.dot(cols.reshape(n * h * wd, 9 * c), w.reshape(9 * c, w.shape[-1]),
              preferred_element_type=jnp.float32)
  return y.reshape(n, h, wd, w.shape[-1]).astype(x.dtype)


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): y = A^T [(G g G^T) * (B^T d B)] A per 2x2 output
# block, d its 4x4 input tile, g the 3x3 kernel. Each transform (and its transpose, for the
# gradients) is applied along one spatial axis, then the other, to a list of arrays.

def _input_transform(v: list) -> list:  # B^T
  return [v[0] - v[2], v[1] + v[2], v[2] - v[1], v[1] - v[3]]


def _kernel_transform(v: list) -> list:  # G
  return [v[0], (v[0] + v[1] + v[2]) * 0.5, (v[0] - v[1] + v[2]) * 0.5, v[2]]


def _kernel_transform_transposed(v: list) -> list:  # G^T
  return [v[0] + (v[1] + v[2]) * 0.5, (v[1] - v[2]) * 0.5, (v[1] + v[2]) * 0.5 + v[3]]


def _output_transform(v: list) -> list:  # A^T
  return [v[0] + v[1] + v[2], v[1] - v[2] - v[3]]


def _output_transform_transposed(v: list) -> list:  # A
  return [v[0], v[0] + v[1], v[0] - v[1], -v[1]]


# G applied to a spatially flipped kernel row gives G's rows in this order: the transformed
# kernel of the input gradient's (flipped) kernel is a permutation of the forward's.
_FLIPPED = (3, 1, 2, 0)


def _transform_2d(transform, grid: list) -> list:
  """out[a][b] = sum_rs T[a, r] T[b, s] grid[r][s], for a transform T given as a function."""
  inner = [transform(row) for row in grid]  # inner[r][b]
  out = [transform([inner[r][b] for r in range(len(grid))]) for b in range(len(inner[0]))]
  return [[out[b][a] for b in range(len(out))] for a in range(len(out[0]))]


def _stack16(grid: list) -> jax.Array:
  return jnp.stack([grid[a][b] for a in range(4) for b in range(4)])


def _tile_views(x: jax.Array, size: int) -> list:
  """views[r][s]: element (r, s) of each size x size tile, tiles 2 apart, as (N, H/2, W/2, C).

  x's H and W are padded with zeros to even sizes (size 4: plus the conv's one pixel each
  side)."""
  _, h, w, _ = x.shape
  th, tw = -(-h // 2), -(-w // 2)
  before = 1 if size == 4 else 0
  xp = jnp.pad(x, ((0, 0), (before, 2 * th + size - 2 - before - h),
                   (before, 2 * tw + size - 2 - before - w), (0, 0)))
  return [[xp[:, r:r + 2 * th:2, s:s + 2 * tw:2] for s in range(size)] for r in range(size)]


def _transformed_tiles(x: jax.Array) -> list:
  """B^T d B for every 4x4 input tile d of x: u[a][b] is (tiles, C)."""
  u = _transform_2d(_input_transform, _tile_views(x, 4))
  return [[t.reshape(-1, x.shape[-1]) for t in row] for row in u]


def _winograd(x: jax.Array, v: jax.Array) -> jax.Array:
  """The conv of x with the kernel whose transform is v (16, C_in, C_out).

  16 separate GEMMs rather than one batched GEMM over stacked tiles: stacking copies the
  transformed tiles once more, which measured slower (README)."""
  n, h, w, _ = x.shape
  th, tw = -(-h // 2), -(-w // 2)
  u = _transformed_tiles(x)
  m = [[jnp.matmul(u[a][b], v[4 * a + b], preferred_element_type=jnp.float32)
        .astype(x.dtype).reshape(n, th, tw, -1) for b in range(4)] for a in range(4)]
  y = _transform_2d(_output_transform, m)
  # y[p][q] holds output pixel (2i + p, 2j + q) of tile (i, j).
  y = jnp.stack([jnp.stack(y[p], axis=3) for p in range(2)], axis=2)  # n, th, 2, tw, 2, o
  return y.reshape(n, 2 * th, 2 * tw, v.shape[-1])[:, :h, :w]


def _kernel_tiles(w: jax.Array) -> jax.Array:
  """G g G^T for the 3x3 kernel: (16, C_in, C_out)."""
  return _stack16(_transform_2d(_kernel_transform, [[w[i, j] for j in range(3)]
                                                      for i in range(3)]))


@jax.custom_vjp
def winograd_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  """3x3 conv, stride 1, zero padding 1, NHWC x HWIO, by Winograd's F(2x2, 3x3).

  Agrees with the direct convolution to float32 rounding (about 1e-6 relative); float32 only
  (the transforms' additions would cost bfloat16 its few bits). Odd sizes get one more zero row
  or column, whose output is cropped. The gradients are written out rather than left to
  autodiff, whose transposed strided slices XLA fused into neighbouring transposes at a high
  cost: the input gradient is the same Winograd conv with the flipped kernel, the weight
  gradient 16 GEMMs in the transformed domain, one per tile position."""
  return _winograd(x, _kernel_tiles(w))


def _winograd_fwd(x, w):
  return winograd_conv3x3(x, w), (x, w)


def _winograd_bwd(residuals, dy):
  x, w = residuals
  v = _kernel_tiles(w)
  flipped = [4 * _FLIPPED[a] + _FLIPPED[b] for a in range(4) for b in range(4)]
  dx = _winograd(dy, jnp.swapaxes(v[jnp.array(flipped)], 1, 2))
  dm = _transform_2d(_output_transform_transposed, _tile_views(dy, 2))
  # The transformed tiles are recomputed from x here. The barrier keeps XLA from merging them
  # with the forward pass's identical ones, which would keep those (4x x) alive until now.
  u = _transformed_tiles(lax.optimization_barrier(x))
  dv = [[jnp.matmul(u[a][b].T, dm[a][b].reshape(-1, dy.shape[-1]),
                    preferred_element_type=jnp.float32) for b in range(4)] for a in range(4)]
  dw = _transform_2d(_kernel_transform_transposed, dv)
  return dx, jnp.stack([jnp.stack(row) for row in dw]).astype(w.dtype)


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)

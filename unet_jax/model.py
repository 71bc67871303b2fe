"""The UNet, block for block as the PyTorch seed, in Flax linen (NHWC).

Module names follow the seed (`in_conv`, `down1`.., `up1`.., `out_conv`) so that a reader can put
the two side by side and so the conversion table in `convert.py` stays a plain list. Initialisers
reproduce PyTorch's defaults, so a fresh `UNet` starts from the same distribution as the seed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.conv_kernels import (
  MAX_CHANNELS_FOR_IM2COL,
  MAX_PIXELS_FOR_IM2COL,
  MIN_CHANNELS_FOR_WINOGRAD,
  conv3x3,
  im2col_conv3x3,
  winograd_conv3x3,
)
from unet_jax.norm_kernels import batch_norm_relu, batch_statistics, normalise
from unet_jax.pool_kernels import max_pool_2x2
from unet_jax.step_compilation import init_compiler_options

Dtype = Any
Upsample = Literal['transpose', 'bilinear']
WeightGrad = Literal['auto', 'banded', 'xla']
MaxPool = Literal['masks', 'xla']
WideConvs = Literal['auto', 'winograd', 'xla']


def _platform() -> str:
  return jax.default_backend()


def _on_this_platform(choice: str, cpu_kernel: str) -> str:
  """Resolves an 'auto' lever: the CPU kernel on CPU, XLA's own op elsewhere.

  Measured on an H200 (README, Benchmarks, "On a GPU"): the banded weight gradient, written for
  XLA's CPU backend, slows a GPU step to under half its speed, where XLA hands convolutions to
  cuDNN. Decided by JAX's default backend when the model is traced.
  """
  if choice != 'auto':
    return choice
  return cpu_kernel if _platform() == 'cpu' else 'xla'


# PyTorch's Conv2d default (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# which is variance_scaling(1/3, fan_in, uniform). Every parameter is created float32 by name:
# flax's initializers default to JAX's widest float, float64 under jax_enable_x64.
_torch_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
# ConvTranspose2d computes fan_in from its weight's dim 1, i.e. the *output* channels times k*k.
_torch_transpose_kernel_init = nn.initializers.variance_scaling(
    1 / 3, 'fan_in', 'uniform', in_axis=-1, out_axis=-2)


def _torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class BatchNorm(nn.Module):
  """BatchNorm2d with PyTorch's semantics over the channel (last) axis.

  Differs from `flax.linen.BatchNorm` on purpose: the running variance is updated with the
  *unbiased* batch variance (normalisation still uses the biased one), and `momentum` is PyTorch's
  (weight of the new batch). With `axis_name`, statistics are those of the global batch (SyncBN).
  Statistics are computed in float32 whatever `dtype` is.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  axis_name: str | None = None
  fused_relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, relu: bool = False) -> jax.Array:
    """BatchNorm of x; with relu=True, relu(BatchNorm(x)) (fused when training, see below)."""
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)

    if train and not self.is_initializing():
      self._check_count(x)
    if train and relu and self.fused_relu:
      # norm_kernels.batch_norm_relu: same forward, a backward that keeps less and reads less.
      y, mean, var = batch_norm_relu(x, scale, bias, self.epsilon, self.axis_name)
      if not self.is_initializing():
        self._update_running_stats(ra_mean, ra_var, mean, var, x)
      return y.astype(self.dtype)

    if train:
      mean, var = batch_statistics(x.astype(jnp.float32), self.axis_name)
      if not self.is_initializing():
        self._update_running_stats(ra_mean, ra_var, mean, var, x)
    else:
      mean, var = ra_mean.value, ra_var.value

    y = normalise(x.astype(jnp.float32), scale, bias, mean, var, self.epsilon).astype(self.dtype)
    return nn.relu(y) if relu else y

  def _count(self, x: jax.Array) -> int:
    """Values per channel in the batch (global with axis_name); static."""
    count = int(np.prod(x.shape[:-1]))
    if self.axis_name is not None:
      count = count * jax.lax.psum(1, self.axis_name)
    return count

  def _check_count(self, x: jax.Array) -> None:
    # One value per channel normalises every value to the bias and has no unbiased variance:
    # PyTorch refuses it in training with this message, so do we (initialising is exempt, as a
    # dummy input's output is thrown away).
    if self._count(x) == 1:
      raise ValueError('Expected more than 1 value per channel when training, got input size '
                       f'{tuple(x.shape)} (NHWC) at BatchNorm {"/".join(self.scope.path)}; '
                       'use a batch of more than one image, or larger images, or train=False')

  def _update_running_stats(self, ra_mean, ra_var, mean, var, x) -> None:
    count = self._count(x)
    unbiased = var * (count / (count - 1))
    ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
    ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased


class Conv3x3(nn.Module):
  """`Conv2d(cin, features, 3, padding=1)`, stored as `flax.linen.Conv` stores it.

  weight_grad='banded' uses `conv_kernels.conv3x3`, whose weight gradient is about 2x faster on
  CPU at high resolution; 'xla' is the plain `lax` convolution; 'auto' (default) is 'banded' on
  CPU and 'xla' elsewhere. Same numbers to float32 rounding.

  The input may be a sequence of arrays standing for their concatenation along channels (the
  decoder's [skip, upsampled]): each part is convolved with its slice of the one kernel and the
  results summed, so the concatenation is never built (see `Up`).

  wide_convs='winograd' computes a float32 conv (or part) with at least 128 input and output
  channels by Winograd's F(2x2, 3x3) (`conv_kernels.winograd_conv3x3`); 'auto' (default) does so
  on CPU only. small_maps='gemm' (maps of at most 8x8 pixels) and few_channels='gemm' (at most 4
  input channels) compute it as one im2col GEMM (`conv_kernels.im2col_conv3x3`).
  """
  features: int
  use_bias: bool = False
  weight_grad: WeightGrad = 'auto'
  dtype: Dtype = jnp.float32
  small_maps: Literal['gemm', 'xla'] = 'gemm'
  few_channels: Literal['gemm', 'xla'] = 'gemm'
  stream_bands: bool = False  # see conv_kernels.banded_weight_grad; set with remat
  wide_convs: WideConvs = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
    parts = [x] if isinstance(x, jax.Array | np.ndarray) else list(x)
    cin = sum(p.shape[-1] for p in parts)
    kernel = self.param('kernel', _torch_kernel_init, (3, 3, cin, self.features), jnp.float32)
    bias = (self.param('bias', _torch_bias_init(cin * 9), (self.features,))
            if self.use_bias else None)
    *parts, kernel, bias = nn.dtypes.promote_dtype(*parts, kernel, bias, dtype=self.dtype)
    weight_grad = _on_this_platform(self.weight_grad, 'banded')
    if weight_grad == 'banded':
      conv = functools.partial(conv3x3, stream_bands=self.stream_bands)
    elif weight_grad == 'xla':
      conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                               padding=((1, 1), (1, 1)),
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    else:
      raise ValueError(f"weight_grad must be 'auto', 'banded' or 'xla', got {self.weight_grad!r}")
    if self.small_maps not in ('gemm', 'xla'):
      raise ValueError(f"small_maps must be 'gemm' or 'xla', got {self.small_maps!r}")
    wide_convs = _on_this_platform(self.wide_convs, 'winograd')
    if wide_convs not in ('winograd', 'xla'):
      raise ValueError(f"wide_convs must be 'auto', 'winograd' or 'xla', got {self.wide_convs!r}")
    if self.few_channels not in ('gemm', 'xla'):
      raise ValueError(f"few_channels must be 'gemm' or 'xla', got {self.few_channels!r}")
    if self.small_maps == 'gemm' and parts[0].shape[1] * parts[0].shape[2] <= MAX_PIXELS_FOR_IM2COL:
      conv = im2col_conv3x3  # the bottom of the U: see conv_kernels.py
    elif self.few_channels == 'gemm' and cin <= MAX_CHANNELS_FOR_IM2COL:
      conv = im2col_conv3x3  # the image's conv: see conv_kernels.py
    elif wide_convs == 'winograd' and parts[0].dtype == jnp.float32:
      conv = functools.partial(_winograd_if_wide, otherwise=conv)
    y, start = None, 0
    for part in parts:
      c = part.shape[-1]
      term = conv(part, kernel[:, :, start:start + c] if len(parts) > 1 else kernel)
      y = term if y is None else y + term
      start += c
    return y if bias is None else y + bias.reshape(1, 1, 1, -1)


def _winograd_if_wide(x: jax.Array, kernel: jax.Array, otherwise) -> jax.Array:
  """Winograd's F(2x2, 3x3) where it pays (see conv_kernels.py), `otherwise` elsewhere."""
  if min(kernel.shape[2:]) >= MIN_CHANNELS_FOR_WINOGRAD:
    return winograd_conv3x3(x, kernel)
  return otherwise(x, kernel)


class DoubleConv(nn.Module):
  """(3x3 conv -> BatchNorm -> ReLU) x 2; the seed's `double_conv` Sequential."""
  features: int
  mid_features: int | None = None
  conv_bias: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None
  weight_grad: WeightGrad = 'auto'
  bn_relu: Literal['fused', 'xla'] = 'fused'
  small_maps: Literal['gemm', 'xla'] = 'gemm'
  few_channels: Literal['gemm', 'xla'] = 'gemm'
  stream_bands: bool = False
  wide_convs: WideConvs = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array], *, train: bool) -> jax.Array:
    """x: an array, or parts standing for their channel concatenation (see Conv3x3)."""
    if self.bn_relu not in ('fused', 'xla'):
      raise ValueError(f"bn_relu must be 'fused' or 'xla', got {self.bn_relu!r}")
    mid = self.mid_features or self.features
    for i, feats in ((1, mid), (2, self.features)):
      x = Conv3x3(feats, self.conv_bias, self.weight_grad, self.dtype, self.small_maps,
                  self.few_channels, self.stream_bands, self._wide_convs(), name=f'conv{i}')(x)
      x = BatchNorm(dtype=self.dtype, axis_name=self.axis_name, fused_relu=self.bn_relu == 'fused',
                    name=f'norm{i}')(x, train=train, relu=True)
    return x

  def _wide_convs(self) -> str:
    return self.wide_convs


class _PositionalDoubleConv(DoubleConv):
  # nn.remat needs `train` positional to mark it static; the public block keeps it keyword-only.
  def __call__(self, x: jax.Array | Sequence[jax.Array],  # type: ignore[override]
               train: bool) -> jax.Array:
    return super().__call__(x, train=train)


def _double_conv(remat: bool):
  """A DoubleConv class; with remat, its activations are recomputed in the backward pass.

  With remat each conv's input is recomputed right before its weight gradient, so the weight
  gradient streams its bands from it rather than copying them (conv_kernels.banded_weight_grad),
  and 'auto' leaves Winograd's conv out.
  """
  if remat:
    return nn.remat(_StreamingDoubleConv, static_argnums=(2,))
  return _PositionalDoubleConv


class _StreamingDoubleConv(_PositionalDoubleConv):
  stream_bands: bool = True

  def _wide_convs(self) -> str:
    # remat is the memory setting: Winograd's transforms (4x a conv's input and output, at the
    # peak of the backward pass) took the remat step at 480x480 from 600 to 825 MB per image.
    return 'xla' if self.wide_convs == 'auto' else self.wide_convs


class Down(nn.Module):
  """2x2 max-pool (floor) then DoubleConv; the seed's `downsampling`."""
  features: int
  conv_bias: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None
  weight_grad: WeightGrad = 'auto'
  remat: bool = False
  max_pool: MaxPool = 'masks'
  bn_relu: Literal['fused', 'xla'] = 'fused'
  small_maps: Literal['gemm', 'xla'] = 'gemm'
  few_channels: Literal['gemm', 'xla'] = 'gemm'
  wide_convs: WideConvs = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.max_pool == 'masks':
      x = max_pool_2x2(x)
    elif self.max_pool == 'xla':
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
    else:
      raise ValueError(f"max_pool must be 'masks' or 'xla', got {self.max_pool!r}")
    return _double_conv(self.remat)(
        self.features, conv_bias=self.conv_bias, dtype=self.dtype, axis_name=self.axis_name,
        weight_grad=self.weight_grad, bn_relu=self.bn_relu, small_maps=self.small_maps,
        few_channels=self.few_channels, wide_convs=self.wide_convs, name='conv')(x, train)


def _resize_axis_align_corners(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """Linear interpolation along one axis with PyTorch's align_corners=True arithmetic."""
  in_size = x.shape[axis]
  # Index and weight arithmetic in float32, as PyTorch's CPU kernel does it.
  scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
  src = scale * np.arange(out_size, dtype=np.float32)
  i0 = src.astype(np.int64)
  i1 = i0 + (i0 < in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  w0 = np.float32(1) - w1
  bshape = [1] * x.ndim
  bshape[axis] = out_size
  lo = jnp.take(x, i0, axis=axis)
  hi = jnp.take(x, i1, axis=axis)
  return (lo * w0.reshape(bshape).astype(x.dtype) + hi * w1.reshape(bshape).astype(x.dtype))


def upsample_bilinear_align_corners(x: jax.Array, factor: int = 2) -> jax.Array:
  """`nn.Upsample(scale_factor=factor, mode='bilinear', align_corners=True)` on NHWC.

  `jax.image.resize` uses half-pixel centres (align_corners=False), which is not what
  milesial/Pytorch-UNet's bilinear variant computes.
  """
  x = _resize_axis_align_corners(x, 1, x.shape[1] * factor)
  return _resize_axis_align_corners(x, 2, x.shape[2] * factor)


def pad_to_match(x: jax.Array, ref: jax.Array) -> jax.Array:
  """Zero-pads H, W of `x` to those of `ref`, centred, extra pixel bottom/right (as milesial)."""
  dy = ref.shape[1] - x.shape[1]
  dx = ref.shape[2] - x.shape[2]
  if dy == 0 and dx == 0:
    return x
  return jnp.pad(x, ((0, 0), (dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2), (0, 0)))


class ConvTranspose2x2(nn.Module):
  """`ConvTranspose2d(cin, features, kernel_size=2, stride=2)`, with flax's kernel layout.

  The kernel is stored as `flax.linen.ConvTranspose` stores it, (2, 2, in, out), spatially
  flipped relative to PyTorch's weight, so checkpoints are interchangeable with that module.
  With stride equal to the kernel size no two taps overlap, so each output pixel is one matrix
  product: impl='gemm' computes it as a single (N*H*W, in) x (in, 4*out) GEMM, which on CPU is
  many times faster than XLA's transposed convolution (impl='xla'), and its gradients are GEMMs
  too. Both give the same numbers to float32 rounding.
  """
  features: int
  impl: Literal['gemm', 'xla'] = 'gemm'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = self.param('kernel', _torch_transpose_kernel_init, (2, 2, cin, self.features),
                        jnp.float32)
    bias = self.param('bias', _torch_bias_init(self.features * 4), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.impl == 'xla':  # what flax.linen.ConvTranspose computes
      y = jax.lax.conv_transpose(x, kernel, (2, 2), 'VALID',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return y + bias.reshape(1, 1, 1, -1)
    if self.impl != 'gemm':
      raise ValueError(f"transpose_conv must be 'gemm' or 'xla', got {self.impl!r}")
    n, h, w, _ = x.shape
    # Output pixel (2i+a, 2j+b) takes x[i, j] through the unflipped tap (1-a, 1-b). Written as a
    # 2-D product with (a, b, out) as its columns: an einsum straight to (n, h, a, w, b, out) led
    # XLA's CPU layout pass to compute the product transposed, (4*out, N*H*W), with two full
    # transposes around it (eval 0.93 -> 0.83 s per batch for the seed here; README). The bias
    # is added before the interleave, in the product's output: one full-size buffer fewer at
    # the training step's peak (XLA's buffers 661 -> 629 MB at 8x1x128x128).
    taps = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(cin, 4 * self.features)
    y = jnp.matmul(x.reshape(n * h * w, cin), taps) + jnp.tile(bias, 4)[None]
    y = y.reshape(n, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, 2 * h, 2 * w, self.features)


class Up(nn.Module):
  """Upsample 2x, pad to the skip's size, concat [skip, upsampled], DoubleConv."""
  features: int
  upsample: Upsample = 'transpose'
  conv_bias: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None
  transpose_conv: Literal['gemm', 'xla'] = 'gemm'
  weight_grad: WeightGrad = 'auto'
  remat: bool = False
  bn_relu: Literal['fused', 'xla'] = 'fused'
  skip_concat: Literal['split', 'concat'] = 'split'
  small_maps: Literal['gemm', 'xla'] = 'gemm'
  few_channels: Literal['gemm', 'xla'] = 'gemm'
  wide_convs: WideConvs = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, *, train: bool) -> jax.Array:
    if self.upsample == 'transpose':
      # Stored as flax's ConvTranspose stores it; convert.py flips PyTorch's weight.
      x = ConvTranspose2x2(x.shape[-1] // 2, self.transpose_conv, self.dtype,
                           name='upsample')(x)
      mid = None
    elif self.upsample == 'bilinear':
      x = upsample_bilinear_align_corners(x)
      mid = (x.shape[-1] + skip.shape[-1]) // 2
    else:
      raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {self.upsample!r}")
    x = pad_to_match(x, skip).astype(skip.dtype)
    if self.skip_concat == 'split':  # conv1 takes the two parts; no concatenated copy is made
      x = (skip, x)
    elif self.skip_concat == 'concat':
      x = jnp.concatenate([skip, x], axis=-1)
    else:
      raise ValueError(f"skip_concat must be 'split' or 'concat', got {self.skip_concat!r}")
    return _double_conv(self.remat)(
        self.features, mid, conv_bias=self.conv_bias, dtype=self.dtype,
        axis_name=self.axis_name, weight_grad=self.weight_grad, bn_relu=self.bn_relu,
        small_maps=self.small_maps, few_channels=self.few_channels, wide_convs=self.wide_convs,
        name='conv')(x, train)


class Conv1x1(nn.Module):
  """`Conv2d(cin, features, 1)` with bias, stored as `flax.linen.Conv` stores it (1, 1, in, out).

  Computed as one (N*H*W, in) x (in, out) matrix product: XLA's CPU convolution for a 1x1
  kernel with one output channel took about 22 ms here against 2 ms for the product.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _torch_kernel_init, (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', _torch_bias_init(x.shape[-1]), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.einsum('nhwc,co->nhwo', x, kernel[0, 0]) + bias.reshape(1, 1, 1, -1)


class OutConv(nn.Module):
  """1x1 conv to class logits (with bias)."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv1x1(self.num_classes, dtype=self.dtype, name='conv')(x)


# The name of deep supervision's heads, `ds_out{k}` on the output of `up{k}`.
DEEP_SUPERVISION_HEAD = 'ds_out'


class UNet(nn.Module):
  """The classic UNet. NHWC in, NHWC logits out, same H and W as the input.

  Any H, W >= 2**depth work, not only multiples of 2**depth: the upsampled map is padded to the
  skip's size before the concat, as milesial/Pytorch-UNet does.

  Defaults are the seed's model: `UNet(1, 1)` has 31,036,481 parameters. `upsample='bilinear'`
  is milesial/Pytorch-UNet's bilinear variant (bottom level halved, narrower decoder).

  The speed levers below change how, never what, it computes. Four of their defaults are custom
  VJPs, which JAX differentiates in reverse mode only: for `jax.jvp`, `jax.jacfwd` or
  Hessian-vector products build it with `**levers.FORWARD_MODE`.

  Attributes:
    conv_bias: bias on the 3x3 convs (older milesial checkpoints have it; the seed does not).
    dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    axis_name: a bound mapped axis over which BatchNorm averages its statistics (SyncBN).
    transpose_conv: 'gemm' (default; one GEMM, 1.4x the step speed on an H200 and 2x on CPU)
      or 'xla' (lax.conv_transpose); same numbers.
    conv_weight_grad: 'banded' (fast on CPU) or 'xla': how 3x3 convs compute their weight
      gradient (see conv_kernels.py); same numbers to float32 rounding. 'auto' (default):
      'banded' when JAX's default backend is the CPU, 'xla' (cuDNN's) on a GPU.
    max_pool: 'masks' (default; see pool_kernels.py) or 'xla' (flax's max_pool): how the 2x2
      max-pool routes its gradient; identical results, ties included. 'masks' is faster on CPU
      (1.05x the step) and on an H100 (1.03x).
    bn_relu: 'fused' (default; see norm_kernels.py) or 'xla' (autodiff of BatchNorm then ReLU):
      how training-mode BatchNorm+ReLU computes its gradient; same numbers to float32 rounding.
    skip_concat: 'split' (default) convolves the skip and the upsampled map separately with
      the two halves of the decoder's first kernel and sums them; 'concat' concatenates first, as
      the seed does. Same numbers to float32 rounding; 'split' never builds the concatenation.
    small_maps: 'gemm' (default) computes 3x3 convs on maps of at most 8x8 pixels as one im2col
      GEMM (see conv_kernels.py); 'xla' uses XLA's convolution there too. Same numbers to
      float32 rounding.
    few_channels: 'gemm' (default) computes 3x3 convs with at most 4 input channels (the
      image's conv) as the same im2col GEMM, its copy of the input 9 channels for a grey image;
      'xla' uses XLA's convolution, which runs far below its rate on one channel. Same numbers
      to float32 rounding.
    wide_convs: 'winograd' computes float32 3x3 convs with at least 128 input and output channels
      by Winograd's F(2x2, 3x3) (2.25x fewer multiplies; see conv_kernels.py) or 'xla'; same
      numbers to float32 rounding (about 1e-6 relative). 'auto' (default): 'winograd' when JAX's
      default backend is the CPU, 'xla' elsewhere (not measured on a GPU) and with remat (its
      transforms need memory).
    remat: recompute activations in the backward pass instead of keeping them (each
      DoubleConv's, and the sub-U below full resolution as one piece): same results, about
      half the memory per image, about 1.4x the step time on CPU. On CPU, compile the step with
      `step_compilation.compiler_options`, or XLA merges the recomputation away.
    deep_supervision: nnU-Net's deep supervision: a 1x1 conv head (`ds_out{k}`, with bias)
      on the output of each Up block `up{k}` from `up2` to `up{depth-1}`, whose logits at
      1/2 .. 1/2**(depth-2) of the input's size `all_scales=True` returns after the full-size
      ones (for the loss, `deep_supervision.deep_supervision_loss`). nnU-Net also computes the
      coarsest decoder output's, which its loss weighs 0: left out here. Needs depth >= 3.
      Without `all_scales` the heads are not computed: evaluation and prediction are the plain
      UNet's.
    eval_norms: top-level modules (`in_conv`, `down1`, .., `up1`, ..) whose BatchNorms run as in
      evaluation also when `train=True`: normalised by their running statistics, which stay as
      they are (torch's `module.eval()` inside a model in train mode, as fine-tuning with frozen
      layers does; config.freeze_batch_norm). A runtime choice: not in the saved model config.
  """
  in_channels: int = 1
  num_classes: int = 1
  base_features: int = 64
  depth: int = 4
  upsample: Upsample = 'transpose'
  conv_bias: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None
  transpose_conv: Literal['gemm', 'xla'] = 'gemm'
  conv_weight_grad: WeightGrad = 'auto'
  remat: bool = False
  max_pool: MaxPool = 'masks'
  bn_relu: Literal['fused', 'xla'] = 'fused'
  skip_concat: Literal['split', 'concat'] = 'split'
  small_maps: Literal['gemm', 'xla'] = 'gemm'
  few_channels: Literal['gemm', 'xla'] = 'gemm'
  wide_convs: WideConvs = 'auto'
  deep_supervision: bool = False
  eval_norms: tuple[str, ...] = ()

  def trains(self, module: str, train: bool) -> bool:
    """Whether the top-level `module`'s BatchNorms normalise by the batch and update their
    statistics: `train`, unless `eval_norms` names it."""
    return train and module not in self.eval_norms

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, all_scales: bool = False,
               ) -> jax.Array | list[jax.Array]:
    """Logits (N, H, W, num_classes) in float32; with `all_scales` (deep_supervision only) a
    list: those, then the heads' at 1/2, 1/4, .. of H and W (floor at each level)."""
    for field in ('in_channels', 'num_classes', 'base_features', 'depth'):
      if getattr(self, field) < 1:
        raise ValueError(f'UNet {field} must be at least 1, got {getattr(self, field)}')
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'UNet expects NHWC input with {self.in_channels} channels, '
                       f'got shape {tuple(x.shape)}')
    if min(x.shape[1:3]) < 2**self.depth:
      # Each level halves H and W (floor); below 1 pixel the bottom of the U would be empty.
      raise ValueError(f'UNet of depth {self.depth} needs H and W of at least {2**self.depth}, '
                       f'got {x.shape[1]}x{x.shape[2]}')
    if self.upsample not in ('transpose', 'bilinear'):
      raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {self.upsample!r}")
    if self.deep_supervision and self.depth < 3:
      raise ValueError(f'deep_supervision needs depth >= 3 (heads on up2 .. up{{depth-1}}), got '
                       f'depth {self.depth}')
    if all_scales and not self.deep_supervision:
      raise ValueError('all_scales=True needs a UNet built with deep_supervision=True')
    x = x.astype(self.dtype)
    x = _double_conv(self.remat)(self.base_features, name='in_conv',
                                 **_without_remat(self._block_settings()))(
                                     x, self.trains('in_conv', train))
    # Everything below full resolution is one piece. With remat that piece is recomputed in the
    # backward pass as a whole, so none of its activations are held while the full-resolution
    # blocks, whose maps are the largest, run their backward pass.
    below = (nn.remat(_below_full_resolution, static_argnums=(2,)) if self.remat
             else _below_full_resolution)
    half, decoded = below(self, x, train)
    x = Up(self.base_features, self.upsample, transpose_conv=self.transpose_conv,
           skip_concat=self.skip_concat, name=f'up{self.depth}',
           **self._block_settings())(half, x, train=self.trains(f'up{self.depth}', train))
    logits = OutConv(self.num_classes, dtype=self.dtype, name='out_conv')(x)
    if not (self.deep_supervision and (all_scales or self.is_initializing())):
      return logits.astype(jnp.float32)
    # finest first: up{depth-1}'s head (1/2 of the input's size) .. up2's
    coarser = [OutConv(self.num_classes, dtype=self.dtype,
                       name=f'{DEEP_SUPERVISION_HEAD}{k}')(decoded[k - 1])
               for k in range(self.depth - 1, 1, -1)]
    return [y.astype(jnp.float32) for y in (logits, *coarser)]

  def _block_settings(self) -> dict[str, Any]:
    """The settings every Down and Up block takes from the UNet."""
    return dict(conv_bias=self.conv_bias, dtype=self.dtype, axis_name=self.axis_name,
                weight_grad=self.conv_weight_grad, remat=self.remat, bn_relu=self.bn_relu,
                small_maps=self.small_maps, few_channels=self.few_channels,
                wide_convs=self.wide_convs)


def _without_remat(settings: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in settings.items() if k != 'remat'}


def _below_full_resolution(unet: UNet, x: jax.Array, train: bool,
                           ) -> tuple[jax.Array, list[jax.Array]]:
  """down1 .. down{depth}, then up1 .. up{depth-1}: the full-resolution map x to the half-
  resolution map that the last Up block upsamples, and the outputs of up1 .. up{depth-1} (that
  one last; deep supervision's heads read them). A function of the UNet (not a submodule), so
  parameter names stay `down1`, `up1`, ... as in the seed."""
  factor = 2 if unet.upsample == 'bilinear' else 1
  f, depth = unet.base_features, unet.depth
  settings = unet._block_settings()
  skips = []  # the outputs of down1 .. down{depth-1}; the bottom of the U is not a skip
  for k in range(1, depth + 1):
    features = f * 2**k // (factor if k == depth else 1)
    x = Down(features, max_pool=unet.max_pool, name=f'down{k}', parent=unet,
             **settings)(x, train=unet.trains(f'down{k}', train))
    if k < depth:
      skips.append(x)
  decoded = []
  for k in range(1, depth):
    level = depth - k
    features = f * 2**level // factor
    x = Up(features, unet.upsample, transpose_conv=unet.transpose_conv,
           skip_concat=unet.skip_concat, name=f'up{k}', parent=unet,
           **settings)(x, skips.pop(), train=unet.trains(f'up{k}', train))
    decoded.append(x)
  return x, decoded


def init_variables(model: UNet, key: jax.Array) -> dict[str, Any]:
  """`model.init(key, x, train=False)`'s variables ({'params', 'batch_stats'}), fast.

  Called directly, flax's `init` runs the model op by op, compiling each op and each
  parameter's random draw on its own; under a plain `jax.jit`, LLVM's full optimisation of the
  random draws is most of the compile. For the seed UNet on this project's 2-core CPU: 37-39 s
  and 15 s. This compiles the initialisation as one program, on CPU at XLA's lower LLVM level
  (`step_compilation.init_compiler_options`, same bits), run on the smallest input the model
  takes, since no variable depends on the input's size: 6 s. Same variables, to the
  bit, as `model.init` with the same key. Outside any mapped axis (`axis_name` is dropped).
  Traceable: inside a jitted function it is part of that function's program.
  """
  model = model.clone(axis_name=None, parent=None)
  if isinstance(key, jax.core.Tracer):  # compiler options belong to the outermost jit only
    return _init_on_smallest_input(model, key)
  return _compiled_init(model, _platform())(key)


def _init_on_smallest_input(model: UNet, key: jax.Array) -> dict[str, Any]:
  x = jnp.zeros((1, 2**model.depth, 2**model.depth, model.in_channels), jnp.float32)
  return model.init(key, x, train=False)


# Bounded: a process that builds many model configurations (a sweep) keeps only the recent
# compiled initialisations alive.
@functools.lru_cache(maxsize=16)
def _compiled_init(model: UNet, platform: str) -> Any:
  return jax.jit(functools.partial(_init_on_smallest_input, model),
                 compiler_options=init_compiler_options(platform) or None)

"""The UNet, block for block as the PyTorch seed, in Flax linen (NHWC).

Module names follow the seed (`in_conv`, `down1`.., `up1`.., `out_conv`) so that a reader can put
the two side by side and so the conversion table in `convert.py` stays a plain list. Initialisers
reproduce PyTorch's defaults, so a fresh `UNet` starts from the same distribution as the seed.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Upsample = Literal['transpose', 'bilinear']

# PyTorch's Conv2d default (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# which is variance_scaling(1/3, fan_in, uniform).
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

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)

    if train:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      count = np.prod([x.shape[a] for a in axes])
      mean = xf.mean(axes)
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
        count = count * jax.lax.psum(1, self.axis_name)
      # Two passes (mean, then centred squares) as PyTorch does; E[x^2]-E[x]^2 loses digits.
      var = jnp.square(xf - mean).mean(axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / max(count - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value

    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (x.astype(jnp.float32) - mean) * mul + bias
    return y.astype(self.dtype)


class DoubleConv(nn.Module):
  """(3x3 conv -> BatchNorm -> ReLU) x 2; the seed's `double_conv` Sequential."""
  features: int
  mid_features: int | None = None
  conv_bias: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    mid = self.mid_features or self.features
    for i, feats in ((1, mid), (2, self.features)):
      fan_in = x.shape[-1] * 9
      x = nn.Conv(feats, (3, 3), padding=((1, 1), (1, 1)), use_bias=self.conv_bias,
                  dtype=self.dtype, kernel_init=_torch_kernel_init,
                  bias_init=_torch_bias_init(fan_in), name=f'conv{i}')(x)
      x = BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=f'norm{i}')(x, train=train)
      x = nn.relu(x)
    return x


class Down(nn.Module):
  """2x2 max-pool (floor) then DoubleConv; the seed's `downsampling`."""
  features: int
  conv_bias: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
    return DoubleConv(self.features, conv_bias=self.conv_bias, dtype=self.dtype,
                      axis_name=self.axis_name, name='conv')(x, train=train)


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


class Up(nn.Module):
  """Upsample 2x, pad to the skip's size, concat [skip, upsampled], DoubleConv."""
  features: int
  upsample: Upsample = 'transpose'
  conv_bias: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, *, train: bool) -> jax.Array:
    if self.upsample == 'transpose':
      cin = x.shape[-1]
      # flax's ConvTranspose does not flip the kernel; convert.py flips PyTorch's weight.
      x = nn.ConvTranspose(cin // 2, (2, 2), strides=(2, 2), padding='VALID', dtype=self.dtype,
                           kernel_init=_torch_transpose_kernel_init,
                           bias_init=_torch_bias_init(cin // 2 * 4), name='upsample')(x)
      mid = None
    elif self.upsample == 'bilinear':
      x = upsample_bilinear_align_corners(x)
      mid = (x.shape[-1] + skip.shape[-1]) // 2
    else:
      raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {self.upsample!r}")
    x = pad_to_match(x, skip)
    x = jnp.concatenate([skip, x.astype(skip.dtype)], axis=-1)
    return DoubleConv(self.features, mid, conv_bias=self.conv_bias, dtype=self.dtype,
                      axis_name=self.axis_name, name='conv')(x, train=train)


class OutConv(nn.Module):
  """1x1 conv to class logits (with bias)."""
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=_torch_kernel_init,
                   bias_init=_torch_bias_init(x.shape[-1]), name='conv')(x)


class UNet(nn.Module):
  """The classic UNet. NHWC in, NHWC logits out, same H and W as the input.

  Any H, W >= 2**depth work, not only multiples of 2**depth: the upsampled map is padded to the
  skip's size before the concat, as milesial/Pytorch-UNet does.

  Defaults are the seed's model: `UNet(1, 1)` has 31,036,481 parameters. `upsample='bilinear'`
  is milesial/Pytorch-UNet's bilinear variant (bottom level halved, narrower decoder).

  Attributes:
    conv_bias: bias on the 3x3 convs (older milesial checkpoints have it; the seed does not).
    dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    axis_name: a bound mapped axis over which BatchNorm averages its statistics (SyncBN).
  """
  in_channels: int = 1
  num_classes: int = 1
  base_features: int = 64
  depth: int = 4
  upsample: Upsample = 'transpose'
  conv_bias: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'UNet expects NHWC input with {self.in_channels} channels, '
                       f'got shape {tuple(x.shape)}')
    if min(x.shape[1:3]) < 2**self.depth:
      # Each level halves H and W (floor); below 1 pixel the bottom of the U would be empty.
      raise ValueError(f'UNet of depth {self.depth} needs H and W of at least {2**self.depth}, '
                       f'got {x.shape[1]}x{x.shape[2]}')
    if self.upsample not in ('transpose', 'bilinear'):
      raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {self.upsample!r}")
    factor = 2 if self.upsample == 'bilinear' else 1
    common = dict(conv_bias=self.conv_bias, dtype=self.dtype, axis_name=self.axis_name)

    f = self.base_features
    x = x.astype(self.dtype)
    x = DoubleConv(f, name='in_conv', **common)(x, train=train)
    skips = [x]
    for k in range(1, self.depth + 1):
      features = f * 2**k // (factor if k == self.depth else 1)
      x = Down(features, name=f'down{k}', **common)(x, train=train)
      skips.append(x)
    skips.pop()  # the bottom of the U is not a skip
    for k in range(1, self.depth + 1):
      level = self.depth - k
      features = f * 2**level // factor if level > 0 else f
      x = Up(features, self.upsample, name=f'up{k}', **common)(x, skips.pop(), train=train)
    logits = OutConv(self.num_classes, dtype=self.dtype, name='out_conv')(x)
    return logits.astype(jnp.float32)

"""Floating-point operations of the seed UNet, counted from its layers (for MFU).

Only the convolutions are counted (3x3, 2x2 transposed, 1x1 out_conv), two operations per
multiply-add, as PyTorch's `torch.utils.flop_counter` and MFU conventions do; BatchNorm, ReLU,
max-pooling and the optimizer are left out. A training step runs each convolution three times
(forward, input gradient, weight gradient), except that nothing needs the gradient of the input
image, so the first convolution runs twice. tests/test_benchmarks.py checks both counts against
PyTorch's flop counter on the reference model.
"""

from __future__ import annotations


def _conv(pixels: int, cin: int, cout: int, taps: int) -> int:
  return 2 * pixels * cin * cout * taps


def seed_unet_flops(size: int, in_channels: int = 1, num_classes: int = 1, base: int = 64,
                    depth: int = 4) -> dict[str, int]:
  """Forward and training-step FLOPs per image of a size x size input.

  Returns {'forward': ..., 'train': ..., 'first_conv': ...}; `size` must be divisible by
  2**depth, as the seed requires.
  """
  if size % 2**depth:
    raise ValueError(f'size {size} is not divisible by 2**depth = {2**depth}')

  def double_conv(side: int, cin: int, cout: int) -> int:
    return _conv(side * side, cin, cout, 9) + _conv(side * side, cout, cout, 9)

  first_conv = _conv(size * size, in_channels, base, 9)
  forward = double_conv(size, in_channels, base)
  for k in range(1, depth + 1):  # down_k: max-pool, then DoubleConv at size / 2**k
    forward += double_conv(size >> k, base << (k - 1), base << k)
  for level in reversed(range(depth)):  # up: 2x2 transposed conv, then DoubleConv on the concat
    side, cin = size >> level, base << (level + 1)
    forward += _conv(side * side, cin, cin // 2, 1)  # each output pixel sees one kernel tap
    forward += double_conv(side, cin, base << level)
  forward += _conv(size * size, base, num_classes, 1)
  return {'forward': forward, 'train': 3 * forward - first_conv, 'first_conv': first_conv}


# Dense bf16 / fp32 (non-tensor-core) peaks of the SXM parts, TFLOP/s, from NVIDIA's datasheets;
# matched against the device name that PyTorch or JAX reports.
PEAK_TFLOPS = {
    'H100 PCIE': {'bf16': 756.0, 'fp32': 51.2},
    'H200': {'bf16': 989.4, 'fp32': 66.9},
    'H100': {'bf16': 989.4, 'fp32': 66.9},
    'A100': {'bf16': 312.0, 'fp32': 19.5},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
  """The datasheet peak for a device name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
  for key, peaks in PEAK_TFLOPS.items():
    if key in device_name.upper():
      return peaks.get(precision)
  return None

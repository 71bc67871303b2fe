"""Floating-point operations of the seed UNet, counted from its layers (for MFU), and a bound.

    python benchmarks/model_flops.py [--size 480] [--batch 16] [--gemm_tflops 790] ...
    python benchmarks/model_flops.py --measure      # the rates of this machine's card (torch)

prints the training step's FLOPs and the fastest step a GPU could run if every convolution ran at
the matrix-product rate and BatchNorm's passes over memory were the only other cost (see
`step_time_bound`): the MFU ceiling of a UNet whose BatchNorms are kernels of their own.
`--measure` times a bf16 matrix product and a device-to-device copy first (`measure_rates`) and
bounds the step with what they reached instead of the defaults.

Only the convolutions are counted (3x3, 2x2 transposed, 1x1 out_conv), two operations per
multiply-add, as PyTorch's `torch.utils.flop_counter` and MFU conventions do; BatchNorm, ReLU,
max-pooling and the optimizer are left out. A training step runs each convolution three times
(forward, input gradient, weight gradient), except that nothing needs the gradient of the input
image, so the first convolution runs twice. tests/test_benchmarks.py checks both counts against
PyTorch's flop counter on the reference model.
"""

from __future__ import annotations

import argparse


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


def seed_unet_norm_elements(size: int, base: int = 64, depth: int = 4) -> int:
  """Values normalised per image: the sum of the BatchNorm inputs' sizes (each 3x3 conv's output).

  The decoder's DoubleConvs output base << level channels at their level, as the encoder's do.
  """
  if size % 2**depth:
    raise ValueError(f'size {size} is not divisible by 2**depth = {2**depth}')
  per_level = [2 * (size >> level) ** 2 * (base << level) for level in range(depth + 1)]
  return 2 * sum(per_level[:depth]) + per_level[depth]  # encoder and decoder; the bottom once


# Full passes over each BatchNorm's input (or a tensor of its size) in a training step when
# BatchNorm+ReLU is computed apart from the convolutions, at the least: forward, read x once for
# both statistics, read x and write y; backward, read the output gradient, y and x for the two
# reductions, then again to write the input gradient. (The project's kernel reads x twice for
# the statistics, two-pass as PyTorch's CPU kernel: 11.)
NORM_PASSES = 10


def step_time_bound(size: int, batch: int, gemm_tflops: float, bandwidth_tbs: float,
                    bytes_per_value: int = 2, passes: int = NORM_PASSES) -> dict[str, float]:
  """Seconds per training step if the convolutions ran at `gemm_tflops` and BatchNorm's memory
  passes at `bandwidth_tbs`, everything else free. A lower bound for a step whose BatchNorms
  are not fused into its convolutions (max-pooling, the loss and Adam are left out)."""
  conv_s = seed_unet_flops(size)['train'] * batch / (gemm_tflops * 1e12)
  norm_bytes = seed_unet_norm_elements(size) * batch * bytes_per_value
  norm_s = passes * norm_bytes / (bandwidth_tbs * 1e12)
  return {'conv_s': conv_s, 'norm_s': norm_s, 'step_s': conv_s + norm_s,
          'norm_bytes_per_pass': norm_bytes}


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


def measure_rates(gemm_size: int = 8192, copy_mib: int = 2048, repeats: int = 10
                  ) -> dict[str, float | str]:
  """A bf16 matrix product's TFLOP/s and a copy's TB/s (bytes read plus written) on torch's
  device (CUDA if there is one), each the mean of `repeats` after three warm-ups."""
  import time

  import torch

  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'

  def seconds(fn) -> float:
    for _ in range(3):
      fn()
    if cuda:
      torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
      fn()
    if cuda:
      torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats

  a = torch.randn(gemm_size, gemm_size, device=device, dtype=torch.bfloat16)
  b = torch.randn(gemm_size, gemm_size, device=device, dtype=torch.bfloat16)
  gemm_s = seconds(lambda: a @ b)
  src = torch.empty(copy_mib << 20, device=device, dtype=torch.uint8).fill_(1)
  dst = torch.empty_like(src)
  copy_s = seconds(lambda: dst.copy_(src))
  name = torch.cuda.get_device_name() if cuda else 'cpu'
  return {'device': name, 'gemm_tflops': 2 * gemm_size**3 / gemm_s / 1e12,
          'bandwidth_tbs': 2 * src.numel() / copy_s / 1e12}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=480)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--gemm_tflops', type=float, default=790.0,
                      help='the matrix-product rate reached (790: a bf16 GEMM on an H200)')
  parser.add_argument('--bandwidth_tbs', type=float, default=4.8,
                      help='memory bandwidth, TB/s (4.8: the H200 datasheet; H100 SXM 3.35)')
  parser.add_argument('--peak_tflops', type=float, default=PEAK_TFLOPS['H200']['bf16'])
  parser.add_argument('--measure', action='store_true',
                      help='time a bf16 matrix product and a copy on this machine (torch) and '
                           'use their rates, and the datasheet peak of the card found')
  parser.add_argument('--gemm_size', type=int, default=8192, help='with --measure')
  parser.add_argument('--copy_mib', type=int, default=2048, help='with --measure')
  args = parser.parse_args()
  if args.measure:
    rates = measure_rates(args.gemm_size, args.copy_mib)
    args.gemm_tflops, args.bandwidth_tbs = rates['gemm_tflops'], rates['bandwidth_tbs']
    known = peak_tflops(rates['device'], 'bf16')
    args.peak_tflops = known or args.peak_tflops
    print(f'{rates["device"]}: bf16 matrix product {args.gemm_tflops:.4g} TFLOP/s, copy '
          f'{args.bandwidth_tbs:.3g} TB/s; bf16 peak {args.peak_tflops:.1f} TFLOP/s '
          f'({"datasheet" if known else "not a known card: --peak_tflops"})')
  flops = seed_unet_flops(args.size)['train'] * args.batch
  print(f'training step: {flops / 1e12:.2f} TFLOP ({args.batch} images of {args.size}x{args.size})')
  for passes in (NORM_PASSES, NORM_PASSES + 1):
    b = step_time_bound(args.size, args.batch, args.gemm_tflops, args.bandwidth_tbs,
                        passes=passes)
    mfu = flops / b['step_s'] / 1e12 / args.peak_tflops
    print(f'{passes} BatchNorm passes of {b["norm_bytes_per_pass"] / 1e9:.2f} GB: convolutions '
          f'{b["conv_s"] * 1e3:.1f} ms + BatchNorm {b["norm_s"] * 1e3:.1f} ms = '
          f'{b["step_s"] * 1e3:.1f} ms, MFU at most {mfu:.1%}')
  need = flops / (0.5 * args.peak_tflops * 1e12)
  print(f'MFU 50% needs a step of {need * 1e3:.1f} ms')


if __name__ == '__main__':
  main()

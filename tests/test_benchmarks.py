"""The benchmarks' FLOP count (benchmarks/model_flops.py), checked against PyTorch's counter."""

import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torch_reference import SeedUNet

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
import model_flops  # noqa: E402


@pytest.mark.parametrize('size,in_channels,num_classes,base,depth',
                         [(32, 1, 1, 8, 4), (48, 3, 2, 4, 3), (64, 2, 3, 16, 2)])
def test_seed_unet_flops_match_pytorch_flop_counter(size, in_channels, num_classes, base, depth):
  torch.manual_seed(0)
  model = SeedUNet(in_channels, num_classes, base=base, depth=depth)
  x = torch.randn(2, in_channels, size, size)
  with FlopCounterMode(display=False) as forward_only:
    with torch.no_grad():
      model(x)
  with FlopCounterMode(display=False) as train:
    model(x).sum().backward()
  ours = model_flops.seed_unet_flops(size, in_channels, num_classes, base, depth)
  assert forward_only.get_total_flops() == 2 * ours['forward']
  assert train.get_total_flops() == 2 * ours['train']


def test_seed_unet_flops_at_the_seed_setting():
  # 1x480x480, base 64, depth 4: about 338 GFLOP forward, (480/128)**2 times the 128x128 count.
  at_480 = model_flops.seed_unet_flops(480)
  at_128 = model_flops.seed_unet_flops(128)
  assert at_480['forward'] * 128**2 == at_128['forward'] * 480**2
  assert 3.3e11 < at_480['forward'] < 3.45e11


def test_size_not_divisible_is_refused():
  with pytest.raises(ValueError, match='not divisible by 2\\*\\*depth = 16'):
    model_flops.seed_unet_flops(100)


@pytest.mark.parametrize('name,precision,expected', [
    ('NVIDIA H100 80GB HBM3', 'bf16', 989.4), ('NVIDIA H100 PCIe', 'bf16', 756.0),
    ('NVIDIA H200', 'fp32', 66.9), ('cpu', 'bf16', None)])
def test_peak_tflops_by_device_name(name, precision, expected):
  assert model_flops.peak_tflops(name, precision) == expected


def test_benchmark_and_train_entry_load_no_jax_before_their_work():
  # The torch worker's peak RSS must not include JAX, and train.py re-executes itself (huge
  # pages) before JAX loads: both import unet_jax modules that rely on the lazy package.
  import subprocess
  import textwrap
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = textwrap.dedent(f"""
      import importlib.util, sys
      path = {repo!r} + '/benchmarks/compare_pytorch.py'
      spec = importlib.util.spec_from_file_location('bench', path)
      bench = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(bench)
      import unet_jax, unet_jax.huge_pages
      print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))
      from unet_jax import UNet
      import unet_jax.model
      print(UNet is unet_jax.model.UNet, 'jax' in sys.modules, unet_jax.predict.__name__)
  """)
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=repo)
  assert out.stdout.splitlines() == ['[]', 'True True unet_jax.predict'], out.stderr[-2000:]


@pytest.mark.parametrize('size,base,depth', [(32, 8, 4), (48, 4, 3), (64, 16, 2)])
def test_seed_unet_norm_elements_match_the_reference_batch_norms(size, base, depth):
  model = SeedUNet(1, 1, base=base, depth=depth)
  seen = []
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0][0].numel()))
  with torch.no_grad():
    model(torch.randn(1, 1, size, size))
  assert len(seen) == 4 * depth + 2
  assert sum(seen) == model_flops.seed_unet_norm_elements(size, base, depth)


def test_step_time_bound_adds_convolutions_and_batch_norm_passes():
  b = model_flops.step_time_bound(480, 16, gemm_tflops=790, bandwidth_tbs=4.8)
  assert b['conv_s'] == pytest.approx(16 * model_flops.seed_unet_flops(480)['train'] / 790e12)
  assert b['norm_bytes_per_pass'] == 16 * 2 * model_flops.seed_unet_norm_elements(480)
  assert b['norm_s'] == pytest.approx(10 * b['norm_bytes_per_pass'] / 4.8e12)
  assert b['step_s'] == pytest.approx(b['conv_s'] + b['norm_s'])


def test_measured_rates_bound_the_step_on_this_machine():
  """--measure times torch's matrix product and copy here (the CPU: no datasheet peak known) and
  bounds the step with those rates."""
  import subprocess
  script = os.path.join(os.path.dirname(model_flops.__file__), 'model_flops.py')
  out = subprocess.run([sys.executable, script, '--measure', '--gemm_size', '256', '--copy_mib',
                        '16', '--size', '32', '--batch', '2'],
                       capture_output=True, text=True, check=True).stdout
  head, flops_line, ten, eleven, need = out.strip().split('\n')
  assert head.startswith('cpu: bf16 matrix product ') and 'not a known card' in head
  gemm = float(head.split('product ')[1].split(' TFLOP/s')[0])
  bandwidth = float(head.split('copy ')[1].split(' TB/s')[0])
  assert gemm > 0 and bandwidth > 0
  bound = model_flops.step_time_bound(32, 2, gemm, bandwidth)
  step_ms = float(ten.split(' = ')[1].split(' ms')[0])
  assert step_ms == pytest.approx(bound['step_s'] * 1e3, rel=5e-3)  # the rates print rounded


# Device kernels of the all-XLA step's profile on an H200 (README, "On a GPU"), ms per step.
H200_KERNELS = [
    (18.739, 'sm80_xmma_fprop_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc'),
    (5.709, 'sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64'),
    (1.507, 'sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc'),
    (0.538, 'void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16>'),
    (1.225, 'input_reduce_select_fusion_16'),
    (0.281, 'loop_convert_fusion'),
    (0.986, 'loop_add_fusion'),
    (0.861, 'input_scatter_fusion'),
    (0.411, 'loop_reduce_window_fusion'),
    (0.558, 'loop_pad_fusion'),
    (0.447, 'input_concatenate_fusion'),
    (0.286, 'wrapped_slice_3'),
    (0.322, 'input_transpose_fusion'),
    (0.318, 'void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16>'),
    (0.259, 'input_add_transpose_fusion'),
    (0.120, 'gemm_fusion_dot_7'),
    (0.206, 'memcpy128'),
]


def test_profile_sorts_device_kernels_by_kind():
  import profile_step
  kinds = [profile_step.kernel_kind(name) for _, name in H200_KERNELS]
  assert kinds == ['convolution'] * 4 + ['reduction'] + ['element-wise'] * 2 + ['max-pool'] * 2 + [
      'pad/concat/slice'] * 3 + ['layout'] * 3 + ['matmul', 'other']
  rows = [(ms, 1, '/device:GPU:0', name) for ms, name in H200_KERNELS]
  rows.append((60.0, 1, '/host:CPU', 'np.asarray(jax.Array)'))  # host time is not a kernel's
  summary = profile_step.kind_summary(rows)
  total = sum(ms for ms, _ in H200_KERNELS)
  conv = 18.739 + 5.709 + 1.507 + 0.538
  assert summary[0].split() == [f'{conv:.3f}', 'ms/step', f'{conv / total:.1%}', 'convolution']
  assert summary[-1].split()[0] == f'{total:.3f}'
  assert len(summary) == len(set(kinds)) + 1
  assert profile_step.kind_summary(rows[-1:]) == [
      '(no device kernels in the trace: the summary by kind is for a GPU)']


def test_auto_layout_step_computes_what_the_plain_step_does():
  """profile_step's defaults_auto_layout variant: the state moved into the layouts XLA chose,
  fed back each step, gives the plain jitted step's numbers."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import profile_step

  def step(params, stats, opt, x, y):
    def loss_fn(w):
      out = jax.lax.conv_general_dilated(x, w['k'], (1, 1), 'SAME',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jnp.mean((out - y) ** 2)
    loss, g = jax.value_and_grad(loss_fn)(params)
    new = {'k': params['k'] - 0.1 * g['k']}
    return new, {'n': stats['n'] + 1}, {'m': 0.9 * opt['m'] + g['k']}, loss

  rng = np.random.default_rng(0)
  k = rng.standard_normal((3, 3, 4, 8), np.float32)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32))
  y = jnp.asarray(rng.standard_normal((2, 8, 8, 8), np.float32))

  def fresh():
    return [{'k': jnp.asarray(k)}, {'n': jnp.zeros(())}, {'m': jnp.zeros_like(jnp.asarray(k))}]

  compiled, state = profile_step._compile_with_auto_layouts(step, fresh(), x, y)
  plain = jax.jit(step)
  want = fresh()
  for _ in range(3):
    *state, loss = compiled(*state, x, y)
    *want, want_loss = plain(*want, x, y)
    np.testing.assert_array_equal(loss, want_loss)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)

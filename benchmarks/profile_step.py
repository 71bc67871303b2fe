"""Where a training step's time goes, per kernel, and what each speed lever does, in one process.

    python benchmarks/profile_step.py jax OUT_DIR          # lever variants + kernel profile
    python benchmarks/profile_step.py torch OUT_DIR        # PyTorch AMP eager, kernel table
    python benchmarks/profile_step.py torch_compile OUT_DIR

The seed UNet, Adam, bfloat16 compute (PyTorch: autocast + channels_last), SIZE x SIZE images in
batches of BATCH (environment; 480 and 16 by default). `jax` compiles the plain jitted step once
per variant (every lever on XLA's op, the project's defaults as 'auto' resolves them on this
platform, then each lever switched on alone from all-XLA, the defaults with XLA's max-pool or
XLA's conv of the image, then XLA GPU options), times 5 x 5
steps of each (median), and profiles the all-XLA and the defaults step: `jax_kernels_xla.txt`
and `jax_kernels_defaults.txt` list each kernel's time per step, under a summary by kind
(convolution, reduction, element-wise, layout, ...; device kernels only),
`jax_hlo_*.txt` are the compiled steps. VARIANTS=a,b picks some. Compilation caches are shared
inside the process, so variants after the first compile fast. The torch sides write
`*_kernels.txt`, PyTorch profiler's table sorted by device time. Made for a GPU; runs on CPU too.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = int(os.environ.get('SIZE', 480))
BATCH = int(os.environ.get('BATCH', 16))
BASE = int(os.environ.get('BASE', 64))
PROFILED_STEPS = 3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import ALL_XLA_LEVERS, plain_jax_step, torch_steps  # noqa: E402

from unet_jax.levers import LEVERS  # noqa: E402

# The model's defaults ('auto' resolves to the platform's choice when the step is traced).
DEFAULT_LEVERS = {name: choices[0] for name, choices in LEVERS.items()}

# name: (levers switched on from ALL_XLA_LEVERS, XLA compiler options)
VARIANTS = {
    'xla': ({}, {}),
    'defaults': (DEFAULT_LEVERS, {}),
    'bn_fused': (dict(bn_relu='fused'), {}),
    'tconv_gemm': (dict(transpose_conv='gemm'), {}),
    'split': (dict(skip_concat='split'), {}),
    'small_gemm': (dict(small_maps='gemm'), {}),
    # The CPU kernels, each alone ('auto' picks XLA's op on a GPU). Winograd's conv has no row:
    # it computes float32 convs only, and this step is bfloat16.
    'pool_masks': (dict(max_pool='masks'), {}),
    # max_pool's choice on a GPU: the defaults (masks) against XLA's reduce_window.
    'defaults_pool_xla': ({**DEFAULT_LEVERS, 'max_pool': 'xla'}, {}),
    'banded_wgrad': (dict(conv_weight_grad='banded'), {}),
    # The defaults with the train state kept in the layouts XLA picks for the step (JAX's
    # Layout.AUTO; see AUTO_LAYOUT): on a GPU, cuDNN's weight gradient comes out-in-last and
    # Adam's update of flax's HWIO kernels then runs as a transpose (1.6 ms of an H100 step).
    'defaults_auto_layout': (DEFAULT_LEVERS, {}),
    # few_channels's choice on a GPU: the defaults (the image's conv as an im2col GEMM) against
    # cuDNN's conv of one input channel.
    'defaults_few_xla': ({**DEFAULT_LEVERS, 'few_channels': 'xla'}, {}),
    # XLA options on the defaults: cuDNN's convolutions as XLA fusions (which may take in their
    # neighbours), and Triton's multi-output fusions (BatchNorm's reductions with their inputs).
    'defaults_conv_fusion': (DEFAULT_LEVERS, {'xla_gpu_experimental_enable_conv_fusion': True}),
    'defaults_triton_multi_output': (
        DEFAULT_LEVERS, {'xla_gpu_unsupported_enable_triton_multi_output_fusion': True}),
    'no_cmdbuf': ({}, {'xla_gpu_enable_command_buffer': ''}),
    'runtime_fusion': ({}, {'xla_gpu_use_runtime_fusion': True}),
}

AUTO_LAYOUT = {'defaults_auto_layout'}


def log(*parts) -> None:
  print(*parts, flush=True)


def profile_torch(out: str, compiled: bool) -> None:
  from torch.profiler import ProfilerActivity, profile

  step, _, _, gpu = torch_steps(SIZE, BATCH, 1, 1, BASE, 'bf16', compiled)
  for _ in range(3):
    step().item()
  with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
    for _ in range(PROFILED_STEPS):
      loss = step()
    loss.item()
  key = 'self_cuda_time_total' if gpu else 'self_cpu_time_total'
  table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90)
  name = 'torch_compile' if compiled else 'torch'
  with open(os.path.join(out, f'{name}_kernels.txt'), 'w') as f:
    f.write(f'(totals over {PROFILED_STEPS} steps)\n{table}')
  log(table[:6000])


PROFILED = ('xla', 'defaults')

# (kind, substrings of a kernel's name), tried in order: XLA:GPU's fusion names and cuDNN's and
# cuBLAS's kernel names as the H200 profile showed them.
KERNEL_KINDS = (
    ('layout', ('transpose', 'nchwToNhwc', 'nhwcToNchw')),
    ('convolution', ('implicit_gemm', 'fprop', 'dgrad', 'wgrad', 'onvolution', 'cudnn')),
    ('matmul', ('gemm', 'nvjet', 'cublas', 'triton')),
    ('max-pool', ('reduce_window', 'scatter')),
    ('reduction', ('reduce',)),
    ('pad/concat/slice', ('pad', 'concatenate', 'slice')),
    ('element-wise', ('loop_', 'convert')),
)


def kernel_kind(name: str) -> str:
  """What a device kernel does, from its name (see KERNEL_KINDS); 'other' if none matches."""
  for kind, parts in KERNEL_KINDS:
    if any(part in name for part in parts):
      return kind
  return 'other'


def kind_summary(rows: list[tuple[float, int, str, str]]) -> list[str]:
  """Device time per step by kernel kind, largest first, from _kernel_times' rows."""
  totals: dict[str, float] = collections.defaultdict(float)
  for ms, _, where, name in rows:
    if where.startswith('/device:'):
      totals[kernel_kind(name)] += ms
  total = sum(totals.values())
  if not total:
    return ['(no device kernels in the trace: the summary by kind is for a GPU)']
  lines = [f'{ms:10.3f} ms/step {ms / total:6.1%}  {kind}'
           for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
  return lines + [f'{total:10.3f} ms/step in device kernels']


def _kernel_times(trace_dir: str) -> list[tuple[float, int, str, str]]:
  """Per (device, kernel name): (ms per step, calls per step, device, name), largest first, from
  the perfetto trace jax.profiler wrote."""
  traces = sorted(glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True))
  with gzip.open(traces[-1]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  process = {e['pid']: e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  totals: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get('ph') == 'X':
      key = (process.get(e['pid'], str(e['pid'])), e['name'])
      totals[key][0] += e.get('dur', 0)
      totals[key][1] += 1
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
  return [(us / PROFILED_STEPS / 1e3, n // PROFILED_STEPS, where, name)
          for (where, name), (us, n) in ranked]


def _compile_with_auto_layouts(step, state: list, x, y):
  """The step compiled with its state (params, batch_stats, opt_state) in the layouts XLA
  prefers, the same for the state it returns, and the state moved into them."""
  import jax
  from jax.experimental.layout import Format, Layout

  def compile_with(formats):
    shardings = (*formats, None, None)
    return jax.jit(step, in_shardings=shardings, out_shardings=(*formats, None),
                   donate_argnums=(0, 1, 2)).lower(*state, x, y).compile()

  auto = [jax.tree.map(lambda _: Format(Layout.AUTO), s) for s in state]
  compiled = compile_with(auto)
  chosen = list(compiled.input_formats[0][:3])
  if chosen != list(compiled.output_formats[:3]):  # fed back each step: one layout for both
    compiled = compile_with(chosen)
  state = [jax.device_put(s, f) for s, f in zip(state, chosen, strict=True)]
  return compiled, state


def profile_jax(out: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from unet_jax import UNet  # compare_pytorch put the repository on sys.path

  gpu = jax.default_backend() == 'gpu'
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.standard_normal((BATCH, SIZE, SIZE, 1), np.float32))
  y = jax.device_put((rng.random((BATCH, SIZE, SIZE, 1)) > 0.5).astype(np.float32))
  tx = optax.adam(1e-4)
  only = os.environ.get('VARIANTS')
  variants = {k: v for k, v in VARIANTS.items() if not only or k in only.split(',')}
  speeds = {}
  for name, (levers, options) in variants.items():
    try:
      model = UNet(1, 1, base_features=BASE, dtype=jnp.bfloat16, **{**ALL_XLA_LEVERS, **levers})
      variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 1)), train=False)
      state = [variables['params'], variables['batch_stats'], tx.init(variables['params'])]
      t = time.perf_counter()
      if name in AUTO_LAYOUT:
        compiled, state = _compile_with_auto_layouts(plain_jax_step(model, tx), state, x, y)
      else:
        compiled = jax.jit(plain_jax_step(model, tx), donate_argnums=(0, 1, 2)).lower(
            *state, x, y).compile(options or None)
      compile_s = time.perf_counter() - t
      if name in PROFILED:
        with open(os.path.join(out, f'jax_hlo_{name}.txt'), 'w') as f:
          f.write(compiled.as_text())

      def run(state=state, compiled=compiled):
        state[0], state[1], state[2], loss = compiled(*state, x, y)
        return loss

      for _ in range(3):
        float(run())
      times = []
      for _ in range(5):
        t = time.perf_counter()
        for _ in range(5):
          loss = run()
        float(loss)
        times.append((time.perf_counter() - t) / 5)
      speeds[name] = BATCH / statistics.median(times)
      peak = jax.devices()[0].memory_stats()['peak_bytes_in_use'] / 2**20 if gpu else 0
      log(f'{name}: compile {compile_s:.1f} s, {speeds[name]:.1f} img/s, peak {peak:.0f} MB '
          '(process peak so far)')
      if name in PROFILED:
        trace_dir = os.path.join(out, f'jax_trace_{name}')
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
          for _ in range(PROFILED_STEPS):
            loss = run()
          float(loss)
        rows = _kernel_times(trace_dir)
        lines = kind_summary(rows) + [''] + [
            f'{ms:10.3f} ms/step {n:5d}x  {where[:30]:30s} {kernel[:110]}'
            for ms, n, where, kernel in rows]
        with open(os.path.join(out, f'jax_kernels_{name}.txt'), 'w') as f:
          f.write('\n'.join(lines))
        log('\n'.join(lines[:60]))
    except Exception as e:  # an XLA option this jax does not know: report, go on
      log(f'{name} failed: {type(e).__name__}: {str(e)[:300]}')
  log(json.dumps({'img_per_s': speeds, 'size': SIZE, 'batch': BATCH}))


def main() -> None:
  if len(sys.argv) != 3 or sys.argv[1] not in ('jax', 'torch', 'torch_compile'):
    raise SystemExit(__doc__)
  what, out = sys.argv[1], sys.argv[2]
  os.makedirs(out, exist_ok=True)
  if what == 'jax':
    profile_jax(out)
  else:
    profile_torch(out, compiled=what == 'torch_compile')


if __name__ == '__main__':
  main()

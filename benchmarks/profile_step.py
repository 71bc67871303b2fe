"""Where a training step's time goes, per kernel, and what each speed lever does, in one process.

    python benchmarks/profile_step.py jax OUT_DIR          # lever variants + kernel profile
    python benchmarks/profile_step.py torch OUT_DIR        # PyTorch AMP eager, kernel table
    python benchmarks/profile_step.py torch_compile OUT_DIR

The seed UNet, Adam, bfloat16 compute (PyTorch: autocast + channels_last), SIZE x SIZE images in
batches of BATCH (environment; 480 and 16 by default). `jax` compiles the plain jitted step once
per variant (every lever on XLA's op, then each lever switched on alone, then two XLA GPU
options), times 5 x 5 steps of each (median), and profiles the all-XLA step: `jax_kernels.txt`
lists each kernel's time per step, `jax_hlo.txt` is the compiled step. Compilation caches are
shared inside the process, so variants after the first compile fast. The torch sides write
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

# name: (levers switched on from ALL_XLA_LEVERS, XLA compiler options)
VARIANTS = {
    'xla': ({}, {}),
    'bn_fused': (dict(bn_relu='fused'), {}),
    'tconv_gemm': (dict(transpose_conv='gemm'), {}),
    'split': (dict(skip_concat='split'), {}),
    'small_gemm': (dict(small_maps='gemm'), {}),
    # The CPU kernels and Winograd's conv, each alone ('auto' picks XLA's op on a GPU).
    'pool_masks': (dict(max_pool='masks'), {}),
    'banded_wgrad': (dict(conv_weight_grad='banded'), {}),
    'winograd': (dict(wide_convs='winograd'), {}),
    'no_cmdbuf': ({}, {'xla_gpu_enable_command_buffer': ''}),
    'runtime_fusion': ({}, {'xla_gpu_use_runtime_fusion': True}),
}


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


def _kernel_times(trace_dir: str) -> list[str]:
  """Per (device, kernel name): time per step, from the perfetto trace jax.profiler wrote."""
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
  return [f'{us / PROFILED_STEPS / 1e3:10.3f} ms/step {n // PROFILED_STEPS:5d}x  {where[:30]:30s} '
          f'{name[:110]}' for (where, name), (us, n) in ranked]


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
      compiled = jax.jit(plain_jax_step(model, tx), donate_argnums=(0, 1, 2)).lower(
          *state, x, y).compile(options or None)
      compile_s = time.perf_counter() - t
      if name == 'xla':
        with open(os.path.join(out, 'jax_hlo.txt'), 'w') as f:
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
      if name == 'xla':
        trace_dir = os.path.join(out, 'jax_trace')
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
          for _ in range(PROFILED_STEPS):
            loss = run()
          float(loss)
        lines = _kernel_times(trace_dir)
        with open(os.path.join(out, 'jax_kernels.txt'), 'w') as f:
          f.write('\n'.join(lines))
        log('\n'.join(lines[:50]))
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

"""How the train and eval steps are compiled: XLA's CPU scheduler, remat, the compiler's scratch;
also the initialisation's options and JAX's persistent compilation cache (their functions say why).

Four things decide the peak memory of a CPU training process besides the model itself:
- XLA's CPU scheduler. Its default orders the step for concurrency, which keeps many
  activations alive at once: for the seed UNet at 8x1x128x128 the step's buffers take 1091 MB.
  The memory-optimised order needs 606 MB for the same computation (same ops, same numbers; only
  the order differs), at a speed cost within this machine's noise (README, "Benchmarks").
- Whether remat recomputes at all. `jax.checkpoint` (flax's `nn.remat`) fences the recomputation
  with optimization barriers so that it is not merged with the forward pass. XLA's CPU pipeline
  (jax 0.10.2) removes those barriers in its `cse_barrier_expander` pass and then merges the two
  by common-subexpression elimination: the forward's activations are kept after all. Skipping
  that pass keeps the recomputation: for the seed UNet at 1x480x480 with `model.remat`, 593
  instead of 758 MiB of step buffers per image. It changes nothing in a step without barriers.
- The compiler itself. With XLA's newer CPU fusion emitters, compiling the seed UNet's step at
  8x1x128x128 peaks at 2.0 GB RSS (about 100 MB per distinct Winograd conv, whose transforms
  are many small fusions), above the step's own peak; with the older emitters 1.1 GB, for steps
  of the same speed (README, "Benchmarks").
- The compiler's scratch. Compiling the step takes a few hundred MB of heap that glibc keeps after
  it is freed, while the step's buffers come from fresh pages: without handing that heap back the
  first step's peak is the two stacked. `release_free_heap` hands it back (glibc's malloc_trim).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable
from typing import Any

import jax

from unet_jax.levers import CPU_SCHEDULERS


def compiler_options(cpu_scheduler: str, platform: str) -> dict[str, Any]:
  """XLA options for a step compiled for `platform` ('cpu', 'gpu', ...)."""
  if cpu_scheduler not in CPU_SCHEDULERS:
    raise ValueError(f'cpu_scheduler must be one of {CPU_SCHEDULERS}, got {cpu_scheduler!r}')
  if platform != 'cpu':
    return {}
  options = {'xla_disable_hlo_passes': 'cse_barrier_expander',  # keeps remat's recomputation
             # XLA's older loop-fusion emitters: same speed, and compiling the seed UNet's step
             # (with Winograd's convs, many small fusions) peaks at 1.1 GB RSS instead of 2.0.
             'xla_cpu_use_fusion_emitters': False}
  if cpu_scheduler == 'memory':
    # (The boolean xla_cpu_enable_concurrency_optimized_scheduler=False is accepted here but,
    # measured with jax 0.10.2, changes nothing; the scheduler type does.)
    options['xla_cpu_scheduler_type'] = 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'
  return options


def init_compiler_options(platform: str) -> dict[str, Any]:
  """XLA options for the parameter initialisation compiled for `platform`.

  Compiling the initialisation is compiling one threefry random-bits program per parameter
  tensor, and LLVM's full optimisation of those is most of it: for the seed UNet on this
  project's CPU 6.8-7.4 s at XLA's default level, 2.3-3.2 s at level 1, which draws the same
  bits (tested) and runs as fast (0.3 s). The steps keep the default level: at level 1 the
  seed UNet's training step took 3.17 s against 2.94 (one process each).
  """
  return {'xla_backend_optimization_level': 1} if platform == 'cpu' else {}


def use_persistent_cache(path: str) -> str | None:
  """Keeps compiled executables on disk (JAX's persistent compilation cache) under `path`.

  A rerun or a resume of the same config then loads its steps instead of compiling them: for
  the seed UNet at 8x1x128x128 on this project's CPU, the first step 25 -> 7.7 s and the
  initialisation 3.1 -> 1.3 s, with identical results (README, "Door 1"). '' leaves JAX as it
  is, and a JAX_COMPILATION_CACHE_DIR in the environment wins. JAX keys each entry on the
  program, the compiler options and its own version, and only process 0 writes. Returns the
  directory in use, or None; a directory that cannot be created or written is skipped with a
  warning.
  Call before the first compilation: JAX opens its cache once per process.
  """
  current = jax.config.jax_compilation_cache_dir
  if current or not path:
    return current or None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
    writable = os.access(path, os.W_OK)
  except OSError:
    writable = False
  if not writable:
    print(f'warning: compilation cache {path} is not writable; compiling without it (set '
          'compilation_cache_dir to a writable folder, or to "" to silence this)',
          file=sys.stderr, flush=True)
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  return path


def release_free_heap() -> None:
  """Returns the C heap's free pages to the OS (glibc only; elsewhere a no-op)."""
  name = ctypes.util.find_library('c')
  try:
    trim = ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to do
    return
  trim(0)


def compile_per_signature(fn: Any, options: dict[str, Any]) -> Callable[..., Any]:
  """Calls `fn` (a jax.jit or jax.pmap function) through ahead-of-time compiled executables.

  One executable per input signature (tree structure, shapes, dtypes), compiled with `options`;
  after each compilation the compiler's freed scratch goes back to the OS before the step runs.
  """
  executables: dict[Any, Any] = {}

  def call(*args):
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple(jax.typeof(leaf) for leaf in leaves))
    executable = executables.get(key)
    if executable is None:
      executable = executables[key] = fn.lower(*args).compile(options or None)
      release_free_heap()
    return executable(*args)

  return call

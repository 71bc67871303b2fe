"""How the steps are compiled: the memory-ordered CPU schedule takes less memory for the same
numbers, remat really recomputes, executables are built once per input signature, and freed heap
goes back to the OS."""

import ctypes
import ctypes.util
import functools
import re

import jax
import numpy as np
import pytest
from conftest import USER_LEVEL
from jax.sharding import PartitionSpec as P

from configs import base
from unet_jax import parallel, train
from unet_jax.step_compilation import (
  CPU_SCHEDULERS,
  compile_per_signature,
  compiler_options,
  release_free_heap,
  use_persistent_cache,
)


def _setup(scheduler):
  config = base.get_config()
  config.model.base_features, config.model.depth = 8, 3
  config.image_size, config.batch_size = 64, 8
  config.cpu_scheduler = scheduler
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = train.build_model(config, parallel.AXIS)
  state = train.create_train_state(config, model, mesh)
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((8, 64, 64, 1), np.float32),
           'mask': (rng.random((8, 64, 64)) > 0.5).astype(np.int32)}
  return config, mesh, model, state, batch


def _compiled_step(config, mesh, model, state, batch, options, grad_accum_steps=1):
  fn = functools.partial(train.train_step, model=model, dice_weight=1.0,
                         grad_accum_steps=grad_accum_steps)
  mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P('data')),
                                 out_specs=P(), check_vma=False))
  return mapped.lower(state, parallel.to_global(batch, mesh)).compile(options or None)


def test_memory_schedule_needs_less_memory_for_the_same_numbers():
  temp, params = {}, {}
  for scheduler in CPU_SCHEDULERS:
    config, mesh, model, state, batch = _setup(scheduler)
    executable = _compiled_step(config, mesh, model, state, batch,
                                {**train.step_compiler_options(config, mesh), **USER_LEVEL})
    global_batch = parallel.to_global(batch, mesh)
    temp[scheduler] = executable.memory_analysis().temp_size_in_bytes
    for _ in range(2):
      state, _ = executable(state, global_batch)
    params[scheduler] = jax.tree.map(np.asarray, state.params)
  # The option takes effect (a silently ignored option would give equal sizes) ...
  assert temp['memory'] < 0.8 * temp['concurrency'], temp
  # ... and only reorders the work: two training steps give bit-identical parameters.
  for a, b in zip(jax.tree.leaves(params['memory']), jax.tree.leaves(params['concurrency']),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_compiler_options():
  keep_remat = {'xla_disable_hlo_passes': 'cse_barrier_expander',
                'xla_cpu_use_fusion_emitters': False}
  assert compiler_options('concurrency', 'cpu') == keep_remat
  assert compiler_options('memory', 'gpu') == {}
  assert compiler_options('memory', 'cpu') == {
      **keep_remat, 'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
  with pytest.raises(ValueError, match="cpu_scheduler must be one of .* got 'fast'"):
    compiler_options('fast', 'cpu')


def test_one_executable_per_input_signature():
  lowered = []

  class Counting:  # stands for a jax.jit function, counting its compilations
    def __init__(self, fn):
      self.jitted = jax.jit(fn)

    def lower(self, *args):
      lowered.append([np.shape(a) for a in args])
      return self.jitted.lower(*args)

  call = compile_per_signature(Counting(lambda x, y: x * 2 + y), {})
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  np.testing.assert_array_equal(call(a, a), a * 3)
  np.testing.assert_array_equal(call(a + 1, a), (a + 1) * 2 + a)
  assert len(lowered) == 1  # same shapes and dtypes: the executable is reused
  b = np.ones((4, 3), np.float32)
  np.testing.assert_array_equal(call(b, b), b * 3)
  assert lowered == [[(2, 3), (2, 3)], [(4, 3), (4, 3)]]
  call(a.astype(np.int32), a.astype(np.int32))
  assert len(lowered) == 3  # a new dtype is a new signature


def _rss_mb():
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


@pytest.mark.skipif(not ctypes.util.find_library('c') or not hasattr(
    ctypes.CDLL(ctypes.util.find_library('c')), 'malloc_trim'), reason='glibc only')
def test_release_free_heap_returns_freed_memory():
  libc = ctypes.CDLL(ctypes.util.find_library('c'))
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  # 256 MB in 64 KB blocks (below glibc's mmap threshold, so they live in the heap), touched so
  # that they are resident, then freed: glibc keeps them until trimmed.
  blocks = [libc.malloc(64 * 1024) for _ in range(4096)]
  for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
  # Freed in reverse except one block kept at the top, so the heap cannot simply shrink.
  keep = blocks.pop()
  for b in blocks:
    libc.free(b)
  before = _rss_mb()
  release_free_heap()
  after = _rss_mb()
  libc.free(keep)
  assert before - after > 128, (before, after)


def test_remat_recomputes_under_the_project_options_with_the_same_numbers():
  temp, params = {}, {}
  for remat in (False, True):
    config, mesh, _, _, batch = _setup('memory')
    config.model.remat = remat
    model = train.build_model(config, parallel.AXIS)
    state = train.create_train_state(config, model, mesh)
    executable = _compiled_step(config, mesh, model, state, batch,
                                {**train.step_compiler_options(config, mesh), **USER_LEVEL})
    temp[remat] = executable.memory_analysis().temp_size_in_bytes
    for _ in range(2):
      state, _ = executable(state, parallel.to_global(batch, mesh))
    params[remat] = jax.tree.map(np.asarray, state.params)
  # Measured with jax 0.10.2: 0.58x the buffers of the plain step. With XLA's
  # cse_barrier_expander left in, the recomputation is merged back into the forward pass: 0.66x.
  assert temp[True] < 0.62 * temp[False], temp
  for a, b in zip(jax.tree.leaves(params[True]), jax.tree.leaves(params[False]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_finite_check_is_computed_once_not_copied_into_every_update():
  # train_step's all-finite flag ANDs one flag per gradient leaf; the barrier keeps XLA from
  # copying that chain into each of the state's update fusions (the program grew by 15,000 ANDs
  # at the seed's size, and compiled 3 s slower).
  config, mesh, model, state, batch = _setup('memory')
  executable = _compiled_step(config, mesh, model, state, batch,
                              train.step_compiler_options(config, mesh))
  leaves = len(jax.tree.leaves(state.params))
  ands = executable.as_text().count(' and(')
  # Each leaf's all() reduction has one AND in its reducer and one joins it to the chain:
  # 113 for this model's 50 leaves; 9,163 when the chain is copied.
  assert ands <= 3 * leaves, (ands, leaves)


def test_accumulation_loop_gives_every_3x3_conv_a_kernel_layout_xla_cpu_runs_fast():
  # Gradient accumulation runs the backward pass in a loop body, where XLA's CPU backend leaves
  # a convolution whose kernel comes as (kh, kw, out, in) -- the form of JAX's own input-gradient
  # rule -- as it is, for its generic loop emitter instead of YNNPACK (outside loops it copies
  # the kernel to (kh, kw, in, out) first): 142 ms against 23 per 1x256x256x64 input gradient,
  # the seed UNet's accumulated step 1.4x slower. conv3x3 writes its input gradient with an
  # HWIO kernel.
  config, mesh, model, state, batch = _setup('memory')
  executable = _compiled_step(config, mesh, model, state, batch,
                              train.step_compiler_options(config, mesh), grad_accum_steps=2)
  hlo = executable.as_text()
  assert ' while(' in hlo  # the microbatches' loop is there
  convs = [line for line in hlo.splitlines() if ' convolution(' in line and 'size=3x3' in line]
  kernel_forms = {re.search(r'dim_labels=([^,]+),', line).group(1) for line in convs}
  assert kernel_forms == {'b01f_01io->b01f'}, kernel_forms


def test_unusable_compilation_cache_is_skipped_with_one_warning(tmp_path, capsys,
                                                              no_compilation_cache):
  # (Its use is tested end to end in test_train: a rerun loads its steps, same bits.)
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  assert use_persistent_cache(str(blocker / 'cache')) is None
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'a_file/cache is not writable; compiling without it' in err
  assert use_persistent_cache('') is None
  assert not jax.config.jax_compilation_cache_dir  # JAX left as it was


def test_initialisation_compiled_cheaper_draws_the_same_parameters():
  # create_train_state compiles at init_compiler_options' lower LLVM level, with init_variables
  # (the smallest input) traced inside; the parameters must be those of a plain jitted
  # model.init on the training input with the same key, to the bit.
  config, mesh, model, state, _ = _setup('memory')
  x = jax.numpy.zeros((1, config.image_size, config.image_size, config.model.in_channels))
  key = jax.random.key(config.seed)
  plain = jax.jit(lambda key: model.clone(axis_name=None).init(key, x, train=False)).lower(
      key).compile(USER_LEVEL)(key)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain['params']),
                       strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

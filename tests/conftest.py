"""Shared helpers: the PyTorch reference is in tests/torch_reference.py, written from SEED.md."""

import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(2)


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def move_off_init(model: torch.nn.Module, in_channels: int, num_classes: int, hw=(32, 32),
                  steps: int = 3, seed: int = 0) -> torch.nn.Module:
  """A few Adam steps so weights and BN statistics are not at their 0/1 initial values."""
  g = torch.Generator().manual_seed(seed)
  opt = torch.optim.Adam(model.parameters(), lr=1e-2)
  model.train()
  for _ in range(steps):
    x = torch.randn(4, in_channels, *hw, generator=g) * 2 + 0.5
    y = torch.randn(4, num_classes, *hw, generator=g)
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
  return model.eval()


def max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
  """max |got - want| relative to the scale of `want` (its max |value|, at least 1e-6)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


@pytest.fixture(autouse=True)
def _seeded():
  torch.manual_seed(0)
  np.random.seed(0)


# One persistent compilation cache per test process (each pytest-xdist worker has its own), for
# the tests and the train.py runs they start (JAX_COMPILATION_CACHE_DIR wins over the config):
# the tests compile the same small steps many times over. A loaded executable computes what a
# compiled one does, to the bit (tested in test_train). Tests of the cache itself, and of timing,
# take it out of their environment.
CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
_cache = tempfile.mkdtemp(prefix='unet_jax_tests_xla_cache_')
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ[CACHE_ENV] = _cache
# JAX's default writes only programs that took over 1 s to compile; the tiny test models' steps
# take less.
MIN_COMPILE_SECS = 0.2
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = str(MIN_COMPILE_SECS)

# The built-in dataset, shared by the tests of each test process: the first run to need it
# prepares it there (about 5 s, more under load) and the others read it. test_train's end-to-end
# test prepares its own, as a user's first run does.
TFDS_DIR = tempfile.mkdtemp(prefix='unet_jax_tests_tfds_')
atexit.register(shutil.rmtree, TFDS_DIR, ignore_errors=True)

# XLA's LLVM backend at -O0 for every program the tests compile, here and in the train.py runs
# they start (test_train._env passes it on): the suite is mostly compilation of small programs
# that then run for milliseconds; the whole suite took 10.5 instead of 16.4 minutes (2 workers;
# level 1 saved little). The level changes the rounding of some results (whether multiply-adds
# are fused, and at -O0 that depends on how XLA grouped the ops), not what is computed: tests
# against PyTorch have tolerances, and the tests of a bit-for-bit claim between differently
# compiled programs compile both at XLA's default level, USER_LEVEL, as a user's run does.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
USER_LEVEL = {'xla_backend_optimization_level': 3}  # XLA's default (DebugOptions)

# Eight CPU devices for the data-parallel tests; must happen before JAX picks its backend.
# Tests that need one device take the first one.
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_compilation_cache_dir', _cache)
jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECS)


@pytest.fixture
def no_compilation_cache():
  """JAX as a user's process starts: no persistent cache configured (restored afterwards)."""
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    yield
  finally:
    jax.config.update('jax_compilation_cache_dir', _cache)


def without_compilation_cache(env: dict) -> dict:
  """A subprocess environment without the tests' shared compilation cache."""
  return {k: v for k, v in env.items() if k != CACHE_ENV}
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/


@contextlib.contextmanager
def print_hooks_kept():
  """Puts back what errors.quiet_failed_saves leaves installed after a refused write (log
  filters that hold back other threads' records, the thread and unraisable hooks): the process
  is about to end then; a test process is not."""
  loggers = [logging.getLogger(name) for name in ('absl', 'asyncio')]
  filters = [list(x.filters) for x in loggers]
  hooks = sys.unraisablehook, threading.excepthook
  try:
    yield
  finally:
    for logger, kept in zip(loggers, filters, strict=True):
      logger.filters[:] = kept
    sys.unraisablehook, threading.excepthook = hooks


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs (root only): a real 'No space left on device'. Room for a dozen of the tiny
  run's checkpoints (about 300 KiB each): with 2 MiB, a run once filled it before its first
  checkpoint was complete."""
  mount = tmp_path / 'small'
  mount.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mount)],
                    capture_output=True).returncode != 0:
    pytest.skip('cannot mount a small tmpfs here')
  try:
    with print_hooks_kept():
      yield mount
  finally:
    subprocess.run(['umount', '-l', str(mount)], capture_output=True)

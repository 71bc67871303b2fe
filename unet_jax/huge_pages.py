"""Transparent huge pages for a training process's heap (glibc), asked for before it starts.

XLA's CPU runtime allocates a step's temporary buffers afresh at each call: for the seed UNet's
training step at 8x1x128x128, one 660 MB block. glibc hands an allocation that large (from a
worker thread's arena) straight to the kernel as a fresh mapping and unmaps it when freed, so
every step faults in about 180,000 new 4 KiB pages. With glibc's `glibc.malloc.hugetlb=1`
tunable malloc asks the kernel for transparent huge pages (madvise), and the same step faults
about a thousand times: 2.8 s per step here instead of 3.1-4.0 s (README, "Benchmarks").
PyTorch's step measured the same either way. Only the heap's page size changes, not a number
computed.

glibc reads its tunables once, when the process starts, so `python train.py` re-executes itself
with the tunable added (`reexec_with_huge_pages`). Off with UNET_JAX_HUGE_PAGES=0; a
GLIBC_TUNABLES that already sets glibc.malloc.hugetlb is left as it is.

Standard library only, and the `unet_jax` package loads its names lazily: train.py imports
this module before anything loads JAX, so the re-executed process is the only one that pays for
that import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb=1'
OPT_OUT = 'UNET_JAX_HUGE_PAGES'  # '0': leave the environment as it is


def _is_glibc() -> bool:
  try:
    return (os.confstr('CS_GNU_LIBC_VERSION') or '').startswith('glibc')
  except (ValueError, OSError, AttributeError):  # not glibc (macOS, musl), or not POSIX
    return False


def environ_with_huge_pages(environ: Mapping[str, str]) -> dict[str, str] | None:
  """`environ` with glibc's huge-page tunable added to GLIBC_TUNABLES, or None when there is
  nothing to add: opted out, not glibc, or GLIBC_TUNABLES already sets glibc.malloc.hugetlb."""
  if environ.get(OPT_OUT, '1') == '0' or not _is_glibc():
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb=' in tunables:
    return None
  return {**environ, 'GLIBC_TUNABLES': f'{tunables}:{TUNABLE}' if tunables else TUNABLE}


def reexec_with_huge_pages() -> None:
  """Replaces this process by itself, same interpreter and command line, with the tunable set;
  returns (doing nothing) when `environ_with_huge_pages` has nothing to add."""
  environ = environ_with_huge_pages(os.environ)
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    # argv[0] as the executable's path: a bare 'python' would be looked up on PATH again.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)

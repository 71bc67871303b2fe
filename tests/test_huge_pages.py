"""train.py's re-execution with glibc's huge-page tunable (unet_jax/huge_pages.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from unet_jax import huge_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
on_glibc = pytest.mark.skipif(not huge_pages._is_glibc(), reason='glibc only')


@on_glibc
@pytest.mark.parametrize('environ, tunables', [
    ({}, huge_pages.TUNABLE),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
     f'glibc.malloc.arena_max=2:{huge_pages.TUNABLE}'),
])
def test_tunable_is_added_to_what_is_there(environ, tunables):
  got = huge_pages.environ_with_huge_pages({'HOME': '/h', **environ})
  assert got == {'HOME': '/h', 'GLIBC_TUNABLES': tunables}


@pytest.mark.parametrize('environ', [
    {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'},  # the user's own choice stands
    {huge_pages.OPT_OUT: '0'},
])
def test_nothing_to_add(environ):
  assert huge_pages.environ_with_huge_pages(environ) is None


def _run(script: str, *args: str, **env: str) -> str:
  environ = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', huge_pages.OPT_OUT)}
  out = subprocess.run([sys.executable, '-c', script, *args], capture_output=True, text=True,
                       env={**environ, **env}, check=True)
  return out.stdout


_REEXEC = textwrap.dedent(f"""
    import os, sys
    sys.path.insert(0, {REPO!r})
    from unet_jax import huge_pages as hp
    print('before', flush=True)
    hp.reexec_with_huge_pages()
    print('after', sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))
""")


@on_glibc
def test_process_reexecutes_itself_once_with_its_arguments():
  # 'before' twice: the first process, then its replacement, which does not execute again.
  assert _run(_REEXEC, 'a', '--b=1').splitlines() == [
      'before', 'before', f"after ['a', '--b=1'] {huge_pages.TUNABLE}"]


def test_opted_out_process_runs_as_it_is():
  assert _run(_REEXEC, 'a', **{huge_pages.OPT_OUT: '0'}).splitlines() == [
      'before', "after ['a'] None"]


def _thp_mode() -> str:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    return 'never'


# A 256 MiB malloc from a thread (as XLA's buffers come), written, then the process's huge pages.
_ALLOCATE = textwrap.dedent("""
    import ctypes, threading
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    def allocate():
      p = libc.malloc(256 << 20)
      ctypes.memset(p, 1, 256 << 20)
    t = threading.Thread(target=allocate); t.start(); t.join()
    with open('/proc/self/smaps_rollup') as f:
      print([line.split()[1] for line in f if line.startswith('AnonHugePages:')][0])
""")


@on_glibc
@pytest.mark.skipif(_thp_mode() == 'never', reason='transparent huge pages are off here')
def test_tunable_puts_large_allocations_on_huge_pages():
  with_tunable = int(_run(_ALLOCATE, GLIBC_TUNABLES=huge_pages.TUNABLE))
  without = int(_run(_ALLOCATE))
  assert with_tunable >= 128 << 10, with_tunable  # kB: at least half of the 256 MiB
  if _thp_mode() == 'madvise':  # only then is glibc's madvise what makes the difference
    assert without < 16 << 10, without

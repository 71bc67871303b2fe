"""Files written under a temporary name and renamed get the permissions a plain `open()` or
`mkdir()` would have given them: `tempfile.mkstemp` creates 0600 files and `mkdtemp` 0700
folders, which left converted checkpoints, exported models and CSVs unreadable to a user's
group and other users, whatever their umask said."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


def _umask() -> int:
  """This process's umask, read without setting it (`os.umask` sets it, and a thread creating a
  file meanwhile, such as Orbax's saver, would get the wrong mode)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022  # the common default, where /proc does not say


def as_created(path: str) -> None:
  """Gives `path` (a file or folder from mkstemp or mkdtemp) the mode that creating it with
  `open()` or `os.mkdir()` would have: 0666 or 0777 less the umask."""
  os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


@contextlib.contextmanager
def replaced_on_success(dest: str, prefix: str) -> Iterator[str]:
  """A temporary path beside `dest` (same suffix) for the block to write; when the block ends
  without error it becomes `dest`, with open()'s permissions, in one rename; otherwise, or if
  the rename fails, it is removed and `dest` is as it was."""
  fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.basename(dest),
                             dir=os.path.dirname(os.path.abspath(dest)))
  os.close(fd)
  try:
    yield tmp
    as_created(tmp)
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)

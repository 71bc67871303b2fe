"""The one exception type the command-line doors turn into a one-line message and exit code,
and the helpers that make such lines."""

import errno


class UserError(Exception):
  """Bad input from the user: the message names the problem and what to do about it."""


def first_line(e: BaseException, limit: int = 160) -> str:
  """The first line of an exception's message (its type when empty), for one-line errors."""
  text = str(e).strip().splitlines()
  return text[0][:limit] if text else type(e).__name__


def disk_error(e: BaseException) -> str | None:
  """Why the disk refused a write, if that is what is behind `e` (Orbax wraps its writers'
  errors, TensorStore's as ValueError text), else None."""
  reasons = {errno.ENOSPC: 'No space left on device', errno.EROFS: 'Read-only file system',
             errno.EDQUOT: 'Disk quota exceeded'}
  seen, todo = set(), [e]
  while todo:
    err = todo.pop()
    if err is None or id(err) in seen:
      continue
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno in reasons:
      return reasons[err.errno]
    for reason in reasons.values():
      if reason in str(err):
        return reason
    todo += [err.__cause__, err.__context__, *getattr(err, 'exceptions', ())]
  return None

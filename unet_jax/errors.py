"""The one exception type the command-line doors turn into a one-line message and exit code,
and the helpers that make such lines."""

import contextlib
import errno
import logging
import sys
import threading
import warnings
from collections.abc import Iterator


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


class _DiskErrorFilter(logging.Filter):
  """Drops log records about a write the disk refused (in the message or the exception), and
  once the main thread has seen such a refusal (`after_failure`), every record from another
  thread: those are the abandoned save's."""

  after_failure = False

  def filter(self, record: logging.LogRecord) -> bool:
    if self.after_failure and record.thread != threading.main_thread().ident:
      return False
    if record.exc_info and record.exc_info[1] is not None and disk_error(record.exc_info[1]):
      return False
    try:
      message = record.getMessage()
    except Exception:  # a malformed record: let the handler report it as it would
      return True
    return disk_error(Exception(message)) is None


def _hold_back(args: threading.ExceptHookArgs) -> None:
  """A thread's uncaught exception, not printed."""


@contextlib.contextmanager
def quiet_failed_saves() -> Iterator[None]:
  """Keeps a save that the disk refuses (full, read-only, over quota) to the door's one line.

  The main thread sees the failure at its next save or wait and reports it, so what the save's
  background threads print is held back: Orbax's ERROR logs with their tracebacks (a refused
  write, measured on a full 2 MiB disk: three of them, about 250 lines) and TensorStore's
  callbacks that arrive after the failed save closed its event loop ('Event loop is closed',
  each an unraisable exception with a traceback: 249 of them, about 800 lines). Logs about
  anything else, and any other unraisable exception, are shown as usual.

  When the block ends in a refused write the filters stay for the rest of the process, which is
  about to report it, and from then on they hold back everything the other threads log, raise
  or leave unraisable: the failed save's threads and its abandoned futures go on after the main
  thread has seen the error, and what they print then is not about the disk. Seen: asyncio's
  'Future exception was never retrieved' logs and an un-awaited coroutine's warning as the
  process ends (320-680 lines after train.py's error line in one run of six), and an Orbax
  writer thread still serialising when the interpreter shut down, whose 'cannot schedule new
  futures after interpreter shutdown' came with a 45-line traceback (one run of 22 on 2 busy
  cores).
  """
  loggers = [logging.getLogger('absl'), logging.getLogger('asyncio')]  # Orbax's, the loops'
  log_filter = _DiskErrorFilter()
  previous_hook = sys.unraisablehook

  def from_another_thread() -> bool:
    return threading.current_thread() is not threading.main_thread()

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return
    if log_filter.after_failure and from_another_thread():
      return
    previous_hook(unraisable)

  def restore():
    for logger in loggers:
      logger.removeFilter(log_filter)
    sys.unraisablehook = previous_hook

  for logger in loggers:
    logger.addFilter(log_filter)
  sys.unraisablehook = hook
  try:
    yield
  except BaseException as e:
    if disk_error(e) is None:
      restore()
    else:
      log_filter.after_failure = True
      threading.excepthook = _hold_back  # (it only ever sees threads other than the main one)
      warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited", RuntimeWarning)
    raise
  restore()

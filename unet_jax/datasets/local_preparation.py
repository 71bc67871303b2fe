"""Preparing the builders shipped here (synthetic shapes, image folders) with one honest line.

tfds speaks of downloads ("Downloading and preparing dataset Unknown size (download: Unknown
size, ...)") where nothing is downloaded, and warns, each time such a builder is made, of its
"custom data configuration" and of a variant folder "with no dataset_info.json" (one not
prepared yet). Here a preparation says what it prepares, where, and how long it took, around
tfds's progress bars (in a terminal only); the rest is left out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

_NOTICES = ('Using custom data configuration', 'Variant folder ')  # (tfds's absl warnings)


class _DropNotices(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOTICES)


@contextlib.contextmanager
def quiet_tfds_notices() -> Iterator[None]:
  """Leaves out tfds's warnings about the local builders' configs and unprepared folders."""
  logger, notices = logging.getLogger('absl'), _DropNotices()
  logger.addFilter(notices)
  try:
    yield
  finally:
    logger.removeFilter(notices)


def prepare(builder: Any, what: str) -> None:
  """Prepares `builder` (array_record) if it is not yet, saying so on stderr: `what` names the
  data, e.g. 'synthetic_shapes (64px)'. Call it within quiet_tfds_notices (is_prepared, too,
  warns of an unprepared folder)."""
  if builder.is_prepared():
    return
  import tensorflow_datasets as tfds
  print(f'preparing {what} in {builder.data_dir}', file=sys.stderr, flush=True)
  start = time.perf_counter()
  # tfds prints its download wording to stdout. Its progress bars (stderr) stay in a terminal,
  # for folders of thousands of images; into a log file they would write each refresh.
  bars = sys.stderr.isatty()
  tfds.display_progress_bar(bars)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(file_format='array_record')
  finally:
    tfds.display_progress_bar(True)
  print(f'prepared in {time.perf_counter() - start:.1f} s; later runs read it from there',
        file=sys.stderr, flush=True)

"""What a training run shows: metrics.jsonl, TensorBoard events, sample PNGs, a progress bar in
a terminal (elsewhere a plain line per logged row), and the scores for people (`score_lines`).

Only process 0 writes. TensorBoard files come from tensorboardX, so `tensorboard --logdir
WORKDIR` reads them without TensorFlow installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from unet_jax.image_io import drawable


def float32_decimal(x: Any) -> float:
  """A float32 value as its shortest decimal: 0.0006, not 0.000599999912083149 (the float32
  nearest 0.0006 written out as a float64)."""
  return float(str(np.float32(x)))


_PER_CLASS = re.compile(r'(.+)_class(\d+)')  # a per-class metric's name: SCORE_classK
_SETTINGS = ('nsd_tolerance',)  # floats among the metrics that are no score (the JSON has them)


def score_lines(metrics: dict[str, Any], labels: Sequence[str] = ()) -> str:
  """The scores for people, ending in a newline: the means on one line (Dice first), then, with
  per-class scores, a table of them, a row per class: its id, then `labels[id]` if given (a
  name)."""
  leading = ('dice', 'iou', 'class_accuracy', 'pixel_accuracy')
  ordered = [k for k in leading if k in metrics] + [k for k in metrics if k not in leading]
  means = '  '.join(f'{k} {metrics[k]:.4f}' for k in ordered
                    if isinstance(metrics[k], float) and not _PER_CLASS.fullmatch(k)
                    and k not in _SETTINGS)
  columns: dict[str, dict[int, Any]] = {}
  for key, value in metrics.items():
    if match := _PER_CLASS.fullmatch(key):
      columns.setdefault(match[1], {})[int(match[2])] = value
  if not columns:  # (a binary model: its foreground's scores are the means)
    return means + '\n'
  classes = sorted({c for column in columns.values() for c in column})
  rows = [f'{c} {labels[c]}' if c < len(labels) else str(c) for c in classes]
  first = max(len('class'), *map(len, rows))
  widths = [max(len(name), 6) for name in columns]
  lines = ['class'.ljust(first) + ''.join(f'  {n:>{w}}'
                                          for n, w in zip(columns, widths, strict=True))]
  for c, row in zip(classes, rows, strict=True):  # (no value: '-', a surface score with none)
    lines.append(row.ljust(first) + ''.join(
        '  ' + ('-' if column.get(c) is None else f'{column[c]:.4f}').rjust(w)
        for column, w in zip(columns.values(), widths, strict=True)))
  return '\n'.join([means, *lines]) + '\n'


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX's writer module imports torch whenever it is installed (for isinstance checks on
  tensors this module never logs): 2.2 s of start-up and about 185 MB more peak RSS per run
  where torch is there (conversion users, the tests). A process that already has torch keeps it.
  """
  block = 'torch' not in sys.modules and 'tensorboardX.writer' not in sys.modules
  if block:
    sys.modules['torch'] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    if block:
      del sys.modules['torch']
  return SummaryWriter


class Reporter:
  def __init__(self, workdir: str, total_steps: int, start_step: int, images_per_step: int,
               enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self.images_per_step = images_per_step
    self._bar = None
    self._tb = None
    self._last_time, self._last_step = time.perf_counter(), start_step
    if not enabled:
      return
    SummaryWriter = _summary_writer_class()
    from tqdm import tqdm
    os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
    self._tb = SummaryWriter(workdir, flush_secs=30)
    _quiet_writer_thread(self._tb)
    self._total, self._start = total_steps, (start_step, time.perf_counter())
    # A progress bar where a person watches (a terminal). Into a file (a cluster job's log,
    # `> log 2>&1`) tqdm would write every refresh, '\r' after '\r', up to 10 a second for the
    # whole run on one line; there each logged row is a plain line instead (`write`).
    if sys.stderr.isatty():
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       smoothing=0.1)

  def step(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def throughput(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self._last_step) * self.images_per_step / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    return rate

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """One JSON object per logged step; eval metrics arrive already prefixed with `eval_`."""
    if not self.enabled or not metrics:
      return
    clean = {k: _number(v) for k, v in metrics.items()}
    with open(os.path.join(self.workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': step, **clean}) + '\n')
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    shown = {k: f'{clean[k]:.4g}' for k in ('loss', 'images_per_sec', 'eval_dice') if k in clean}
    if self._bar is not None:
      self._bar.set_postfix(shown, refresh=False)
    elif shown:
      print(f'step {step}/{self._total}  ' + '  '.join(f'{k} {v}' for k, v in shown.items())
            + self._eta(step), flush=True)

  def _eta(self, step: int) -> str:
    """'  eta 1h02m': the time left at the mean pace since the start (compilation included)."""
    first, start = self._start
    if step <= first or step >= self._total:
      return ''
    left = round((time.perf_counter() - start) / (step - first) * (self._total - step))
    hours, minutes, seconds = left // 3600, left // 60 % 60, left % 60
    return (f'  eta {hours}h{minutes:02d}m' if hours else f'  eta {minutes}m{seconds:02d}s'
            if minutes else f'  eta {seconds}s')

  def samples(self, step: int, images: np.ndarray, truth: np.ndarray, pred: np.ndarray,
              num_classes: int, colours: np.ndarray | None = None) -> str | None:
    """A PNG with one row per example: image | truth | prediction; classes in `colours` (one
    RGB row per class: the training masks' own), else as gray levels."""
    if not self.enabled or len(images) == 0:
      return None
    from PIL import Image
    levels = max(num_classes, 2) - 1
    rows = []
    for img, t, p in zip(images, truth, pred, strict=True):
      low, high = float(img.min()), float(img.max())
      if low < 0 or high > 1:  # (data.normalize='zscore': drawn over its own range)
        img = (img - low) / max(high - low, 1e-8)
      img = np.clip(img * 255, 0, 255).astype(np.uint8)
      img = drawable(img)
      def colour(m):  # ignored pixels (-1, data.ignore_value) in magenta
        if colours is None:
          drawn = np.repeat((np.maximum(m, 0) * (255 // levels)).astype(np.uint8)[..., None], 3,
                            -1)
        else:
          drawn = colours[np.maximum(m, 0)].astype(np.uint8)
        return np.where((m < 0)[..., None], np.array([255, 0, 255], np.uint8), drawn)
      sep = np.full((img.shape[0], 2, 3), 128, np.uint8)
      rows.append(np.concatenate([img, sep, colour(t), sep, colour(p)], axis=1))
    grid = np.concatenate([np.concatenate([r, np.full((2, r.shape[1], 3), 128, np.uint8)])
                           for r in rows])
    path = os.path.join(self.workdir, 'samples', f'step_{step:07d}.png')
    Image.fromarray(grid).save(path)
    self._tb.add_image('samples', grid, step, dataformats='HWC')
    return path

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      tb, self._tb = self._tb, None
      try:
        tb.close()
      except OSError:  # a full disk: the events are lost, the run's error says why
        _abandon(tb)


def _number(value: Any) -> int | float:
  """Counts stay integers in metrics.jsonl (`skipped_steps`: 1, not 1.0); the rest are floats."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  return float(value)


class _QuietRecords:
  """A tensorboardX record writer whose writes and flushes drop the events when the disk
  refuses them, instead of raising in the writer's thread."""

  def __init__(self, records: Any):
    self._records = records

  def write_event(self, event: Any) -> None:
    try:
      self._records.write_event(event)
    except OSError:
      pass

  def flush(self) -> None:
    try:
      self._records.flush()
    except OSError:
      pass


def _quiet_writer_thread(tb: Any) -> None:
  """tensorboardX writes its events on a thread of its own, which a full disk would end with a
  traceback on stderr beside the run's one error line (the checkpoint's save, which fails too,
  says what happened; the events are lost either way). Its own writes go through _QuietRecords;
  the final flush at close still raises, for `close` to handle. The attributes are tensorboardX
  2.x's; if they change, only that traceback can come back."""
  for writer in (getattr(tb, 'all_writers', None) or {}).values():
    worker = getattr(getattr(writer, 'event_writer', None), '_worker', None)
    records = getattr(worker, '_record_writer', None)
    if records is not None:
      worker._record_writer = _QuietRecords(records)


def _abandon(tb: Any) -> None:
  """Stops a tensorboardX writer whose final flush failed, without flushing again.

  tensorboardX marks a writer closed only after a successful flush, and closes every writer once
  more at exit, printing the same error with a traceback; its background thread would also
  retry the flush. The attributes are tensorboardX 2.x's; if they change, only that noise
  returns."""
  for writer in (getattr(tb, 'all_writers', None) or {}).values():
    events = getattr(writer, 'event_writer', None)
    worker = getattr(events, '_worker', None)
    if worker is not None:
      worker.stop()
    if events is not None:
      events._closed = True

"""Faults done for real: kill -9 mid-run (and mid-save), SIGTERM, damaged checkpoints, non-finite
losses."""

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import torch
from conftest import print_hooks_kept
from test_train import _env, _params, _random_batches, _run_steps, _train_cmd, tiny_config

from unet_jax import checkpoint, input_pipeline, train
from unet_jax.checkpoint import atomic_directory, load_pretrained_with_metadata
from unet_jax.convert import flax_to_torch
from unet_jax.errors import UserError, quiet_failed_saves

FLAGS = ['--config.num_train_steps=60', '--config.checkpoint_every_steps=2',
         '--config.eval_every_steps=1000', '--config.keep_checkpoints=2']


def _finished_steps(workdir):
  ckpt_dir = workdir / 'checkpoints'
  return {n for n in os.listdir(ckpt_dir) if n.isdigit()} if ckpt_dir.is_dir() else set()


def _wait_while_running(proc, seconds, until=lambda: False):
  """Returns once `until()` holds, the process has exited, or `seconds` have passed."""
  deadline = time.time() + seconds
  while time.time() < deadline and proc.poll() is None and not until():
    time.sleep(0.005)


def _kill_after_progress(cmd, env, workdir, seconds, timeout=300):
  """SIGKILL `seconds` after the run's first new finished checkpoint, i.e. while it trains and
  saves, whatever its start-up took (a compilation cache makes that vary)."""
  before = _finished_steps(workdir)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_while_running(proc, timeout, until=lambda: not _finished_steps(workdir) <= before)
  _wait_while_running(proc, seconds)
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
  proc.wait()
  return proc.returncode


def _kill_during_save(cmd, env, workdir, timeout=300):
  """SIGKILL as soon as Orbax's temporary directory of an unfinished save appears."""
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = workdir / 'checkpoints'
  deadline = time.time() + timeout
  seen = None
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
    seen = next((n for n in names if 'tmp' in n), None)
    if seen:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.0005)
  proc.wait()
  return seen


def _lines(path):
  return len(path.read_text().splitlines()) if path.exists() else 0


def _terminate_after_progress(cmd, env, workdir, timeout=300):
  """SIGTERM once the run has logged two new steps; (return code, stdout + stderr)."""
  log = workdir / 'metrics.jsonl'
  before = _lines(log)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_while_running(proc, timeout, until=lambda: _lines(log) >= before + 2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out + err


def test_interrupted_runs_resume_bit_identical(tmp_path):
  # One run, interrupted four times and rerun after each, ends where an uninterrupted run ends,
  # to the bit.
  env = _env(2)
  straight = subprocess.run(_train_cmd(tmp_path / 'straight', *FLAGS), env=env,
                            capture_output=True, text=True, timeout=600)
  assert straight.returncode == 0, straight.stderr[-2000:]
  workdir = tmp_path / 'interrupted'
  rng = np.random.default_rng(0)
  killed = 0
  # kill -9 at a random moment up to a second after a run's first new checkpoint, while steps
  # and async saves run.
  for _ in range(2):
    code = _kill_after_progress(_train_cmd(workdir, *FLAGS), env, workdir, rng.uniform(0, 1))
    killed += code == -signal.SIGKILL
  assert killed >= 1, 'the runs finished before they could be killed'
  # kill -9 once for certain in the middle of a save.
  assert _kill_during_save(_train_cmd(workdir, *FLAGS), env, workdir), 'no save was caught'
  # SIGTERM: the run saves the step it is at, says so, and exits cleanly. (Here with no
  # scheduled checkpoints, so that the one found next can only be SIGTERM's.)
  code, output = _terminate_after_progress(
      _train_cmd(workdir, *FLAGS, '--config.checkpoint_every_steps=1000'), env, workdir)
  assert code == 0, output[-2000:]
  stopped_at = load_pretrained_with_metadata(str(workdir))[2]['step']
  assert stopped_at < 60, 'the run finished before SIGTERM landed'
  assert f'SIGTERM: saved step {stopped_at} to {workdir}/checkpoints' in output, output[-2000:]
  final = subprocess.run(_train_cmd(workdir, *FLAGS), env=env, capture_output=True, text=True,
                         timeout=600)
  assert final.returncode == 0, final.stderr[-2000:]
  assert f'resumed from {workdir}/checkpoints/{stopped_at}' in final.stdout + final.stderr
  for x, y in zip(jax.tree.leaves(_params(tmp_path / 'straight')),
                  jax.tree.leaves(_params(workdir)), strict=True):
    np.testing.assert_array_equal(x, y)
  leftovers = [d for d in os.listdir(workdir / 'checkpoints') if 'tmp' in d]
  assert not leftovers, leftovers


def _damage(step_dir):
  """Truncate every data file of the saved train state."""
  for root, _, files in os.walk(step_dir / 'state'):
    for f in files:
      path = os.path.join(root, f)
      with open(path, 'r+b') as fh:
        fh.truncate(max(0, os.path.getsize(path) // 3))


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd):
  config = tiny_config(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=10)
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  _damage(tmp_path / 'wd' / 'checkpoints' / '4')
  with pytest.raises(UserError, match='cannot restore its latest checkpoint'):
    load_pretrained_with_metadata(str(tmp_path / 'wd'))
  capfd.readouterr()
  config.num_train_steps = 6
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  err = capfd.readouterr().err
  assert f'checkpoint {tmp_path}/wd/checkpoints/4 is damaged' in err
  assert 'falling back to the previous one' in err
  assert load_pretrained_with_metadata(str(tmp_path / 'wd'))[2]['step'] == 6


def test_every_checkpoint_damaged_starts_over_from_the_first_batch(tmp_path, capfd):
  # A failed restore may have moved the data iterator already: the new run must not start there.
  config = tiny_config(num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=10,
                       schedule='constant')
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  _damage(tmp_path / 'wd' / 'checkpoints' / '2')
  config.num_train_steps = 4
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert f'checkpoint {tmp_path}/wd/checkpoints/2 is damaged' in capfd.readouterr().err
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  for x, y in zip(jax.tree.leaves(_params(tmp_path / 'straight')),
                  jax.tree.leaves(_params(tmp_path / 'wd')), strict=True):
    np.testing.assert_array_equal(x, y)


def test_resuming_with_another_model_or_optimizer_is_refused(tmp_path):
  # Before, the restore failed, the good checkpoint was moved to damaged_checkpoints/ as if
  # damaged, and the run started over (then crashed: the data iterator had been moved).
  config = tiny_config(num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=10)
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  for change, message in [
      ({'model.base_features': 8}, 'was saved by a run with model.base_features=4, this config '
       'has model.base_features=8; rerun with its settings to resume it, or choose another '
       '--workdir'),
      (dict(weight_decay=1e-4), 'was saved by a run with weight_decay=0.0, this config has '
       'weight_decay=0.0001;'),
      (dict(optimizer='sgd'), 'was saved by a run with optimizer=adam, this config has '
       'optimizer=sgd;'),
      (dict(schedule='plateau'), 'was saved by a run with schedule=cosine, this config has '
       'schedule=plateau;')]:
    with pytest.raises(UserError, match=re.escape(message)):
      train.train_and_evaluate(tiny_config(num_train_steps=4, checkpoint_every_steps=2,
                                           eval_every_steps=10, **change), str(tmp_path / 'wd'))
    assert sorted(os.listdir(tmp_path / 'wd' / 'checkpoints')) == ['2']
    assert not (tmp_path / 'wd' / 'damaged_checkpoints').exists()
  # Other fields may change: a longer run at another learning rate resumes.
  config.num_train_steps, config.learning_rate = 4, 1e-4
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert load_pretrained_with_metadata(str(tmp_path / 'wd'))[2]['step'] == 4


def test_nonfinite_step_leaves_the_state_unchanged():
  # (with a weight average kept, ema_decay: it stays as it was too)
  config = tiny_config(ema_decay=0.5, schedule='constant')  # (cosine's first rate is 0)
  batches = _random_batches(2)
  bad = dict(batches[1], image=np.full_like(batches[1]['image'], np.nan))
  one = _run_steps(config, jax.devices()[:2], 'shard_map', batches[:1], with_state=True,
                   ema_decay=0.5)
  two = _run_steps(config, jax.devices()[:2], 'shard_map', [batches[0], bad], with_state=True,
                   ema_decay=0.5)
  assert two[2][1]['nonfinite'] == 1.0 and one[2][0]['nonfinite'] == 0.0
  for a, b in zip(jax.tree.leaves(one[:2]), jax.tree.leaves(two[:2]), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(one[3].ema), jax.tree.leaves(two[3].ema), strict=True):
    np.testing.assert_array_equal(np.asarray(a.addressable_data(0)),
                                  np.asarray(b.addressable_data(0)))
  # (the good step moved it: halfway from the initial weights to the new ones)
  assert not np.array_equal(np.asarray(jax.tree.leaves(one[3].ema['params'])[0]),
                            np.asarray(jax.tree.leaves(one[3].params)[0]))
  assert int(two[3].step) == int(one[3].step) == 1  # it counts applied updates (the loop: batches)


@pytest.fixture
def nan_at_step_4(monkeypatch):
  real = input_pipeline._TrainExample.map

  def poisoned(self, j):  # global step 4 (batch index 3) gets a NaN image
    out = real(self, j)  # (j counts from the run's start; `offset` is the examples before it)
    if self.offset // self.global_batch + j // self.local_batch == 3:
      out['image'] = np.full_like(out['image'], np.nan)
    return out

  monkeypatch.setattr(input_pipeline._TrainExample, 'map', poisoned)


def test_nonfinite_loss_stop(tmp_path, nan_at_step_4):
  """Stops at the bad step; the save due at that step is not made."""
  config = tiny_config(on_nonfinite='stop', num_train_steps=6, checkpoint_every_steps=2,
                       eval_every_steps=10, log_every_steps=10)
  with pytest.raises(UserError, match='non-finite loss or gradient at step 4'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert load_pretrained_with_metadata(str(tmp_path / 'wd'))[2]['step'] == 2


def test_nonfinite_loss_skip_logs_it_and_resumes_exactly(tmp_path, nan_at_step_4, capfd):
  """The skipped step still counts (it consumed a batch): a run resumed after it ends where an
  uninterrupted one does. The loop reads step 4's flag a step late (no row, eval or save at 4)
  and still reports it, in the next row too."""
  config = tiny_config(on_nonfinite='skip', num_train_steps=8, checkpoint_every_steps=3,
                       eval_every_steps=10, log_every_steps=3, schedule='constant')
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  assert 'skipped step 4: non-finite loss or gradient' in ''.join(capfd.readouterr())
  config.num_train_steps = 6
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  config.num_train_steps = 8
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  _, variables, meta = load_pretrained_with_metadata(str(tmp_path / 'wd'))
  assert meta['step'] == 8
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
  for x, y in zip(jax.tree.leaves(_params(tmp_path / 'straight')),
                  jax.tree.leaves(_params(tmp_path / 'wd')), strict=True):
    np.testing.assert_array_equal(x, y)
  rows = [json.loads(line) for line in (tmp_path / 'straight' / 'metrics.jsonl').open()]
  assert [(r['step'], r['skipped_steps']) for r in rows] == [(3, 0), (6, 1), (8, 0)]
  assert all(type(r['skipped_steps']) is int for r in rows)  # a count, not 1.0
  assert all(np.isfinite(r['loss']) for r in rows)  # step 6's row: the mean of steps 5 and 6
  # In PyTorch, num_batches_tracked counts the batches BatchNorm was updated with: the skipped
  # step left the statistics as they were, so the export counts 7 of the 8 steps.
  flax_to_torch(str(tmp_path / 'straight'), str(tmp_path / 'straight.pth'))
  state_dict = torch.load(tmp_path / 'straight.pth', weights_only=True)
  assert {int(v) for k, v in state_dict.items() if k.endswith('num_batches_tracked')} == {7}


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  (tmp_path / 'a_file').write_text('not a directory')
  config = tiny_config()
  with pytest.raises(UserError, match='cannot write there'):
    train.train_and_evaluate(config, str(tmp_path / 'a_file' / 'wd'))


def test_disk_full_is_a_clear_error_and_no_partial_checkpoint_counts(small_disk):
  config = tiny_config(num_train_steps=400, checkpoint_every_steps=1,
                       eval_every_steps=1000, log_every_steps=1, keep_checkpoints=1000)
  workdir = small_disk / 'wd'
  with pytest.raises(UserError, match='cannot write \\(No space left on device\\); the last '
                                      'complete checkpoint'):
    train.train_and_evaluate(config, str(workdir))
  # Whatever was left: a checkpoint that loads is whole; nothing half-written is taken.
  steps = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  assert steps, 'expected some checkpoints before the disk filled'
  model, variables, meta = load_pretrained_with_metadata(str(workdir))
  assert meta['step'] == max(steps)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))


@pytest.fixture
def printed():
  """What threading and sys would print of the exceptions that end threads and of those that
  cannot be raised (pytest's own hooks turn them into warnings)."""
  seen = []
  with print_hooks_kept():
    threading.excepthook = lambda args: seen.append(f'thread ended: {args.exc_value}')
    sys.unraisablehook = lambda args: seen.append(f'unraisable: {args.exc_value}')
    yield seen


class _RaisesWhenCollected:
  def __init__(self, problem):
    self.problem = problem

  def __del__(self):
    raise self.problem


def _in_a_thread(problem):
  """What Orbax's writer threads and their futures do: log the exception, leave it unraisable,
  or let it end the thread."""
  def run():
    logging.getLogger('absl').error('writer thread: %s', problem, exc_info=problem)
    _RaisesWhenCollected(problem)  # (collected at once: an unraisable exception)
    raise problem
  thread = threading.Thread(target=run)
  thread.start()
  thread.join()


def test_after_a_refused_write_other_threads_print_nothing(printed, caplog):
  # The race CI once caught through train.py (one run of 22 here): a save's writer thread still
  # running as the interpreter shut down logged 'cannot schedule new futures ...' with its
  # traceback after the error line. Here the same, in order, without the race.
  late = RuntimeError('cannot schedule new futures after interpreter shutdown')
  _in_a_thread(RuntimeError('before'))  # (outside the block: shown)
  with pytest.raises(OSError, match='No space'):
    with quiet_failed_saves():
      _in_a_thread(RuntimeError('during'))  # (not about the disk: shown)
      raise OSError(errno.ENOSPC, 'No space left on device')
  _in_a_thread(late)
  logging.getLogger('absl').error('the main thread: %s', late)  # (shown: only others are held)
  _RaisesWhenCollected(late)
  assert [r.getMessage() for r in caplog.records] == [
      'writer thread: before', 'writer thread: during', f'the main thread: {late}']
  assert printed == [f'{what}: {when}' for when in ('before', 'during')
                     for what in ('unraisable', 'thread ended')] + [f'unraisable: {late}']


def test_a_block_that_ends_otherwise_puts_the_hooks_back(printed, caplog):
  hooks = (sys.unraisablehook, threading.excepthook)
  filters = list(logging.getLogger('absl').filters)
  with pytest.raises(ValueError):
    with quiet_failed_saves():
      raise ValueError('not the disk')
  assert (sys.unraisablehook, threading.excepthook) == hooks
  assert logging.getLogger('absl').filters == filters
  _in_a_thread(RuntimeError('after the block'))
  assert [r.getMessage() for r in caplog.records] == ['writer thread: after the block']
  assert printed == ['unraisable: after the block', 'thread ended: after the block']


def test_a_full_disk_ends_no_thread_of_tensorboards_writer(tmp_path, printed, monkeypatch,
                                                            capsys):
  # tensorboardX writes events on its own thread: a refused write there ended the thread with
  # a traceback (seen once in a full run of the suite, as a pytest thread warning).
  from tensorboardX.event_file_writer import EventsWriter

  from unet_jax.reporting import Reporter

  def full(self, *args):
    raise OSError(errno.ENOSPC, 'No space left on device')
  reporter = Reporter(str(tmp_path), total_steps=3, start_step=0, images_per_step=1)
  monkeypatch.setattr(EventsWriter, 'write_event', full)
  monkeypatch.setattr(EventsWriter, 'flush', full)
  reporter.write(1, {'loss': 1.0})
  reporter.close()  # (its thread takes the event, then stops; the last flush fails too)
  assert printed == []
  assert 'step 1' in capsys.readouterr().out


def test_disk_full_in_train_py_is_one_line_on_stderr(small_disk):
  # Before: about 1,070 lines of Orbax's ERROR logs and 'Event loop is closed' tracebacks from
  # the failed save's threads, and tensorboardX's failed flush again at exit.
  cmd = _train_cmd(small_disk / 'wd', '--config.num_train_steps=400',
                   '--config.checkpoint_every_steps=1', '--config.eval_every_steps=1000',
                   '--config.keep_checkpoints=1000')
  proc = subprocess.run(cmd, env=_env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  # Progress bars aside (training's, and the dataset generation's nested ones, which move the
  # cursor up), stderr is the error line alone.
  lines = [line for line in re.split(r'[\r\n]', proc.stderr)
           if line.strip() and not re.search(r'\d+%\||\x1b\[', line)]
  assert len(lines) == 1, [repr(x) for x in lines[:30]]
  assert lines[0].startswith('error: ') and 'cannot write (No space left on device)' in lines[0]


def test_a_failed_saves_folder_is_removed_also_when_a_late_write_brings_it_back(tmp_path,
                                                                                monkeypatch):
  # As tensorstore's threads do after a refused write: another write of the same save, still in
  # flight, recreates its folder after the failed save's folder was first removed.
  late = threading.Event()

  def write_late(folder):
    time.sleep(0.3)
    os.makedirs(folder, exist_ok=True)
    late.set()
    try:
      os.makedirs(os.path.join(folder, 'variables', 'ocdbt', 'd'))
    except FileNotFoundError:
      pass  # removed again between two of these mkdirs: what a CI run once saw, and fine
  with pytest.raises(OSError, match='No space left'):
    with atomic_directory(str(tmp_path / 'out')) as tmp:
      threading.Thread(target=write_late, args=(tmp,)).start()
      raise OSError(errno.ENOSPC, 'No space left on device')
  assert late.is_set() and os.listdir(tmp_path) == []
  # A save that succeeds is renamed into place at once, without the removal's watch.
  watched = []
  monkeypatch.setattr(checkpoint, '_remove_for_good', watched.append)
  with atomic_directory(str(tmp_path / 'out')) as tmp:
    open(os.path.join(tmp, 'x'), 'w').close()
  assert os.listdir(tmp_path) == ['out'] and watched == []

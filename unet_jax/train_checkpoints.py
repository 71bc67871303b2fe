"""Training checkpoints: Orbax CheckpointManager over WORKDIR/checkpoints/<step>/.

Each step directory holds two items: `state` (params, optimizer state, batch_stats, step) and
`meta` (model config, mask values, run config). The data stream needs no state of its own: the
step number is its position (input_pipeline.py).
Saves are asynchronous; Orbax writes to a temporary directory and renames it when complete, so
a step directory that exists is whole. Kept: the latest `keep` and the best by eval Dice.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from unet_jax.checkpoint import BEST_STEP, CHECKPOINTS_DIR

BEST_METRIC = 'eval_dice'


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def _options(keep: int, read_only: bool = False) -> ocp.CheckpointManagerOptions:
  return ocp.CheckpointManagerOptions(
      # best_fn makes Orbax write each step's metrics beside it (without it they lived only in
      # the saving run's memory: a resumed run's first save deleted the best step) and gives
      # best_step(); which steps are kept is the preservation policy's alone.
      best_fn=_best_metric, best_mode='max',
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(keep),
          policies.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                         keep_checkpoints_without_metrics=False),
      ]),
      enable_async_checkpointing=not read_only,
      cleanup_tmp_directories=not read_only,  # leftovers of a save cut short by a kill
      create=not read_only,
      read_only=read_only,
      save_interval_steps=0 if read_only else 1,
  )


class _UnscoredSaveNotice(logging.Filter):
  """Drops Orbax's warning at every save without metrics when best_fn is set: a step no
  evaluation fell on is saved without a score by design (it printed at most saves of a run)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in str(record.msg)


_UNSCORED_SAVE_NOTICE = _UnscoredSaveNotice()


class TrainCheckpoints:
  def __init__(self, workdir: str, keep: int):
    # Orbax's logger; addFilter skips a filter it already holds, so each run adds it once.
    logging.getLogger('absl').addFilter(_UNSCORED_SAVE_NOTICE)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
    self._manager = ocp.CheckpointManager(self.directory, options=_options(keep),
                                          item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def quarantine(self, step: int) -> str:
    """Moves a damaged step out of the way (to WORKDIR/damaged_checkpoints/) and returns where."""
    import shutil
    target_dir = os.path.join(os.path.dirname(self.directory), 'damaged_checkpoints')
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f'{step}-{int(time.time())}')
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def save(self, step: int, state: Any, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics if metrics and BEST_METRIC in metrics else None, force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored['state']

  def saved_meta(self, step: int) -> dict[str, Any] | None:
    """The `meta` item of `step` (model config, run config), or None if it cannot be read."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
    except Exception:  # a damaged step: restoring it says so
      return None

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def latest_saved_meta(workdir: str) -> tuple[int, dict[str, Any]] | None:
  """(step, meta) of the newest step of WORKDIR whose `meta` item reads, without writing there;
  None when there is none (a new run)."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory, options=_options(1, read_only=True),
                                  item_handlers={'meta': ocp.JsonCheckpointHandler()})
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return step, manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta']
      except Exception:  # a damaged step: the resume falls back past it too
        continue
    return None
  finally:
    manager.close()


def read_workdir(workdir: str, step: int | str | None = None,
                 ) -> tuple[int, dict[str, Any], dict, int]:
  """(step, {'params', 'batch_stats'}, meta, updates) of a workdir's latest step, or the given
  one, or with step='best' the one with the highest eval Dice. The variables are the moving
  average of a run with config.ema_decay > 0.

  `step` counts the batches the run consumed, `updates` the ones applied: a step skipped as
  non-finite consumed its batch but changed neither the weights nor the BatchNorm statistics.

  Restores onto this process's first device whatever topology the run had (a multi-process
  run's checkpoint loads in a single process).
  """
  import jax
  from absl import logging as absl_logging
  verbosity = absl_logging.get_verbosity()
  # Orbax warns that the `data` item is not restored: by design, it is only for resuming.
  absl_logging.set_verbosity(absl_logging.ERROR)
  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR),
      options=_options(1, read_only=True),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})
  try:
    if step == BEST_STEP:
      step = manager.best_step()
      if step is None:
        raise FileNotFoundError(
            f'{workdir}: none of its checkpoints has an eval Dice saved with it (a step is '
            'scored when an evaluation falls on it; runs before unet_jax saved the score have '
            'none); name a step instead: checkpoints/STEP')
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{workdir}: no complete checkpoint in {CHECKPOINTS_DIR}/')
    tree = manager.item_metadata(step)['state'].tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
    absl_logging.set_verbosity(verbosity)
  state = restored['state']
  # A run that kept a moving average of its weights serves that (train.variables_of).
  variables = state.get('ema') or {'params': state['params'], 'batch_stats': state['batch_stats']}
  return step, variables, restored['meta'], int(state['step'])

"""Training: TrainState, the per-device train and eval steps, and the loop.

    from unet_jax.train import train_and_evaluate
    train_and_evaluate(config, workdir)

The steps are written once, per device, binding the mesh axis `data`; `parallel.distribute` runs
them under shard_map (default) or pmap. BatchNorm statistics, gradients and metrics are averaged
over all devices, so any device count computes what one device computes on the global batch.
"""

from __future__ import annotations

import contextlib
import copy
import fractions
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state

from unet_jax import class_balance, freezing, input_pipeline, losses, parallel, regions
from unet_jax.checkpoint import (
  CHECKPOINTS_DIR,
  INIT_LAYOUT,
  complete_model_config,
  model_config,
)
from unet_jax.config_checks import validate_config, validate_data
from unet_jax.ct_normalization import CT_SAMPLES, CTStatistics
from unet_jax.deep_supervision import deep_supervision_loss
from unet_jax.errors import UserError, disk_error, first_line, quiet_failed_saves
from unet_jax.flip_tta import eval_logits
from unet_jax.image_io import mask_colours, size_text
from unet_jax.levers import CPU_SCHEDULERS
from unet_jax.model import DEEP_SUPERVISION_HEAD, UNet, init_variables
from unet_jax.optimizers import (
  find_plateau_state,
  learning_rate_schedule,
  make_optimizer,
  plateau_update,
  replace_plateau_state,
)
from unet_jax.predict import eval_apply
from unet_jax.profiling import StepProfile, check_profile_steps
from unet_jax.reporting import Reporter, float32_decimal, score_lines
from unet_jax.step_compilation import (
  compile_per_signature,
  compiler_options,
  init_compiler_options,
  use_persistent_cache,
)
from unet_jax.train_checkpoints import TrainCheckpoints, latest_saved_meta


class TrainState(train_state.TrainState):
  batch_stats: Any


class EmaTrainState(TrainState):
  """With `ema`: {'params', 'batch_stats'} averaged over the steps (config.ema_decay > 0), the
  weights that evaluation, checkpoints' readers and conversion use. A class of its own so that
  the state of a run without it, and its checkpoints, keep their form."""
  ema: Any


def variables_of(state: TrainState) -> dict[str, Any]:
  """The weights a run is evaluated with and serves: the moving average when it keeps one."""
  if isinstance(state, EmaTrainState):
    return state.ema
  return {'params': state.params, 'batch_stats': state.batch_stats}


def build_model(config: ml_collections.ConfigDict, axis_name: str | None) -> UNet:
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  eval_norms = (freezing.frozen_by_config(config) if config.get('freeze_batch_norm', False)
                else ())
  return UNet(**config.model.to_dict(), dtype=dtype, axis_name=axis_name, eval_norms=eval_norms)


HEAD = 'out_conv'  # the output layer, which init_new_head draws anew


def create_train_state(config: ml_collections.ConfigDict, model: UNet, mesh: jax.sharding.Mesh,
                       initial: dict[str, Any] | None = None) -> TrainState:
  """Initialises replicated over `mesh`; shapes come from eval_shape, nothing is built twice.

  `initial`: variables to start from (`config.init_from`) instead of a random draw (the layers
  it lacks drawn as a new run draws them: `out_conv` with init_new_head, deep supervision's
  heads); the optimizer state is new either way."""
  tx = make_optimizer(config)

  def init(rng, initial):
    # outside any mapped axis, on the smallest input
    if initial is None:
      variables = init_variables(model, rng)
    else:  # layers it lacks (init_new_head's output layer, deep supervision's heads) as a new
      # run draws them (XLA drops the other draws)
      drawn = init_variables(model, rng)['params']
      variables = {'params': {**drawn, **initial['params']},
                   'batch_stats': initial['batch_stats']}
    if config.get('ema_decay', 0.0):  # the average starts at the initial weights
      return EmaTrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                                  batch_stats=variables['batch_stats'], ema=dict(variables))
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables['batch_stats'])

  key = jax.random.key(config.seed)
  if initial is not None:  # every process holds the whole tree: a replicated global array
    initial = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        parallel.replicated(mesh), np.asarray(x)), dict(initial))
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh),
                           jax.eval_shape(init, key, initial))
  options = init_compiler_options(mesh.devices.flat[0].platform)
  return compile_per_signature(jax.jit(init, out_shardings=shardings), options)(key, initial)


def _differing(theirs: Any, ours: Any, fields: Any) -> list[str]:
  """The fields whose values differ between two settings (dicts or ConfigDicts), compared as
  JSON holds them (a saved config's lists are a config's tuples)."""
  def plain(value: Any) -> Any:
    return json.loads(json.dumps(value))
  return [f for f in fields if plain(theirs.get(f)) != plain(ours.get(f))]


def _settings(values: Any, fields: list[str], prefix: str = '') -> str:
  return ', '.join(f'{prefix}{f}={values.get(f)}' for f in fields)


def load_initial_weights(config: ml_collections.ConfigDict, model: UNet
                         ) -> tuple[dict[str, Any], str | None]:
  """The variables of `config.init_from` for `model` (a converted checkpoint, a workdir, or a
  PyTorch state_dict file (.pth, .safetensors, ...), converted in memory), and the PyTorch
  layout they came from, if known ('seed' or 'milesial': flax-to-torch's default way back)."""
  from unet_jax.checkpoint import load_pretrained_with_metadata
  path = os.path.expanduser(config.init_from)
  try:
    if os.path.isfile(path):
      from unet_jax.convert import state_dict_to_flax
      from unet_jax.state_dict_io import read_state_dict
      theirs, variables, metadata = state_dict_to_flax(read_state_dict(path)[0], path)
    else:
      loaded, variables, metadata = load_pretrained_with_metadata(path)
      theirs = model_config(loaded)
  except UserError as e:
    raise UserError(f'init_from: {e}') from None
  theirs, ours = complete_model_config(theirs), complete_model_config(model_config(model))
  new_head = config.get('init_new_head', False)
  # With a new head, the output layer's classes may differ: it is not taken. Deep supervision's
  # heads are taken where both have them, drawn where only this model has them.
  differ = _differing(theirs, ours, [f for f in ours if f != 'deep_supervision' and not (
      new_head and f == 'num_classes')])
  if differ:
    hint = (' (or --config.init_new_head=True to start the output layer anew, for '
            f"this config's {ours['num_classes']} classes)" if differ == ['num_classes'] else '')
    raise UserError(
        f'init_from={config.init_from}: its weights are for a UNet with '
        f"{_settings(theirs, differ)}, this config's has {_settings(ours, differ)}; set "
        + ' '.join(f'--config.model.{f}={theirs[f]}' for f in differ) + hint)
  layout = metadata.get('source_layout') or metadata.get(INIT_LAYOUT)
  params = {k: v for k, v in variables['params'].items()
            if not (new_head and k == HEAD) and not (
                k.startswith(DEEP_SUPERVISION_HEAD) and (new_head or not model.deep_supervision))}
  return {'params': params, 'batch_stats': variables['batch_stats']}, layout


_OPTIMIZER_FIELDS = ('optimizer', 'weight_decay', 'grad_clip_norm', 'momentum', 'schedule',
                     'freeze', 'lr_multipliers')


def _normalization(config: Any) -> str:
  return (config.get('data') or {}).get('normalize', 'unit')


def check_same_normalization(saved: dict[str, Any], config: ml_collections.ConfigDict,
                             where: str) -> None:
  """Refuses to resume a run whose images were normalised otherwise: its weights have learnt
  inputs of another range."""
  saved_config = saved.get('config') or {}
  if saved_config.get('data') is not None and \
      _normalization(saved_config) != _normalization(config):
    raise UserError(
        f'{where} was saved by a run with data.normalize={_normalization(saved_config)}, this '
        f'config has data.normalize={_normalization(config)}; rerun with its settings to resume '
        'it, or choose another --workdir for a new run')


def check_resumable(saved: dict[str, Any], config: ml_collections.ConfigDict, model: UNet,
                    state: TrainState, where: str, mask_values: list | None = None) -> None:
  """Refuses to resume from a checkpoint whose state cannot fit this run's (it would otherwise
  fail to restore and be taken for a damaged one): another model, or an optimizer whose state
  has another form; and one trained on other classes (`mask_values`: this run's dataset's)."""

  def refusal(theirs: Any, ours: Any, differ: list[str], prefix: str = '') -> UserError:
    return UserError(
        f'{where} was saved by a run with {_settings(theirs, differ, prefix)}, this config has '
        f'{_settings(ours, differ, prefix)}; rerun with its settings to resume it, or choose '
        'another --workdir for a new run' + (
            # (unfreezing after a frozen phase: a new run from the frozen one's weights)
            f' (--config.init_from={where} starts it from these weights)'
            if 'freeze' in differ else ''))

  theirs = complete_model_config(saved.get('model') or {})
  ours = complete_model_config(model_config(model))
  differ = _differing(theirs, ours, ours)
  if differ:
    raise refusal(theirs, ours, differ, 'model.')
  # Class k is the k-th sorted mask value: masks with other values (new files, another
  # ignore_value or reader) would silently give the saved weights' classes other meanings.
  saved_values = (saved.get('metadata') or {}).get('mask_values')
  if mask_values is not None and saved_values is not None and \
      json.loads(json.dumps(mask_values)) != saved_values:
    raise UserError(f'{where} was trained on masks whose values {saved_values[:8]} are its '
                    f'classes 0..{len(saved_values) - 1}; this run\'s masks hold '
                    f'{mask_values[:8]}; rerun with its data to resume it, or choose another '
                    '--workdir for a new run (--config.init_from=WORKDIR starts from its weights)')
  check_same_normalization(saved, config, where)
  saved_config = ml_collections.ConfigDict(saved.get('config') or {})
  try:
    saved_tx = make_optimizer(saved_config)
  except (UserError, AttributeError, KeyError):
    return  # (an unknown run config: the restore decides)

  def form(tx: Any) -> Any:
    return jax.tree.structure(jax.eval_shape(tx.init, state.params))

  averaged = [bool(c.get('ema_decay', 0.0)) for c in (saved_config, config)]
  if averaged[0] != averaged[1]:  # (the state has the average, or not)
    raise refusal({'ema_decay': saved_config.get('ema_decay', 0.0)}, config, ['ema_decay'])
  # The best step, the plateau's and early stopping's bests are eval Dice of the saved kind.
  field = 'eval_include_background'
  if model.num_classes > 1 and saved_config.get(field, True) != config.get(field, True):
    raise refusal({field: saved_config.get(field, True)}, config, [field])
  # Other regions would give the saved channels other meanings.
  region_fields = ('regions', 'region_class_order')
  theirs_data = {f: (saved_config.get('data') or {}).get(f, ()) for f in region_fields}
  ours_data = {f: config.data.get(f, ()) for f in region_fields}
  differ = _differing(theirs_data, ours_data, region_fields)
  if differ:
    raise refusal(theirs_data, ours_data, differ, 'data.')
  # Another held-out split would train on pairs the run has evaluated (and chosen its best) on.
  if config.data.name == 'image_folder':
    split_fields = {'holdout_percent': 10.0, 'num_folds': 0, 'fold': 0, 'fold_seed': -1}
    theirs_data = {f: (saved_config.get('data') or {}).get(f, d) for f, d in split_fields.items()}
    ours_data = {f: config.data.get(f, d) for f, d in split_fields.items()}
    differ = [f for f in split_fields if theirs_data[f] != ours_data[f]]
    if differ:
      raise refusal(theirs_data, ours_data, differ, 'data.')
  if form(saved_tx) == form(state.tx):
    return

  def optimizer_settings(c: Any) -> dict[str, Any]:
    # freeze as the modules it names ('encoder' or their names); older checkpoints have
    # neither field: none frozen, one rate
    modules = freezing.module_names(model.depth, model.deep_supervision)
    return {**{f: c.get(f) for f in _OPTIMIZER_FIELDS},
            'freeze': freezing.frozen_modules(freezing.freeze_names(c.get('freeze', ())),
                                              modules),
            'lr_multipliers': c.get('lr_multipliers', ())}

  theirs, ours = optimizer_settings(saved_config), optimizer_settings(config)
  differ = _differing(theirs, ours, _OPTIMIZER_FIELDS)
  if not differ:
    raise UserError(f"{where}: its optimizer state does not fit this config's optimizer; "
                    'rerun with its settings to resume it, or choose another --workdir')
  raise refusal(theirs, ours, differ)


def loss_options(config: ml_collections.ConfigDict, ignore_id: int | None
                 ) -> dict[str, Any]:
  """The config's settings of losses.segmentation_loss, for train_step (runs before a field
  existed: its default)."""
  return dict(dice_weight=config.dice_weight, ce_weight=config.get('ce_weight', 1.0),
              ignore_id=ignore_id,
              class_weights=tuple(config.get('class_weights', ())) or None,
              pos_weight=config.get('pos_weight', 1.0),
              focal_gamma=config.get('focal_gamma', 0.0),
              tversky=tuple(config.get('tversky', ())) or None,
              dice_reduction=config.get('dice_reduction', 'image'),
              dice_include_background=config.get('dice_include_background', True),
              dice_smooth=config.get('dice_smooth', losses.DICE_SMOOTH),
              label_smoothing=config.get('label_smoothing', 0.0),
              lovasz=config.get('lovasz', False),
              generalized_dice=config.get('generalized_dice', False),
              regions=regions.config_regions(config))


def eval_include_background(config: ml_collections.ConfigDict) -> bool:
  """Whether class 0 counts in a run's mean eval scores: its eval_include_background, and
  always with data.regions (every region is foreground)."""
  return bool(config.get('eval_include_background', True) or regions.config_regions(config))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: UNet,
               ema_decay: float = 0.0, grad_accum_steps: int = 1,
               frozen: tuple[str, ...] = (), **loss_options: Any,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on this device's share of the global batch (per-device code).

  `loss_options`: losses.segmentation_loss's settings (`dice_weight`, `ignore_id`,
  `class_weights`, ...; loss_options gives a config's), each scale's loss taken over the
  mapped axis with the batch's 'weight' map, if any, as its `border`.

  `grad_accum_steps` > 1: the share is taken in that many microbatches, one after another
  (input_pipeline.microbatch_order puts each microbatch's examples there), each a batch of its
  own for the loss and BatchNorm (whose running statistics update once per microbatch), and the
  step applies the mean of their gradients: torch's loop of `(loss / k).backward()` per
  microbatch, then `optimizer.step()`. Only one microbatch's activations are alive at a time.
  `ema_decay` > 0 (an EmaTrainState): then ema = decay * ema + (1 - decay) * the new weights,
  BatchNorm statistics included (timm's ModelEmaV2; torch's AveragedModel with
  get_ema_multi_avg_fn and use_buffers=True).
  `frozen`: top-level modules (freezing.py) the loss is not differentiated by: their gradients
  are 0 (the optimizer leaves them as they are), and the backward pass that nothing trained
  needs (a frozen encoder's) is not built."""

  def scale_loss(logits, labels, border=None):
    return losses.segmentation_loss(logits, labels, axis_name=parallel.AXIS, border=border,
                                    **loss_options)

  trained, fixed = freezing.split(state.params, frozen)

  def loss_fn(trained, batch_stats, micro):
    outputs, updates = model.apply({'params': {**fixed, **trained}, 'batch_stats': batch_stats},
                                   micro['image'], train=True, mutable=['batch_stats'],
                                   all_scales=model.deep_supervision)
    border = micro.get('weight')  # (the UNet paper's weight map, with config.border_weight)
    loss, metrics = (deep_supervision_loss(outputs, micro['mask'], scale_loss, border)
                     if model.deep_supervision else scale_loss(outputs, micro['mask'], border))
    return loss, (metrics, updates['batch_stats'])

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    grads, (metrics, batch_stats) = grad_fn(trained, state.batch_stats, batch)
  else:
    micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

    def accumulate(carry, one):
      sums, batch_stats = carry
      grads, (metrics, batch_stats) = grad_fn(trained, batch_stats, one)
      return (jax.tree.map(jnp.add, sums, (grads, metrics)), batch_stats), None

    # From zeros, every microbatch in the scan's one body: one copy of the network's backward
    # to compile and one set of its buffers (0 + g is g, so the sums are as from the first).
    shapes = jax.eval_shape(grad_fn, trained, state.batch_stats,
                            jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0], shapes[1][0]))
    (sums, batch_stats), _ = jax.lax.scan(accumulate, (zeros, state.batch_stats), micro)
    grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, sums)
  grads = jax.lax.pmean(grads, parallel.AXIS)
  grads = {**jax.tree.map(jnp.zeros_like, fixed), **grads}
  metrics = jax.lax.pmean(metrics, parallel.AXIS)
  # batch_stats are already identical on every device: BatchNorm averaged over the axis.
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if fixed:  # the frozen weights as they were (their updates of 0 then cost nothing)
    new_state = new_state.replace(params={**new_state.params, **fixed})
  if ema_decay:
    new_state = new_state.replace(ema=jax.tree.map(
        lambda avg, x: ema_decay * avg + (1.0 - ema_decay) * x, state.ema,
        {'params': new_state.params, 'batch_stats': new_state.batch_stats}))
  # A non-finite loss or gradient leaves the state as it was (the host then skips or stops).
  finite = jnp.isfinite(metrics['loss']) & jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  # Computed once: without the barrier XLA copies this chain of scalar ANDs (64 for the seed
  # UNet) into each of the state's ~230 update fusions (15,000 ANDs, 3 of 9 MB of the compiled
  # step's HLO), and the larger program cost 3 s of compilation and 50 MB of resident memory.
  finite = jax.lax.optimization_barrier(finite)
  # Every leaf goes through the `where`, the step counter too, so state.step counts the applied
  # updates (as the optimizer's count does); the loop numbers steps by the batches consumed and
  # resumes by its checkpoints' numbers. (With the counter left out of the `where`, XLA's
  # memory-ordered schedule of the remat step kept 0.89x the plain step's buffers, not 0.58x.)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
  return new_state, metrics


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array], *, model: UNet,
              ignore_id: int | None = None, tta: bool = False,
              region_sets: regions.Regions | None = None) -> dict[str, jax.Array]:
  """Summed scores of this device's share of an eval batch, summed over all devices.
  `tta`: of the mean logits over flips (flip_tta.py); `region_sets`: each region's scores
  (data.regions)."""
  logits = eval_logits(model, variables, batch['image'], tta)
  return jax.lax.psum(losses.summed_eval_metrics(logits, batch['mask'], batch['valid'],
                                                 ignore_id, region_sets), parallel.AXIS)


def _local(x: jax.Array) -> np.ndarray:
  """The value of a replicated array, from this process's first copy (multi-process safe)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


class _TrainMetrics:
  """The train metrics of the steps since the last logged row, and which steps were skipped.

  Reading a step's non-finite flag waits for that step to finish, so the loop reads each flag
  one step late, with the next step already queued (the device does not wait for the host
  between steps), and at once only before a row, an evaluation or a save.
  """

  def __init__(self):
    self._unread: list[tuple[int, dict[str, jax.Array]]] = []
    self._applied: list[dict[str, jax.Array]] = []
    self._skipped = 0

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._unread.append((step, metrics))

  def read(self, upto: int) -> list[int]:
    """Reads the flags of the steps up to `upto`; returns the skipped ones among them."""
    skipped = []
    while self._unread and self._unread[0][0] <= upto:
      step, metrics = self._unread.pop(0)
      if float(_local(metrics.pop('nonfinite'))):
        skipped.append(step)
      else:  # a skipped step's NaN would make its whole window's averages NaN
        self._applied.append(metrics)
    self._skipped += len(skipped)
    return skipped

  def row(self) -> dict[str, float]:
    """Averages over the applied steps read so far, the count of skipped ones; starts anew."""
    row = {}
    if self._applied:
      row.update({k: float(v) for k, v in jax.tree.map(
          lambda *xs: sum(_local(x) for x in xs) / len(xs), *self._applied).items()})
    row['skipped_steps'] = self._skipped
    self._applied, self._skipped = [], 0
    return row


class _EarlyStopping:
  """Stops a run whose eval Dice has not improved for `patience` evaluations in a row
  (Lightning's EarlyStopping with mode='max'; patience 0: never). Its counters travel in each
  checkpoint's meta, so a resumed run counts on, and a rerun of a stopped one stops again
  (unless given a larger patience)."""

  def __init__(self, patience: int, saved: dict[str, Any] | None = None):
    self.patience = patience
    self.best: float | None = (saved or {}).get('best')
    self.bad_evals: int = (saved or {}).get('bad_evals', 0)

  def update(self, dice: float) -> bool:
    """After an evaluation: True if the run must stop here."""
    if self.best is None or dice > self.best:
      self.best, self.bad_evals = dice, 0
    else:
      self.bad_evals += 1
    return self.due

  @property
  def due(self) -> bool:
    return self.patience > 0 and self.bad_evals >= self.patience

  def state(self) -> dict[str, Any]:
    return {'best': self.best, 'bad_evals': self.bad_evals}


def _save_due(config: ml_collections.ConfigDict, step: int, stop: dict[str, Any]) -> bool:
  return (step % config.checkpoint_every_steps == 0 or step == config.num_train_steps
          or bool(stop['signal']))


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, Any]]:
  """SIGTERM/SIGINT ask the loop to save and stop at the next step boundary."""
  flag: dict[str, Any] = {'signal': None}

  def handler(signum, frame):
    del frame
    flag['signal'] = signal.Signals(signum).name

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def step_compiler_options(config: ml_collections.ConfigDict,
                          mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """XLA options for the train and eval steps on `mesh`'s platform (see step_compilation.py)."""
  return compiler_options(config.get('cpu_scheduler', CPU_SCHEDULERS[0]),
                          mesh.devices.flat[0].platform)


def _listdir(path: str) -> list[str]:
  return os.listdir(path) if os.path.isdir(path) else []


def _check_writable(workdir: str) -> None:
  """Fails early, in one line, if checkpoints could not be written to WORKDIR."""
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f'{workdir}: cannot write there ({parent} is not a writable directory); '
                    'choose another --workdir')


def _plateau_stepper(config: ml_collections.ConfigDict, schedule: Callable[[int], Any],
                     mesh: jax.sharding.Mesh
                     ) -> Callable[[TrainState, float], tuple[TrainState, float, float]]:
  """For schedule='plateau': (state, eval Dice) -> (state, old rate, new rate), after each
  evaluation (ReduceLROnPlateau.step). The rates are the next update's, at the old and the new
  scale (in a warmup, below `learning_rate`). Every process computes the same: the Dice is
  global."""
  update = jax.jit(plateau_update(config), out_shardings=parallel.replicated(mesh))

  def step(state: TrainState, dice: float) -> tuple[TrainState, float, float]:
    old = find_plateau_state(state.opt_state)
    new = update(old, dice)
    scheduled = float(schedule(int(_local(state.step))))  # (the next update's position)
    rates = (float32_decimal(scheduled * float(_local(s.lr_scale))) for s in (old, new))
    return state.replace(opt_state=replace_plateau_state(state.opt_state, new)), *rates

  return step


def _run_summary(config: ml_collections.ConfigDict, model: UNet, state: TrainState,
                 info: input_pipeline.DataInfo, mesh: jax.sharding.Mesh, workdir: str) -> str:
  """One line at the start: what trains on what, where, into which workdir."""
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  devices = mesh.devices.size
  kind = mesh.devices.flat[0].platform
  k = config.get('grad_accum_steps', 1)
  micro = f' in {k} microbatches of {config.batch_size // k}' if k > 1 else ''
  epochs = f' ({config.num_epochs:g} epochs)' if config.get('num_epochs', 0) else ''
  crop = config.get('crop_size', 0)
  crops = f', trained on {crop}x{crop} crops of them' if crop else ''
  supervised = ', deep supervision' if model.deep_supervision else ''
  if regions.config_regions(config):
    supervised = f', each the sigmoid of a region of data.regions{supervised}'
  frozen = freezing.frozen_by_config(config)
  if frozen:
    kept = sum(int(np.prod(x.shape)) for m in frozen for x in jax.tree.leaves(state.params[m]))
    supervised += f', {kept:,} of them frozen: {" ".join(frozen)}' + (
        ', their BatchNorms as in evaluation' if config.get('freeze_batch_norm', False) else '')
  for modules, multiplier in freezing.lr_multipliers(config):
    supervised += f', learning rate x{multiplier:g} for {" ".join(modules)}'
  return (f'{params:,} parameters (base_features={model.base_features}, depth={model.depth}, '
          f'{model.num_classes} output channel(s){supervised}) | {info.name}: '
          f'{info.num_train} training, {info.num_eval} eval images at '
          f'{size_text(input_pipeline.image_hw(config))}{crops} | '
          f'{devices} {kind} device(s) in {jax.process_count()} process(es), batch '
          f'{config.batch_size}{micro} | {config.num_train_steps} steps{epochs} -> '
          f'{os.path.abspath(workdir)}')


def _evaluations(n: int) -> str:
  return f'{n} evaluation' + ('' if n == 1 else 's')


def _learning_rate(schedule: Callable[[int], Any], state: TrainState) -> float:
  """The rate the last applied update used (its position: the updates applied before it)."""
  rate = float(schedule(max(int(_local(state.step)) - 1, 0)))
  plateau = find_plateau_state(state.opt_state)
  if plateau is not None:
    rate *= float(_local(plateau.lr_scale))
  return float32_decimal(rate)  # the optimizer's rate is a float32 (1e-3 x 0.1: 0.0001)


def evaluation_sums(p_eval: Callable[..., Any], variables: dict[str, Any],
                    eval_ds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The scores of every example of `eval_ds`, summed (losses.summed_eval_metrics)."""
  sums = None
  for batch in eval_ds:
    out = p_eval(variables, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return jax.tree.map(_local, sums)


def evaluate(p_eval: Callable[..., Any], state: TrainState,
             eval_ds: Iterable[dict[str, np.ndarray]], include_background: bool = True,
             ) -> dict[str, float]:
  variables = variables_of(state)
  return losses.finalize_eval_metrics(evaluation_sums(p_eval, variables, eval_ds),
                                      include_background)


def _sample_predictions(config, model: UNet, state, eval_source, ignore_id: int | None,
                        ) -> tuple[np.ndarray, ...]:
  n = min(config.num_sample_images, len(eval_source))
  examples = [input_pipeline.preprocess(input_pipeline._adapt(config, eval_source[i]),
                                        input_pipeline.image_hw(config), None, None,
                                        input_pipeline.image_resample(config),
                                        normalize=input_pipeline.image_normalization(config))
              for i in range(n)]
  images = np.stack([e['image'] for e in examples])
  labels, valid = losses.valid_labels(np.stack([e['mask'] for e in examples]), ignore_id)
  truth = np.asarray(labels) if valid is None else np.where(valid, labels, -1)  # -1: ignored
  variables = jax.tree.map(_local, variables_of(state))
  logits = eval_apply(model)(variables, images)
  if regions.config_regions(config):  # (the mask painted from the regions, as predict's)
    return images, truth, regions.paint(np.asarray(logits) > 0, regions.painted_order(config))
  return images, truth, np.asarray(losses.predict_classes(logits))


def epoch_steps(num_epochs: float, num_train: int, batch_size: int) -> int:
  """The steps of `num_epochs` passes over `num_train` examples in batches of `batch_size`, the
  last one whole (the stream runs on into the next pass, as torch's last partial batch is one
  more step)."""
  examples = fractions.Fraction(str(num_epochs)) * num_train  # (exact: 0.1 epochs is 1/10)
  return max(1, math.ceil(examples / batch_size))


def _with_ct_statistics(config: ml_collections.ConfigDict, train_source: Any,
                        ignore_id: int | None, workdir: str,
                        saved: tuple[int, dict[str, Any]] | None) -> ml_collections.ConfigDict:
  """A copy of `config` with data.ct_statistics: gathered from the training data, or, when the
  run resumes (`saved`: its latest checkpoint's step and meta), those that checkpoint recorded
  (it normalises as it began whatever the data holds now, and does not gather them again)."""
  recorded = None
  if saved is not None:
    where = f'{os.path.join(workdir, CHECKPOINTS_DIR)}/{saved[0]}'
    check_same_normalization(saved[1], config, where)  # (before the gathering, which takes time)
    recorded = ((saved[1].get('config') or {}).get('data') or {}).get('ct_statistics')
  if not recorded and jax.process_index() == 0:  # (a large dataset's take minutes)
    print("data.normalize='ct': gathering the training foreground's statistics "
          f"(data.ct_samples={config.data.get('ct_samples', CT_SAMPLES):,} pixels per channel)",
          flush=True)
  statistics = (CTStatistics.from_dict(recorded) if recorded else
                input_pipeline.ct_statistics(config, train_source, ignore_id))
  if jax.process_index() == 0:
    print("data.normalize='ct': the training foreground's "
          + '; '.join(f'{field} {", ".join(f"{v:.6g}" for v in values)}'
                      for field, values in statistics._asdict().items())
          + ' (images in [0, 1])' + (f', as {where} recorded them' if recorded else ''),
          flush=True)
  config = copy.deepcopy(config)  # (the caller's keeps its own)
  with config.unlocked():
    config.data.ct_statistics = statistics.to_dict()
  return config


def _with_balanced_weights(config: ml_collections.ConfigDict, train_source: Any,
                           info: input_pipeline.DataInfo, workdir: str,
                           saved: tuple[int, dict[str, Any]] | None
                           ) -> ml_collections.ConfigDict:
  """A copy of `config` with class_weights (several classes) or pos_weight (one output
  channel) balanced by the training split's pixel counts (class_balance.py), or, when the run
  resumes (`saved`: its latest checkpoint's step and meta), those that checkpoint recorded (it
  weighs as it began; a run begun without them counts them now)."""
  recorded = (saved[1].get('config') or {}) if saved is not None else {}
  binary = config.model.num_classes == 1
  if recorded.get('balanced_class_weights', False):
    weights = recorded.get('pos_weight', 1.0) if binary else tuple(recorded.get('class_weights',
                                                                                ()))
    how = f'as {os.path.join(workdir, CHECKPOINTS_DIR)}/{saved[0]} recorded them'
  else:
    if jax.process_index() == 0:
      print(f'balanced_class_weights: counting the pixels of the {info.num_train:,} training '
            'masks', flush=True)
    counts = class_balance.pixel_counts(input_pipeline.stored_masks(config, train_source),
                                        max(config.model.num_classes, 2), info.ignore_id)
    names = input_pipeline.class_names(config, info)
    weights = (class_balance.balanced_pos_weight(counts) if binary
               else class_balance.balanced_weights(counts, names))
    how = 'from the pixels of each class: ' + ', '.join(f'{n:,}' for n in counts)
  if jax.process_index() == 0:
    what = (f'pos_weight {weights:.6g}' if binary
            else 'class_weights ' + ', '.join(f'{w:.6g}' for w in weights))
    print(f'balanced_class_weights: {what} ({how})', flush=True)
  config = copy.deepcopy(config)  # (the caller's keeps its own)
  with config.unlocked():
    if binary:
      config.pos_weight = float(weights)
    else:
      config.class_weights = tuple(weights)
  return config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from WORKDIR's latest checkpoint if any); returns the last eval metrics."""
  workdir = os.path.abspath(workdir)
  mesh = parallel.make_mesh()
  validate_config(config, mesh)
  _check_writable(workdir)
  use_persistent_cache(config.compilation_cache_dir)  # before anything compiles
  train_source, eval_source, info = input_pipeline.load_sources(config)
  validate_data(config, info)
  ct = config.data.get('normalize') == 'ct'
  balanced = config.get('balanced_class_weights', False)
  # What a resumed run recorded of them, read once for both.
  saved = latest_saved_meta(workdir) if ct or balanced else None
  if ct:  # (recorded in the run config, with checkpoints)
    config = _with_ct_statistics(config, train_source, info.ignore_id, workdir, saved)
  if balanced:  # (recorded in the run config likewise)
    config = _with_balanced_weights(config, train_source, info, workdir, saved)
  if config.get('num_epochs', 0):
    config = copy.deepcopy(config)  # (the caller's keeps its num_train_steps)
    config.num_train_steps = epoch_steps(config.num_epochs, info.num_train, config.batch_size)
    check_profile_steps(config.get('profile_steps', ()), config.num_train_steps)
  train_model = build_model(config, axis_name=parallel.AXIS)
  # init_from is read for a new run only (a resume takes the weights from its checkpoint).
  resuming = any(d.isdigit() for d in _listdir(os.path.join(workdir, CHECKPOINTS_DIR)))
  initial, init_layout = (load_initial_weights(config, train_model)
                          if config.get('init_from') and not resuming else (None, None))
  is_main = jax.process_index() == 0
  if is_main:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise UserError(f'{workdir}: cannot write there ({e.strerror}); choose another '
                      '--workdir') from None

  eval_model = build_model(config, axis_name=None)
  state = create_train_state(config, train_model, mesh, initial)
  eval_ds = input_pipeline.eval_dataset(eval_source, config)
  checkpoints = TrainCheckpoints(workdir, config.keep_checkpoints)
  names = input_pipeline.class_names(config, info)
  meta = {'model': model_config(train_model),
          'metadata': {'mask_values': info.mask_values, 'dataset': info.name,
                       **({'mask_palette': info.mask_palette} if info.mask_palette else {}),
                       # (for whoever serves it: export's model.json names the classes)
                       **({'class_names': list(names)} if names else {})},
          'config': config.to_dict()}
  # How the sample PNGs draw each class: the masks' own colours, or None (gray levels).
  sample_colours = mask_colours(regions.label_count(config), info.mask_values,
                                info.mask_palette)

  start = start_examples = 0
  early = _EarlyStopping(config.get('early_stop_patience', 0))
  # Restored with this run's shardings, not the saved ones: a run may resume on other devices.
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  damaged = False
  for step in sorted(checkpoints.all_steps(), reverse=True):
    saved = checkpoints.saved_meta(step)
    if saved is not None:
      try:
        check_resumable(saved, config, train_model, state, f'{checkpoints.directory}/{step}',
                        info.mask_values)
      except UserError:
        checkpoints.close()
        raise
    try:
      state = checkpoints.restore(step, abstract_state)
    except Exception as e:  # a damaged checkpoint: fall back to the one before it
      damaged = True
      moved = checkpoints.quarantine(step) if is_main else '(moved by process 0)'
      print(f'warning: checkpoint {checkpoints.directory}/{step} is damaged ({first_line(e)}); '
            f'falling back to the previous one; the damaged one is now in {moved}',
            file=sys.stderr, flush=True)
      continue
    start = step  # batches consumed; state.step counts only the updates applied
    saved = saved or {}
    # Examples consumed; a checkpoint from before this was recorded consumed batches of its
    # own run's batch_size.
    start_examples = saved.get(
        'examples_seen', step * saved.get('config', {}).get('batch_size', config.batch_size))
    init_layout = saved.get('metadata', {}).get(INIT_LAYOUT)  # (kept through resumes)
    early = _EarlyStopping(early.patience, saved.get('early_stop'))
    break
  if not start and damaged and config.get('init_from') and initial is None:
    # every checkpoint was damaged: a new run, from init_from's weights
    initial, init_layout = load_initial_weights(config, train_model)
    state = create_train_state(config, train_model, mesh, initial)
  if init_layout:
    meta['metadata'][INIT_LAYOUT] = init_layout
  # Each example of the stream is a pure function of its position, and a checkpoint records the
  # examples consumed: the stream resumes there whatever the devices, processes, data workers
  # or batch size of the run before.
  train_iter = iter(input_pipeline.train_dataset(train_source, config, start, start_examples,
                                                 mesh.devices.size, info.ignore_id))

  options = step_compiler_options(config, mesh)
  p_train = parallel.distribute(
      functools.partial(train_step, model=train_model,
                        **loss_options(config, info.ignore_id),
                        ema_decay=config.get('ema_decay', 0.0),
                        grad_accum_steps=config.get('grad_accum_steps', 1),
                        frozen=freezing.frozen_by_config(config)),
      mesh, config.parallel, compiler_options=options)
  p_eval = parallel.distribute(
      functools.partial(eval_step, model=eval_model, ignore_id=info.ignore_id,
                        region_sets=regions.config_regions(config)), mesh,
      config.parallel, donate_state=False, compiler_options=options)
  schedule = learning_rate_schedule(config)
  plateau_step = _plateau_stepper(config, schedule, mesh) if config.schedule == 'plateau' else None
  reporter = Reporter(workdir, config.num_train_steps, start, config.batch_size, is_main)
  reporter.message(_run_summary(config, train_model, state, info, mesh, workdir))
  profile = StepProfile(config.get('profile_steps', ()), workdir, is_main, reporter.message)
  if info.name == 'image_folder' or names:  # (elsewhere the values are the classes' ids)
    reporter.message(input_pipeline.class_map_line(info, names))
  if info.name == 'image_folder' and is_main:  # (nnU-Net's dataset.json, where there is one)
    from unet_jax.datasets.image_folder import dataset_json_normalization_warning
    warning = dataset_json_normalization_warning(config.data.root,
                                                 config.data.get('normalize', 'unit'))
    if warning:
      print(warning, file=sys.stderr, flush=True)
  if start:
    reporter.message(f'resumed from {checkpoints.directory}/{start}')
    if start_examples != start * config.batch_size:
      reporter.message(f'batch_size is now {config.batch_size}: the data continues after the '
                       f'{start_examples} examples the checkpoint consumed')
  if start >= config.num_train_steps:
    reporter.message(f'already trained for {start} steps (num_train_steps='
                     f'{config.num_train_steps}); nothing to do')
  elif early.due:
    reporter.message(f'stopped early at step {start} (early_stop_patience='
                     f'{early.patience}); nothing to do')
  end = start if early.due else config.num_train_steps

  eval_metrics: dict[str, float] = {}
  nonfinite_step = 0
  window = _TrainMetrics()
  step = start
  t0 = time.perf_counter()

  def settle(upto: int) -> bool:
    """Reads the non-finite flags of the steps up to `upto`; True if the run must stop."""
    nonlocal nonfinite_step
    for bad in window.read(upto):
      if config.on_nonfinite == 'stop':
        nonfinite_step = bad
        return True
      reporter.message(f'skipped step {bad}: non-finite loss or gradient')
    return False

  try:
    with _stop_on_signals() as stop, quiet_failed_saves():
      for step in range(start + 1, end + 1):
        with profile.step(step):
          state, metrics = p_train(state, next(train_iter))
        profile.after(step, state)
        window.add(step, metrics)
        if step == start + 1 and is_main:
          jax.block_until_ready(metrics)
          reporter.message(f'first step (with compilation) took {time.perf_counter() - t0:.1f}s')
        reporter.step(step)
        last = step == config.num_train_steps
        log = step % config.log_every_steps == 0 or last
        evaluate_now = step % config.eval_every_steps == 0 or last
        # A row, an evaluation or a save must know about this step; otherwise the previous
        # step's flag will do, and this one stays queued on the device meanwhile.
        if settle(step if log or evaluate_now or _save_due(config, step, stop) else step - 1):
          break
        row: dict[str, float] = {}
        if log:
          row.update(window.row())
          row['learning_rate'] = _learning_rate(schedule, state)
          row['images_per_sec'] = reporter.throughput(step)
        saved_metrics = None
        stopping = False
        if evaluate_now:
          eval_metrics = evaluate(p_eval, state, eval_ds, eval_include_background(config))
          saved_metrics = {f'eval_{k}': v for k, v in eval_metrics.items()}
          row.update(saved_metrics)
          if plateau_step is not None:
            state, old_rate, new_rate = plateau_step(state, eval_metrics['dice'])
            if new_rate != old_rate:
              reporter.message(
                  'eval Dice has not improved for more than '
                  f'{_evaluations(config.plateau.patience)}: learning rate {old_rate:.6g} -> '
                  f'{new_rate:.6g}')
          stopping = early.update(eval_metrics['dice'])
          if is_main and config.num_sample_images:
            reporter.samples(step, *_sample_predictions(config, eval_model, state, eval_source,
                                                        info.ignore_id),
                             num_classes=regions.label_count(config), colours=sample_colours)
        reporter.write(step, row)
        if _save_due(config, step, stop) or stopping:
          if settle(step):  # (a signal may have come since the check above)
            break
          seen = start_examples + (step - start) * config.batch_size
          checkpoints.save(step, state, dict(meta, early_stop=early.state(), examples_seen=seen),
                           saved_metrics)
        if stopping:
          reporter.message(f'eval Dice has not improved on {early.best:.4f} for '
                           f'{_evaluations(early.patience)}: stopped early at step {step}')
          break
        if stop['signal']:
          reporter.message(f'{stop["signal"]}: saved step {step} to {checkpoints.directory}; '
                           'rerun the same command to resume')
          break
      checkpoints.wait()
      profile.close()  # (a run stopped inside the profiled steps)
  except Exception as e:
    full = disk_error(e)
    if full is None:
      raise
    reporter.close()
    raise UserError(f'{workdir}: cannot write ({full}); the last complete checkpoint in '
                    f'{checkpoints.directory} is kept, an unfinished one is never used; free '
                    'space (or choose another --workdir) and rerun to resume') from None
  best = checkpoints.best_step()
  checkpoints.close()
  input_pipeline.close_train_iterator(train_iter)
  reporter.close()
  if nonfinite_step:
    raise UserError(f'non-finite loss or gradient at step {nonfinite_step}; its update was not '
                    f'applied and the last good checkpoint is kept in {checkpoints.directory} '
                    "(set --config.on_nonfinite=skip to skip such steps)")
  if is_main and (step >= config.num_train_steps or early.due):
    if eval_metrics:  # (the last evaluation's scores, a row per class with several)
      print(f'eval at step {step}: ' + score_lines(eval_metrics, names or regions.region_labels(
          regions.config_regions(config) or ())), end='')
    print(f'checkpoint: {checkpoints.directory}/{step}\n'
          f'load it with: model, variables = unet_jax.load_pretrained({workdir!r})', flush=True)
    if best is not None and best != step:
      print(f'best by eval Dice: step {best}, as {checkpoints.directory}/best', flush=True)
  return eval_metrics

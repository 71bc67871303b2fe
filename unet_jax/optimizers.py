"""The learning-rate schedule and the optimizer, each with PyTorch's semantics.

A recipe written for PyTorch gives the same updates here (tested against `torch.optim` with
`clip_grad_norm_`): `weight_decay` is added to the gradient (L2, as `torch.optim.Adam`, `SGD`
and `RMSprop` do) except for `adamw`, which decays the weights directly, as `AdamW` does;
`grad_clip_norm` scales the gradient as `torch.nn.utils.clip_grad_norm_` does, before the
optimizer sees it. milesial/Pytorch-UNet's recipe, for instance: optimizer='rmsprop',
momentum=0.999, weight_decay=1e-8, grad_clip_norm=1.0, schedule='plateau' with patience 5;
nnU-Net's: optimizer='sgd', momentum=0.99, nesterov=True, weight_decay=3e-5,
learning_rate=1e-2, schedule='poly' (power 0.9, poly_every_steps=250: once per epoch).

schedule='plateau' is `torch.optim.lr_scheduler.ReduceLROnPlateau(mode='max')` on the eval Dice:
the loop calls `plateau_update` after each evaluation, as milesial's loop calls
`scheduler.step(val_score)`. Its state (the rate's factor so far, the best Dice, the counters)
lives in the optimizer state, so checkpoints carry it and a resumed run goes on exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unet_jax.errors import UserError
from unet_jax.freezing import frozen_by_config, grouped_optimizer, lr_multipliers

OPTIMIZERS = ('adam', 'adamw', 'sgd', 'rmsprop')
SCHEDULES = ('cosine', 'constant', 'plateau', 'poly')
COSINE_WARMUP = 50  # warmup_steps=-1's steps for cosine (the others: none)
_PLATEAU_EPS = 1e-8  # ReduceLROnPlateau's eps: a smaller change of the rate is not made


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  """The steps of linear warmup from 0: `warmup_steps`, or where it is -1 the schedule's own:
  50 for cosine, none for the others (torch's PolynomialLR, nnU-Net's poly and milesial's
  plateau have none)."""
  steps = config.get('warmup_steps', -1)
  return steps if steps >= 0 else (COSINE_WARMUP if config.schedule == 'cosine' else 0)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  if config.schedule not in SCHEDULES:
    raise UserError(f'unknown schedule {config.schedule!r}; use one of {", ".join(SCHEDULES)}')
  total = config.num_train_steps
  if config.schedule == 'cosine':
    # Warmup leaves at least one step of decay, and optax wants both phases non-empty: a run
    # shorter than its warmup (a one-step smoke test) gets a one-step warmup.
    warmup = max(min(warmup_steps(config), total - 1), 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(total, warmup + 1),
        end_value=config.learning_rate * 0.01)
  # The others after their warmup (at most all steps but the last): torch's
  # SequentialLR([LinearLR, then the schedule], milestones=[warmup]), as mmsegmentation warms
  # up its poly schedule; poly then decays over the steps left.
  warmup = min(warmup_steps(config), total - 1)
  if config.schedule in ('constant', 'plateau'):  # (plateau: scaled by PlateauState.lr_scale)
    after = optax.constant_schedule(config.learning_rate)
  else:
    # torch's PolynomialLR(total_iters=num_train_steps, power) and nnU-Net's PolyLRScheduler
    # (power 0.9): step t's rate is learning_rate * (1 - t / num_train_steps) ** power, from
    # the full rate at the first step down towards 0 at the end.
    after = optax.polynomial_schedule(config.learning_rate, 0.0, config.get('poly_power', 0.9),
                                      total - warmup)
    every = config.get('poly_every_steps', 1)
    if every > 1:  # (nnU-Net lowers its rate once per epoch of 250 steps, at the epoch's start)
      after = _held(after, every)
  if warmup <= 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup), after], [warmup])


def _held(schedule: optax.Schedule, every: int) -> optax.Schedule:
  """`schedule` updated every `every` steps: step t trains at the rate of step t - t % every."""
  return lambda step: schedule(step - step % every)


class PlateauState(NamedTuple):
  """ReduceLROnPlateau's state. All updates are scaled by `lr_scale`, which equals scaling the
  learning rate for every optimizer here: each applies the rate last, as a factor."""
  lr_scale: jax.Array   # the rate's factor so far (1, then factor, factor**2, ...)
  best: jax.Array       # the best eval Dice so far (-inf before the first evaluation)
  bad_evals: jax.Array  # evaluations since the last improvement
  cooldown: jax.Array   # evaluations left before bad ones count again


def scale_by_plateau() -> optax.GradientTransformation:
  def init(params):
    del params
    return PlateauState(jnp.ones([], jnp.float32), jnp.full([], -jnp.inf, jnp.float32),
                        jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


def plateau_update(config: ml_collections.ConfigDict
                   ) -> Callable[[PlateauState, jax.Array], PlateauState]:
  """`ReduceLROnPlateau.step(metric)` with mode='max', threshold_mode='rel', on a PlateauState."""
  lr, p = config.learning_rate, config.plateau

  def update(s: PlateauState, metric: jax.Array) -> PlateauState:
    metric = jnp.asarray(metric, jnp.float32)
    better = metric > s.best * (1 + p.threshold)  # (a NaN is never better)
    best = jnp.where(better, metric, s.best)
    bad = jnp.where(better, 0, s.bad_evals + 1)
    in_cooldown = s.cooldown > 0
    cooldown = jnp.where(in_cooldown, s.cooldown - 1, s.cooldown)
    bad = jnp.where(in_cooldown, 0, bad)  # bad evaluations in the cooldown do not count
    reduce = bad > p.patience
    new_scale = jnp.maximum(s.lr_scale * p.factor, p.min_learning_rate / lr)
    changed = reduce & (lr * (s.lr_scale - new_scale) > _PLATEAU_EPS)
    return PlateauState(jnp.where(changed, new_scale, s.lr_scale), best,
                        jnp.where(reduce, 0, bad).astype(jnp.int32),
                        jnp.where(reduce, p.cooldown, cooldown).astype(jnp.int32))

  return update


def _is_plateau(x: Any) -> bool:
  return isinstance(x, PlateauState)


def find_plateau_state(opt_state: Any) -> PlateauState | None:
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_plateau) if _is_plateau(x)]
  return found[0] if found else None


def replace_plateau_state(opt_state: Any, new: PlateauState) -> Any:
  return jax.tree.map(lambda x: new if _is_plateau(x) else x, opt_state, is_leaf=_is_plateau)


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
  """`torch.nn.utils.clip_grad_norm_`: scales by min(1, max_norm / (global norm + 1e-6)).

  (optax.clip_by_global_norm divides by the norm itself, without the 1e-6.)"""

  def update(updates, state, params=None):
    del params
    coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  lr = learning_rate_schedule(config)
  name, wd = config.optimizer, config.weight_decay
  momentum = config.get('momentum', 0.9)
  if name == 'adam':
    core = optax.adam(lr)
  elif name == 'adamw':
    core = optax.adamw(lr, weight_decay=wd)
  elif name == 'sgd':
    # nesterov: torch's SGD(nesterov=True) steps along g + momentum * buffer, as optax's does.
    core = optax.sgd(lr, momentum=momentum or None, nesterov=config.get('nesterov', False))
  elif name == 'rmsprop':
    # torch.optim.RMSprop: eps outside the square root, and the momentum buffer accumulates
    # g / (sqrt(avg) + eps) before the learning rate scales it (optax.rmsprop scales first,
    # which differs once the rate changes).
    core = optax.chain(optax.scale_by_rms(decay=0.99, eps=1e-8, eps_in_sqrt=False),
                       optax.trace(decay=momentum) if momentum else optax.identity(),
                       optax.scale_by_learning_rate(lr))
  else:
    raise UserError(f'unknown optimizer {name!r}; use one of {", ".join(OPTIMIZERS)}')
  clip = [clip_grad_norm(config.grad_clip_norm)] if config.get('grad_clip_norm', 0.0) else []
  # L2: torch adds wd * param to the gradient
  decay = [optax.add_decayed_weights(wd)] if wd and name != 'adamw' else []
  plateau = [scale_by_plateau()] if config.schedule == 'plateau' else []
  frozen, groups = frozen_by_config(config), lr_multipliers(config)
  if frozen or groups:
    # torch's parameter groups: each group's updates at its multiple of the rate (each
    # optimizer here applies the rate last, as a factor), the clipping over all of them (a
    # frozen module's gradient, which torch's requires_grad_(False) leaves out, is 0 there)
    return grouped_optimizer(
        clip, lambda m: optax.chain(*decay, core, *plateau,
                                    *([optax.scale(m)] if m != 1 else [])), frozen, groups)
  parts = clip + decay
  if plateau:
    return optax.chain(*parts, core, *plateau)
  return optax.chain(*parts, core) if parts else core

"""The optimizers and schedules against torch.optim, clip_grad_norm_ and ReduceLROnPlateau,
step by step, float32."""

import numpy as np
import optax
import pytest
import torch

from configs import base
from unet_jax.optimizers import (
  find_plateau_state,
  learning_rate_schedule,
  make_optimizer,
  plateau_update,
  replace_plateau_state,
)

STEP_TOL = 2e-6  # per tensor, relative to its scale, after each step

CASES = [
    dict(optimizer='adam'),
    dict(optimizer='adam', weight_decay=0.1, grad_clip_norm=0.5),
    dict(optimizer='adamw', weight_decay=0.1),
    dict(optimizer='sgd', weight_decay=0.01),
    dict(optimizer='sgd', momentum=0.0, grad_clip_norm=0.5),
    # nnU-Net's recipe (its poly schedule is tested on its own below).
    dict(optimizer='sgd', momentum=0.99, nesterov=True, weight_decay=3e-5, schedule='poly'),
    dict(optimizer='rmsprop', momentum=0.999, weight_decay=1e-8, grad_clip_norm=1.0),  # milesial
    dict(optimizer='rmsprop', momentum=0.0),
    # The rate lowered on plateaus: milesial's whole recipe, and decoupled decay under it.
    dict(optimizer='rmsprop', momentum=0.999, weight_decay=1e-8, grad_clip_norm=1.0,
         schedule='plateau', **{'plateau.patience': 1}),
    dict(optimizer='adamw', weight_decay=0.1, schedule='plateau', **{'plateau.patience': 0}),
    dict(optimizer='sgd', weight_decay=0.01, schedule='plateau', **{'plateau.patience': 0}),
]
# An eval Dice per step for the plateau cases: up, flat, a gain below the 1e-4 threshold, up.
METRICS = [0.2, 0.4, 0.4, 0.4, 0.40001, 0.5, 0.5, 0.6]


def _config(**overrides):
  config = base.get_config()
  config.num_train_steps, config.learning_rate = 8, 1e-2
  # (cosine's warmup shortened, so that its rate changes at every step; the others' own: none)
  config.warmup_steps = 3 if overrides.get('schedule', 'cosine') == 'cosine' else -1
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def _torch_optimizer(config, params):
  lr, wd, m = config.learning_rate, config.weight_decay, config.momentum
  return {'adam': lambda: torch.optim.Adam(params, lr=lr, weight_decay=wd),
          'adamw': lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
          'sgd': lambda: torch.optim.SGD(params, lr=lr, momentum=m, weight_decay=wd,
                                         nesterov=config.nesterov),
          'rmsprop': lambda: torch.optim.RMSprop(params, lr=lr, momentum=m, weight_decay=wd),
          }[config.optimizer]()


@pytest.mark.parametrize('overrides', CASES, ids=lambda c: '-'.join(f'{k}={v}' for k, v in
                                                                    c.items()))
def test_optimizer_steps_match_torch(overrides):
  # The cosine schedule with warmup changes the rate at every step, as a run's does.
  config = _config(**overrides)
  rng = np.random.default_rng(0)
  params = {'w': rng.standard_normal((3, 3, 4, 8), np.float32),
            'b': rng.standard_normal((8,), np.float32)}
  torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
  torch_opt = _torch_optimizer(config, list(torch_params.values()))
  schedule = learning_rate_schedule(config)
  tx = make_optimizer(config)
  state = tx.init(params)
  plateau = config.schedule == 'plateau'
  if plateau:
    torch_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch_opt, 'max', patience=config.plateau.patience)
    update_plateau = plateau_update(config)
  for step in range(config.num_train_steps):
    # Gradients now above, now below the clipping norm.
    grads = {k: rng.standard_normal(v.shape, np.float32) * (0.02 if step % 2 else 1.0)
             for k, v in params.items()}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for group in torch_opt.param_groups:
      if not plateau:  # (ReduceLROnPlateau sets it)
        group['lr'] = float(schedule(step))
    for k, p in torch_params.items():
      p.grad = torch.from_numpy(grads[k].copy())
    if config.grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(list(torch_params.values()), config.grad_clip_norm)
    torch_opt.step()
    for k, p in torch_params.items():
      want = p.detach().numpy()
      err = np.abs(np.asarray(params[k]) - want).max() / np.abs(want).max()
      assert err <= STEP_TOL, (step, k, err)
    if plateau:
      torch_plateau.step(METRICS[step])
      state = replace_plateau_state(
          state, update_plateau(find_plateau_state(state), METRICS[step]))
  if plateau:  # the rate did come down
    assert torch_opt.param_groups[0]['lr'] < config.learning_rate


PLATEAU_CASES = [
    dict(),  # torch's defaults
    dict(patience=2, cooldown=2),
    dict(patience=0, factor=0.5, threshold=0.05, min_learning_rate=1.5e-3),
    dict(patience=1, factor=0.1),  # down to where a change would be below eps (1e-8)
]


@pytest.mark.parametrize('plateau', PLATEAU_CASES, ids=lambda c: '-'.join(
    f'{k}={v}' for k, v in c.items()) or 'defaults')
def test_plateau_schedule_matches_reduce_lr_on_plateau(plateau):
  config = _config(schedule='plateau', learning_rate=1e-2,
                   **{f'plateau.{k}': v for k, v in plateau.items()})
  rng = np.random.default_rng(0)
  # Gains, a long plateau, noise, a NaN, gains below and above the threshold, a long decline.
  metrics = np.concatenate([np.linspace(0.1, 0.5, 5), np.full(13, 0.5),
                            0.45 + 0.1 * rng.random(10), [np.nan],
                            [0.56, 0.56002, 0.7, 0.7 * 1.01, 0.75], np.linspace(0.7, 0.1, 30)])
  p = config.plateau
  torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
  torch_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
      torch_opt, 'max', factor=p.factor, patience=p.patience, threshold=p.threshold,
      cooldown=p.cooldown, min_lr=p.min_learning_rate)
  update = plateau_update(config)
  state = find_plateau_state(make_optimizer(config).init({'w': np.zeros(1, np.float32)}))
  want, got = [], []
  for metric in metrics:
    torch_plateau.step(float(metric))
    state = update(state, metric)
    want.append(torch_opt.param_groups[0]['lr'])
    got.append(config.learning_rate * float(state.lr_scale))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert len(set(want)) >= 3  # (the sequence did lower the rate, more than once)

@pytest.mark.parametrize('power,steps', [(0.9, 12), (1.0, 7), (2.0, 1), (0.9, 1000)])
def test_poly_schedule_matches_polynomial_lr(power, steps):
  # torch's PolynomialLR stepped once per optimizer step, as a loop does; and nnU-Net's
  # PolyLRScheduler, whose rate at step t is initial_lr * (1 - t / max_steps) ** exponent.
  config = _config(schedule='poly', poly_power=power, num_train_steps=steps, learning_rate=1e-2)
  schedule = learning_rate_schedule(config)
  torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
  torch_poly = torch.optim.lr_scheduler.PolynomialLR(torch_opt, total_iters=steps, power=power)
  got, want = [], []
  for t in range(steps + 1):
    got.append(float(schedule(t)))
    want.append(torch_opt.param_groups[0]['lr'])
    nnunet = config.learning_rate * (1 - t / steps) ** power
    assert got[-1] == pytest.approx(nnunet, rel=1e-5, abs=1e-9), t
    torch_opt.step()
    torch_poly.step()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  assert got[0] == pytest.approx(1e-2) and got[-1] == 0.0


@pytest.mark.parametrize('every,steps', [(250, 1000), (3, 12), (4, 10)])
def test_poly_held_for_an_epoch_as_nnunet(every, steps):
  # nnU-Net's PolyLRScheduler steps once per epoch (of 250 steps), at its start: epoch e
  # trains at initial_lr * (1 - e / epochs) ** 0.9; torch's PolynomialLR stepped every `every`
  # steps gives the same (steps not a multiple of every: the last, shorter epoch too).
  config = _config(schedule='poly', poly_every_steps=every, num_train_steps=steps)
  schedule = learning_rate_schedule(config)
  torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
  torch_poly = torch.optim.lr_scheduler.PolynomialLR(torch_opt, total_iters=steps / every,
                                                     power=0.9)
  got, want = [], []
  for t in range(steps):
    got.append(float(schedule(t)))
    want.append(torch_opt.param_groups[0]['lr'])
    torch_opt.step()
    if (t + 1) % every == 0:
      torch_poly.step()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(
      got, [1e-2 * (1 - (t // every) / (steps / every)) ** 0.9 for t in range(steps)],
      rtol=1e-5, atol=1e-9)
  assert len(set(got)) == -(-steps // every)  # (held within each epoch)


@pytest.mark.parametrize('kind,warmup,steps', [
    ('poly', 3, 12), ('poly', 20, 1000), ('poly', 12, 12), ('constant', 5, 10),
    ('plateau', 4, 9), ('poly', 0, 7)])
def test_warmup_before_poly_and_constant_matches_torchs_sequential_lr(kind, warmup, steps):
  # torch's SequentialLR([LinearLR(start_factor ~ 0), the schedule], milestones=[warmup]), as
  # a PyTorch recipe warms up its poly (mmsegmentation's) or constant rate; warmup at most all
  # steps but the last, and poly decays over the steps left after it.
  config = _config(schedule=kind, warmup_steps=warmup, num_train_steps=steps)
  schedule = learning_rate_schedule(config)
  torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
  lr_scheduler = torch.optim.lr_scheduler
  warm = min(warmup, steps - 1)
  after = (lr_scheduler.PolynomialLR(torch_opt, total_iters=steps - warm, power=0.9)
           if kind == 'poly' else lr_scheduler.ConstantLR(torch_opt, factor=1.0, total_iters=0))
  torch_schedule = (lr_scheduler.SequentialLR(torch_opt, [lr_scheduler.LinearLR(
      torch_opt, start_factor=1e-12, total_iters=warm), after], milestones=[warm])
      if warm else after)
  got, want = [], []
  for t in range(steps):
    got.append(float(schedule(t)))
    want.append(torch_opt.param_groups[0]['lr'])
    torch_opt.step()
    torch_schedule.step()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)  # (torch's poly: a product)
  formula = [1e-2 * (t / warm if t < warm else (1 - (t - warm) / (steps - warm)) ** 0.9
                     if kind == 'poly' else 1) for t in range(steps)]
  np.testing.assert_allclose(got, formula, rtol=1e-5, atol=1e-9)  # (float32 near 0)
  if warm:
    assert got[0] == 0.0 and got[warm] == pytest.approx(1e-2) and got[warm - 1] < 1e-2
  else:
    assert got[0] == pytest.approx(1e-2)


@pytest.mark.parametrize('steps', [1, 2, 3, 50, 51, 500])
def test_cosine_schedule_fits_runs_shorter_than_its_warmup(steps):
  # Default warmup is 50 steps; a one-step smoke run once raised inside optax (empty decay).
  config = base.get_config()
  config.num_train_steps, config.warmup_steps, config.learning_rate = steps, 50, 1e-3
  schedule = learning_rate_schedule(config)
  rates = np.array([float(schedule(s)) for s in range(steps + 1)])
  config.warmup_steps = -1  # (the default: cosine's own 50)
  assert [float(learning_rate_schedule(config)(s)) for s in range(steps + 1)] == rates.tolist()
  assert np.all(np.isfinite(rates)) and rates[0] == 0.0 and rates.max() <= np.float32(1e-3)
  if steps > 50:
    assert rates[50] == pytest.approx(1e-3) and rates[-1] < 1e-4

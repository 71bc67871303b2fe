"""The optimizers and schedule against torch.optim and clip_grad_norm_, step by step, float32."""

import numpy as np
import optax
import pytest
import torch

from configs import base
from unet_jax.optimizers import learning_rate_schedule, make_optimizer

STEP_TOL = 2e-6  # per tensor, relative to its scale, after each step

CASES = [
    dict(optimizer='adam'),
    dict(optimizer='adam', weight_decay=0.1, grad_clip_norm=0.5),
    dict(optimizer='adamw', weight_decay=0.1),
    dict(optimizer='sgd', weight_decay=0.01),
    dict(optimizer='sgd', momentum=0.0, grad_clip_norm=0.5),
    dict(optimizer='rmsprop', momentum=0.999, weight_decay=1e-8, grad_clip_norm=1.0),  # milesial
    dict(optimizer='rmsprop', momentum=0.0),
]


def _config(**overrides):
  config = base.get_config()
  config.num_train_steps, config.warmup_steps, config.learning_rate = 8, 3, 1e-2
  config.update(overrides)
  return config


def _torch_optimizer(config, params):
  lr, wd, m = config.learning_rate, config.weight_decay, config.momentum
  return {'adam': lambda: torch.optim.Adam(params, lr=lr, weight_decay=wd),
          'adamw': lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
          'sgd': lambda: torch.optim.SGD(params, lr=lr, momentum=m, weight_decay=wd),
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
  for step in range(config.num_train_steps):
    # Gradients now above, now below the clipping norm.
    grads = {k: rng.standard_normal(v.shape, np.float32) * (0.02 if step % 2 else 1.0)
             for k, v in params.items()}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for group in torch_opt.param_groups:
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


@pytest.mark.parametrize('steps', [1, 2, 3, 50, 51, 500])
def test_cosine_schedule_fits_runs_shorter_than_its_warmup(steps):
  # Default warmup is 50 steps; a one-step smoke run once raised inside optax (empty decay).
  config = base.get_config()
  config.num_train_steps, config.warmup_steps, config.learning_rate = steps, 50, 1e-3
  schedule = learning_rate_schedule(config)
  rates = np.array([float(schedule(s)) for s in range(steps + 1)])
  assert np.all(np.isfinite(rates)) and rates[0] == 0.0 and rates.max() <= np.float32(1e-3)
  if steps > 50:
    assert rates[50] == pytest.approx(1e-3) and rates[-1] < 1e-4

"""The learning-rate schedule and the optimizer, each with PyTorch's semantics.

A recipe written for PyTorch gives the same updates here (tested against `torch.optim` with
`clip_grad_norm_`): `weight_decay` is added to the gradient (L2, as `torch.optim.Adam`, `SGD`
and `RMSprop` do) except for `adamw`, which decays the weights directly, as `AdamW` does;
`grad_clip_norm` scales the gradient as `torch.nn.utils.clip_grad_norm_` does, before the
optimizer sees it. milesial/Pytorch-UNet's recipe, for instance: optimizer='rmsprop',
momentum=0.999, weight_decay=1e-8, grad_clip_norm=1.0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unet_jax.errors import UserError

OPTIMIZERS = ('adam', 'adamw', 'sgd', 'rmsprop')


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  if config.schedule == 'constant':
    return optax.constant_schedule(config.learning_rate)
  if config.schedule == 'cosine':
    # Warmup leaves at least one step of decay, and optax wants both phases non-empty: a run
    # shorter than its warmup (a one-step smoke test) gets a one-step warmup.
    warmup = max(min(config.warmup_steps, config.num_train_steps - 1), 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(config.num_train_steps, warmup + 1),
        end_value=config.learning_rate * 0.01)
  raise UserError(f"unknown schedule {config.schedule!r}; use 'cosine' or 'constant'")


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
    core = optax.sgd(lr, momentum=momentum or None)
  elif name == 'rmsprop':
    # torch.optim.RMSprop: eps outside the square root, and the momentum buffer accumulates
    # g / (sqrt(avg) + eps) before the learning rate scales it (optax.rmsprop scales first,
    # which differs once the rate changes).
    core = optax.chain(optax.scale_by_rms(decay=0.99, eps=1e-8, eps_in_sqrt=False),
                       optax.trace(decay=momentum) if momentum else optax.identity(),
                       optax.scale_by_learning_rate(lr))
  else:
    raise UserError(f'unknown optimizer {name!r}; use one of {", ".join(OPTIMIZERS)}')
  parts = []
  if config.get('grad_clip_norm', 0.0):
    parts.append(clip_grad_norm(config.grad_clip_norm))
  if wd and name != 'adamw':
    parts.append(optax.add_decayed_weights(wd))  # L2: torch adds wd * param to the gradient
  return optax.chain(*parts, core) if parts else core

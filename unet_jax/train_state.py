"""The train state: its form (with or without a moving average of the weights) and how a run
makes its first one, replicated over the devices."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state as flax_train_state

from unet_jax import parallel
from unet_jax.model import UNet, init_variables
from unet_jax.optimizers import make_optimizer
from unet_jax.step_compilation import compile_per_signature, init_compiler_options


class TrainState(flax_train_state.TrainState):
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
  return UNet(**config.model.to_dict(), dtype=dtype, axis_name=axis_name)


def create_train_state(config: ml_collections.ConfigDict, model: UNet, mesh: jax.sharding.Mesh,
                       initial: dict[str, Any] | None = None) -> TrainState:
  """Initialises replicated over `mesh`; shapes come from eval_shape, nothing is built twice.

  `initial`: variables to start from (`config.init_from`) instead of a random draw; the
  optimizer state is new either way."""
  tx = make_optimizer(config)

  def init(rng, initial):
    # outside any mapped axis, on the smallest input
    variables = init_variables(model, rng) if initial is None else initial
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

"""Data parallelism: a 1-D `data` mesh, per-device step wrappers, multi-process start-up.

The train and eval steps are written once, as per-device code that binds the axis name `data`
(gradients, metrics and BatchNorm statistics are averaged over it). `distribute` runs that code
either under `jax.shard_map` over the mesh (default) or under `jax.pmap`; both give the same
numbers as one device with the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unet_jax.errors import UserError
from unet_jax.step_compilation import compile_per_signature

AXIS = 'data'


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-process run (no-op for a single process)."""
  if not coordinator_address and not num_processes:
    return
  if not (coordinator_address and num_processes and process_id is not None):
    raise UserError('multi-process runs need all of --coordinator_address, --num_processes and '
                    '--process_id')
  # CPU devices of different processes talk over gloo; the setting does not touch GPU/TPU.
  # (Nothing here may query the backend before initialize: that would start it single-process.)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(devices: list | None = None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = 'batch_size') -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise UserError(f'{what}={global_batch} is not divisible by the {n} devices; use a multiple '
                    f'of {n} (e.g. --config.{what}={max(n, global_batch // n * n)})')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays split over the `data` axis."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def _one_program_in_flight() -> bool:
  """Whether each distributed step is waited for before the next is dispatched: across
  processes on CPU.

  Seen with jax 0.10.2 over gloo: the 2-process test run hung in evaluation in 5 of about 30
  runs (2 of 4 with a busy loop beside it), one device of a process waiting in a gloo all-reduce
  while the process's other device waited to launch its share, several eval programs in flight.
  Waiting for each program: none of 18 runs with the busy loop hung. On CPU running ahead gains
  little."""
  return jax.process_count() > 1 and jax.default_backend() == 'cpu'


def distribute(per_device_fn: Callable, mesh: Mesh, kind: str = 'shard_map',
               donate_state: bool = True, compiler_options: dict[str, Any] | None = None
               ) -> Callable[[Any, dict[str, np.ndarray]], Any]:
  """Wraps `per_device_fn(state, batch) -> (state, metrics)` for all devices of `mesh`.

  The returned function takes the state (replicated; donated by default) and this process's
  slice of the global batch as numpy arrays; everything it returns is replicated. It is compiled
  ahead of time per input signature with `compiler_options` (see step_compilation.py). Across
  processes on CPU each call returns once its result is ready (_one_program_in_flight).
  """
  call = _distribute(per_device_fn, mesh, kind, donate_state, compiler_options)
  if _one_program_in_flight():
    return lambda state, local_batch: jax.block_until_ready(call(state, local_batch))
  return call


def _distribute(per_device_fn: Callable, mesh: Mesh, kind: str, donate_state: bool,
                compiler_options: dict[str, Any] | None) -> Callable[[Any, Any], Any]:
  donate = (0,) if donate_state else ()
  if kind == 'shard_map':
    # check_vma=False: per-device gradients stay per-device and the step averages them with an
    # explicit pmean, exactly as under pmap. (With vma checking, the gradient with respect to a
    # replicated input comes back already summed over the axis.)
    mapped = jax.shard_map(per_device_fn, mesh=mesh, in_specs=(P(), P(AXIS)),
                           out_specs=P(), check_vma=False)
    jitted = compile_per_signature(
        jax.jit(mapped, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                out_shardings=replicated(mesh), donate_argnums=donate), compiler_options or {})
    return lambda state, local_batch: jitted(state, to_global(local_batch, mesh))
  if kind == 'pmap':
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    pmapped = compile_per_signature(
        jax.pmap(per_device_fn, axis_name=AXIS, in_axes=(None, 0), out_axes=None,
                 devices=local, donate_argnums=donate), compiler_options or {})

    def split(x: np.ndarray) -> np.ndarray:  # (local batch, ...) -> (devices, per device, ...)
      x = np.asarray(x)
      return x.reshape((len(local), x.shape[0] // len(local)) + x.shape[1:])

    return lambda state, local_batch: pmapped(state, jax.tree.map(split, local_batch))
  raise UserError(f"unknown parallel mode {kind!r}; use 'shard_map' or 'pmap'")

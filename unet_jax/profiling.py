"""A profile of chosen training steps (config.profile_steps), as JAX's profiler records it.

The trace lands where TensorBoard's profile plugin looks, WORKDIR/plugins/profile/RUN/ (the
workdir is already the run's TensorBoard logdir): `*.xplane.pb` for its Profile tab
(`pip install tensorboard-plugin-profile`), and `*.trace.json.gz`, which Perfetto
(ui.perfetto.dev) opens without installing anything. Each traced step is annotated with its
number (`StepTraceAnnotation`), so the tools show where each step begins and ends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from unet_jax.errors import UserError


def check_profile_steps(steps: Sequence[int], num_train_steps: int | None) -> None:
  """config.profile_steps: () or (first, last), steps of the run, first <= last
  (num_train_steps None: not known yet, for num_epochs)."""
  steps = tuple(steps)
  if not steps:
    return
  if not (len(steps) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
          and 1 <= steps[0] <= steps[1] <= (num_train_steps or steps[1])):
    bound = f' <= num_train_steps={num_train_steps}' if num_train_steps else ''
    raise UserError(f'profile_steps={steps} must be (first, last), steps of the run with 1 <= '
                    f'first <= last{bound}, e.g. '
                    "--config.profile_steps='(10,12)' (after the first step's compilation); () "
                    'for none')


class StepProfile:
  """Traces steps first..last of a run (those this run takes: a resumed run may start inside
  or after them), on the main process only: several processes of one host would write the
  same file names. `message` reports where the trace went."""

  def __init__(self, steps: Sequence[int], workdir: str, enabled: bool,
               message: Callable[[str], None]):
    self._first, self._last = tuple(steps) or (0, -1)
    self._workdir, self._enabled, self._message = workdir, enabled, message
    self._traced: list[int] = []  # the steps in the trace so far

  @contextlib.contextmanager
  def step(self, step: int) -> Iterator[None]:
    """Around one step's dispatch: starts the trace at its first step, annotates the step."""
    if not self._enabled or not self._first <= step <= self._last:
      yield
      return
    if not self._traced:
      jax.profiler.start_trace(self._workdir)
    self._traced.append(step)
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      yield

  def after(self, step: int, state: Any) -> None:
    """After a step: at the last traced one, waits for its work and ends the trace."""
    if self._traced and step == self._last:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    """Ends a trace still running (a run stopped inside the range); says where it went."""
    if not self._traced:
      return
    jax.profiler.stop_trace()
    first, last = self._traced[0], self._traced[-1]
    what = f'step {first}' if first == last else f'steps {first}-{last}'
    self._message(f'profiled {what} into {os.path.join(self._workdir, "plugins", "profile")}: '
                  f'tensorboard --logdir {self._workdir} (its Profile tab), or its '
                  '.trace.json.gz at ui.perfetto.dev')
    self._traced = []

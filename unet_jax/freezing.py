"""Frozen layers for fine-tuning (`config.freeze`): the UNet's top-level modules that a run
leaves as they are, as torch's `module.requires_grad_(False)` leaves them.

What torch does to a parameter without a gradient, the run does to a frozen one: the optimizer
skips it (no update, no weight decay, no state), `clip_grad_norm_` leaves it out of the norm,
and BatchNorm's running statistics still update in train mode (requires_grad concerns the
parameters; `module.eval()` is another switch: config.freeze_batch_norm, the UNet's
`eval_norms`). The step differentiates the
loss with respect to the trained modules alone, so the backward pass of a frozen encoder, which
nothing trained needs, is never built: the step is cheaper, not only the update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optax

from unet_jax.errors import UserError
from unet_jax.model import DEEP_SUPERVISION_HEAD

# Names for groups of modules, as segmentation_models_pytorch's model.encoder and model.decoder.
GROUPS = {
    'encoder': lambda name: name == 'in_conv' or name.startswith('down'),
    'decoder': lambda name: name.startswith('up') or name.startswith(DEEP_SUPERVISION_HEAD),
}


def module_names(depth: int, deep_supervision: bool = False) -> list[str]:
  """The UNet's top-level modules, in order (the seed's names; deep supervision's heads)."""
  names = ['in_conv', *[f'down{k}' for k in range(1, depth + 1)],
           *[f'up{k}' for k in range(1, depth + 1)], 'out_conv']
  if deep_supervision:
    names += [f'{DEEP_SUPERVISION_HEAD}{k}' for k in range(2, depth)]
  return names


def frozen_modules(freeze: Sequence[str], modules: Iterable[str]) -> tuple[str, ...]:
  """The modules of `modules` that `freeze` names (a module's name, or a group: 'encoder',
  'decoder'), in their order; refused by name: an unknown name, or every module frozen."""
  modules = list(modules)
  unknown = [n for n in freeze if n not in GROUPS and n not in modules]
  if unknown:
    raise UserError(f'freeze={tuple(freeze)}: no module {unknown[0]!r} in this UNet; name '
                    f'{", ".join(GROUPS)} or modules of {", ".join(modules)}')
  frozen = tuple(m for m in modules
                 if m in freeze or any(GROUPS[g](m) for g in freeze if g in GROUPS))
  if len(frozen) == len(modules):
    raise UserError(f'freeze={tuple(freeze)} freezes every module: nothing would train; leave '
                    "one out (e.g. --config.freeze=\"('encoder',)\" trains the decoder and "
                    'out_conv)')
  return frozen


def freeze_names(freeze: str | Sequence[str]) -> tuple[str, ...]:
  """`config.freeze` as names: a tuple's, each also split at commas (the command line's
  --config.freeze=encoder,up1 arrives as one string)."""
  values = (freeze,) if isinstance(freeze, str) else tuple(freeze)
  return tuple(n.strip() for v in values for n in str(v).split(',') if n.strip())


def frozen_by_config(config: Any) -> tuple[str, ...]:
  """The modules `config.freeze` freezes in `config.model`'s UNet (checked: frozen_modules,
  and freeze_batch_norm only with some)."""
  if config.get('freeze_batch_norm', False) and not freeze_names(config.get('freeze', ())):
    raise UserError('freeze_batch_norm=True keeps the BatchNorms of the frozen modules in '
                    "evaluation mode, but freeze names none; set --config.freeze (e.g. "
                    "encoder), or leave freeze_batch_norm off")
  return frozen_modules(freeze_names(config.get('freeze', ())),
                        module_names(config.model.depth,
                                     config.model.get('deep_supervision', False)))


def split(params: Mapping[str, Any], frozen: Sequence[str]) -> tuple[dict, dict]:
  """(the trained modules' parameters, the frozen ones')."""
  return ({k: v for k, v in params.items() if k not in frozen},
          {k: v for k, v in params.items() if k in frozen})


def masked_optimizer(tx: optax.GradientTransformation, freeze: Sequence[str]
                     ) -> optax.GradientTransformation:
  """`tx` on the parameters of the modules `freeze` leaves trained (its state, clipping norm and
  weight decay theirs alone), updates of 0 for the frozen ones."""

  def labels(params: Mapping[str, Any]) -> dict[str, str]:
    frozen = frozen_modules(freeze, params)
    return {k: 'frozen' if k in frozen else 'trained' for k in params}

  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)

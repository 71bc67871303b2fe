"""Fine-tuning's per-module choices: frozen layers (`config.freeze`), the UNet's top-level
modules that a run leaves as they are, as torch's `module.requires_grad_(False)` leaves them,
and learning rates per module (`config.lr_multipliers`, torch's parameter groups).

What torch does to a parameter without a gradient, the run does to a frozen one: the optimizer
skips it (no update, no weight decay, no state), `clip_grad_norm_` leaves it out of the norm,
and BatchNorm's running statistics still update in train mode (requires_grad concerns the
parameters; `module.eval()` is another switch: config.freeze_batch_norm, the UNet's
`eval_norms`). The step differentiates the loss with respect to the trained modules alone, so
the backward pass of a frozen encoder, which nothing trained needs, is never built: the step is
cheaper, not only the update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
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


def named_modules(names: Sequence[str], modules: Iterable[str], field: str = 'freeze',
                  ) -> tuple[str, ...]:
  """The modules of `modules` that `names` name (a module's name, or a group: 'encoder',
  'decoder'), in their order; an unknown name refused by name (`field`: the config's)."""
  modules = list(modules)
  unknown = [n for n in names if n not in GROUPS and n not in modules]
  if unknown:
    raise UserError(f'{field}={tuple(names)}: no module {unknown[0]!r} in this UNet; name '
                    f'{", ".join(GROUPS)} or modules of {", ".join(modules)}')
  return tuple(m for m in modules
               if m in names or any(GROUPS[g](m) for g in names if g in GROUPS))


def frozen_modules(freeze: Sequence[str], modules: Iterable[str]) -> tuple[str, ...]:
  """The modules of `modules` that `freeze` names (named_modules); refused by name: an unknown
  name, or every module frozen."""
  modules = list(modules)
  frozen = named_modules(freeze, modules)
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
  return grouped_optimizer((), lambda multiplier: tx, freeze, ())


def lr_multipliers(config: Any) -> tuple[tuple[tuple[str, ...], float], ...]:
  """`config.lr_multipliers`, ((module or group name, multiplier), ...), as (the modules it
  names, multiplier) pairs: torch's parameter groups, each at the base rate times its
  multiplier. Refused by name: an entry that is not such a pair, a multiplier not above 0, an
  unknown name, a module in two entries, a frozen one given a multiplier."""
  modules = module_names(config.model.depth, config.model.get('deep_supervision', False))
  frozen = frozen_by_config(config)
  groups, seen = [], {}
  for entry in config.get('lr_multipliers', ()):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)):
      raise UserError(f'lr_multipliers: {entry!r} is not a (module, multiplier) pair; e.g. '
                      "--config.lr_multipliers=\"(('encoder', 0.1),)\"")
    name, multiplier = entry
    if not multiplier > 0:
      raise UserError(f'lr_multipliers: {name!r} has multiplier {multiplier}, which must be '
                      'above 0 (to leave modules as they are, freeze them: --config.freeze)')
    named = named_modules(freeze_names(name), modules, 'lr_multipliers')
    for module in named:
      if module in frozen:
        raise UserError(f'lr_multipliers: {module} is frozen (freeze) and given a multiplier; '
                        'leave it out of one of them')
      if module in seen:
        raise UserError(f'lr_multipliers: {module} is in two entries ({seen[module]!r} and '
                        f'{name!r}); give each module one multiplier')
      seen[module] = name
    groups.append((named, float(multiplier)))
  return tuple(groups)


def grouped_optimizer(clip: Sequence[optax.GradientTransformation],
                      update: Callable[[float], optax.GradientTransformation],
                      freeze: Sequence[str], groups: Sequence[tuple[Sequence[str], float]],
                      ) -> optax.GradientTransformation:
  """torch's optimizer over parameter groups: `clip` over every gradient at once (a frozen
  module's is 0 in the train step), then `update(multiplier)` on each group's parameters (the
  base rate's, `update(1.0)`, for modules in none), updates of 0 for the modules `freeze`
  names (frozen_modules)."""

  def labels(params: Mapping[str, Any]) -> dict[str, str]:
    frozen = frozen_modules(freeze, params)

    def label(module: str) -> str:
      if module in frozen:
        return 'frozen'
      return next((f'group{i}' for i, (named, _) in enumerate(groups) if module in named),
                  'base')
    return {k: label(k) for k in params}

  transforms = {'base': update(1.0), 'frozen': optax.set_to_zero(),
                **{f'group{i}': update(m) for i, (_, m) in enumerate(groups)}}
  return optax.chain(*clip, optax.multi_transform(transforms, labels))

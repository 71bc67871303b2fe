"""The run config's checks, before any compute: each failure is one line naming the field.

`validate_config` needs only the config and the mesh; `validate_data` the dataset's DataInfo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from unet_jax import input_pipeline, parallel
from unet_jax.errors import UserError
from unet_jax.freezing import lr_multipliers
from unet_jax.image_io import NORMALIZATION_CHOICES, NORMALIZATIONS, RESAMPLE_FILTERS
from unet_jax.levers import CPU_SCHEDULERS, LEVERS
from unet_jax.losses import DICE_REDUCTIONS, DICE_SMOOTH
from unet_jax.lovasz import REDUCTIONS as LOVASZ_REDUCTIONS
from unet_jax.optimizers import COSINE_WARMUP, learning_rate_schedule, make_optimizer
from unet_jax.profiling import check_profile_steps
from unet_jax.regions import check_regions, config_regions, label_count

# The generalized Dice's weighted counts are about 1 / (a class's pixels): a smoothing above
# this swamps them (MONAI's GeneralizedDiceLoss smooths by 1e-5).
GENERALIZED_DICE_MAX_SMOOTH = 1e-3


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Checks that need no data: each failure is one line naming the field."""
  for field in ('batch_size', 'image_size', 'num_train_steps', 'log_every_steps',
                'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    if config[field] < 1:
      raise UserError(f'{field}={config[field]} must be at least 1')
  if config.get('init_new_head', False) and not config.get('init_from'):
    raise UserError('init_new_head=True draws the output layer anew for weights taken with '
                    'init_from, which is not set; set --config.init_from=PATH, or leave '
                    'init_new_head off')
  if config.get('num_epochs', 0) < 0:
    raise UserError(f'num_epochs={config.num_epochs:g} must be at least 0 (0: train for '
                    'num_train_steps)')
  check_profile_steps(config.get('profile_steps', ()),
                      None if config.get('num_epochs', 0) else config.num_train_steps)
  if config.eval_batch_size < 0:
    raise UserError(f'eval_batch_size={config.eval_batch_size} must be at least 1 '
                    '(or 0: the same as batch_size)')
  if config.num_sample_images < 0:
    raise UserError(f'num_sample_images={config.num_sample_images} must be at least 0 '
                    '(0: no sample images)')
  check_class_names(config.data.get('class_names', ()), max(config.model.num_classes, 2),
                    'data.class_names', f'model.num_classes={config.model.num_classes}')
  if not config.learning_rate > 0:  # also refuses NaN
    raise UserError(f'learning_rate={config.learning_rate} must be positive')
  if not config.get('warmup_steps', -1) >= -1:
    raise UserError(f'warmup_steps={config.warmup_steps} must be at least 0 (or -1: the '
                    f"schedule's own, {COSINE_WARMUP} steps for cosine, none for the others)")
  for field in ('weight_decay', 'dice_weight', 'seed', 'grad_clip_norm',
                'early_stop_patience'):
    if not config[field] >= 0:
      raise UserError(f'{field}={config[field]} must be at least 0')
  if not config.get('ce_weight', 1.0) >= 0:
    raise UserError(f'ce_weight={config.ce_weight} must be at least 0')
  if config.get('ce_weight', 1.0) == 0 and config.dice_weight == 0:
    raise UserError('ce_weight=0 and dice_weight=0 leave no loss to train; set either above 0')
  if not config.get('dice_smooth', 1.0) > 0:
    raise UserError(f'dice_smooth={config.dice_smooth} must be positive: a class absent from an '
                    'image and its prediction scores (0 + dice_smooth) / (0 + dice_smooth) = 1 '
                    "(nnU-Net's 1e-5, milesial's 1e-6)")
  if not 0 <= config.momentum < 1:
    raise UserError(f'momentum={config.momentum} must be in [0, 1)')
  if config.get('nesterov', False) and (config.optimizer != 'sgd' or not config.momentum):
    # (torch's SGD refuses it without momentum; the other optimizers have no such switch)
    raise UserError(f'nesterov=True needs optimizer=\'sgd\' with momentum > 0, this config has '
                    f'optimizer={config.optimizer!r}, momentum={config.momentum}; set '
                    '--config.optimizer=sgd --config.momentum=0.99 (nnU-Net\'s), or leave '
                    'nesterov off')
  if config.get('poly_every_steps', 1) < 1:
    raise UserError(f'poly_every_steps={config.poly_every_steps} must be at least 1: the steps '
                    'between lowerings of the poly schedule (nnU-Net\'s 250: once per epoch)')
  if not config.get('poly_power', 0.9) >= 0:
    raise UserError(f'poly_power={config.poly_power} must be at least 0: schedule=\'poly\' '
                    'lowers the rate as (1 - step / num_train_steps) ** poly_power')
  for field in ('patience', 'cooldown', 'threshold', 'min_learning_rate'):
    if not config.plateau[field] >= 0:
      raise UserError(f'plateau.{field}={config.plateau[field]} must be at least 0')
  if not 0 < config.plateau.factor < 1:
    raise UserError(f'plateau.factor={config.plateau.factor} must be in (0, 1): the learning '
                    "rate's factor on a plateau")
  if config.data.get('ignore_value', -1) < -1:
    raise UserError(f'data.ignore_value={config.data.ignore_value} must be a mask value '
                    '(or -1: none)')
  if config.data.get('resample', 'bilinear') not in RESAMPLE_FILTERS:
    raise UserError(f'data.resample={config.data.resample!r}: use one of {RESAMPLE_FILTERS}')
  if not 0 < config.data.get('holdout_percent', 10.0) < 100:
    raise UserError(f'data.holdout_percent={config.data.holdout_percent:g} must be above 0 and '
                    'below 100: the share of an image folder\'s pairs held out for evaluation')
  num_folds, fold = config.data.get('num_folds', 0), config.data.get('fold', 0)
  if num_folds == 1 or num_folds < 0:
    raise UserError(f'data.num_folds={num_folds} must be 2 or more (k-fold cross-validation), '
                    'or 0: hold out data.holdout_percent instead')
  if num_folds and not 0 <= fold < num_folds:
    raise UserError(f'data.fold={fold} must be in 0..{num_folds - 1}: which of the '
                    f'data.num_folds={num_folds} blocks is held out')
  if not num_folds and fold:
    raise UserError(f'data.fold={fold} picks one of data.num_folds blocks, which is 0 (off); '
                    'set --config.data.num_folds (e.g. 5)')
  fold_seed = config.data.get('fold_seed', -1)
  if not -1 <= fold_seed < 2**32:  # (numpy's RandomState takes seeds below 2**32)
    raise UserError(f'data.fold_seed={fold_seed} must be -1 (contiguous folds) or a seed in '
                    '0..2**32-1 (12345: nnU-Net\'s folds)')
  if not num_folds and fold_seed != -1:
    raise UserError(f'data.fold_seed={fold_seed} shuffles the pairs before data.num_folds folds '
                    'are cut, which is 0 (off); set --config.data.num_folds (e.g. 5)')
  if num_folds and config.data.get('holdout_percent', 10.0) != 10.0:
    raise UserError(f'data.num_folds={num_folds} holds out one fold, 1/{num_folds} of the pairs, '
                    f'and data.holdout_percent={config.data.holdout_percent:g} another share; '
                    'set one of them')
  sampling = config.data.get('sampling', 'epochs')
  if sampling not in ('epochs', 'replacement'):
    raise UserError(f"data.sampling={sampling!r} is unknown; use 'epochs' (the training split "
                    "shuffled anew for each pass) or 'replacement' (each example drawn on its "
                    "own, as nnU-Net)")
  for field in ('worker_count', 'num_threads'):
    if config.data[field] < 0:
      raise UserError(f'data.{field}={config.data[field]} must be at least 0')
  for name in ('brightness', 'contrast'):
    value = config.augment.get(name, 0.0)
    if not 0 <= value < 1:
      raise UserError(f'augment.{name}={value} must be in [0, 1): factors are drawn from '
                      f'[1 - {name}, 1 + {name}]')
  if not 0 <= config.augment.get('rotate_degrees', 0.0) <= 180:
    raise UserError(f'augment.rotate_degrees={config.augment.rotate_degrees} must be in [0, 180]: '
                    'angles are drawn from [-rotate_degrees, rotate_degrees] (0: off)')
  scale = tuple(config.augment.get('scale', ()) or ())
  if scale and not _is_range(scale):
    raise UserError(f"augment.scale={scale} must be (low, high) with 0 < low <= high: a size "
                    "factor drawn from it, e.g. --config.augment.scale='(0.7,1.4)'; () for none")
  gamma = tuple(config.augment.get('gamma', ()) or ())
  if gamma and not _is_range(gamma):
    raise UserError(f"augment.gamma={gamma} must be (low, high) with 0 < low <= high, e.g. "
                    "--config.augment.gamma='(0.7,1.5)' (nnU-Net's); () for none")
  if not config.augment.get('elastic_sigma', 0.0) >= 0:
    raise UserError(f'augment.elastic_sigma={config.augment.elastic_sigma} must be at least 0: '
                    "the grid's displacements' standard deviation in pixels (the UNet paper's "
                    '10; 0: off)')
  if config.augment.get('elastic_grid', 3) < 2:
    raise UserError(f'augment.elastic_grid={config.augment.elastic_grid} must be at least 2: '
                    "the nodes per side of the displacements' grid (the UNet paper's 3)")
  if not config.augment.get('noise', 0.0) >= 0:
    raise UserError(f'augment.noise={config.augment.noise} must be at least 0: the largest '
                    'standard deviation of the Gaussian noise (0: none)')
  normalize = config.data.get('normalize', 'unit')
  if normalize not in NORMALIZATIONS:
    raise UserError(f'data.normalize={normalize!r} is unknown; {NORMALIZATION_CHOICES}')
  recipe = config.augment.get('intensity_recipe', 'jitter')
  jitter = [f for f in ('brightness', 'contrast') if config.augment.get(f, 0.0)]
  if normalize in ('zscore', 'ct') and recipe == 'jitter' and jitter:
    raise UserError(f"augment.{jitter[0]} with augment.intensity_recipe='jitter' clips to "
                    f"[0, 1], which data.normalize='{normalize}' images are not in; set "
                    "augment.intensity_recipe='nnunet' (unclipped, as nnU-Net on its "
                    f'normalised images) or augment.{jitter[0]}=0')
  if recipe not in ('jitter', 'nnunet'):
    raise UserError(f"augment.intensity_recipe={recipe!r} is unknown; use 'jitter' "
                    "(torchvision's ColorJitter, MONAI's gamma and noise) or 'nnunet'")
  if config.augment.get('inverted_gamma_prob', 0.0) and (recipe != 'nnunet' or not gamma):
    raise UserError(f'augment.inverted_gamma_prob={config.augment.inverted_gamma_prob} is '
                    "nnU-Net's gamma of the inverted image: it needs "
                    "augment.intensity_recipe='nnunet' and an augment.gamma range")
  _check_nnunet_ranges(config.augment, recipe)
  for name in ('brightness', 'contrast', 'gamma', 'noise', 'inverted_gamma', 'blur',
               'low_resolution', 'rotate', 'scale', 'elastic'):
    prob = config.augment.get(f'{name}_prob', 1.0)
    if not 0 <= prob <= 1:
      what = {'inverted_gamma': 'the gamma of the inverted image',
              'rotate': 'augment.rotate_degrees',
              'elastic': 'augment.elastic_sigma'}.get(name, f'augment.{name}')
      raise UserError(f'augment.{name}_prob={prob} must be in [0, 1]: the share of examples '
                      f'{what} applies to (1: every one)')
  for name in ('blur', 'low_resolution'):
    prob = config.augment.get(f'{name}_channel_prob', 1.0)
    if not 0 <= prob <= 1:
      raise UserError(f'augment.{name}_channel_prob={prob} must be in [0, 1]: the share of '
                      f"an example's channels augment.{name} applies to (1: every one)")
  if not 0 < config.augment.min_scale <= 1:
    raise UserError(f'augment.min_scale={config.augment.min_scale} must be in (0, 1]: the '
                    "smallest random crop's side, as a fraction of the image's")
  for field in ('in_channels', 'num_classes', 'base_features', 'depth'):
    if config.model[field] < 1:
      raise UserError(f'model.{field}={config.model[field]} must be at least 1')
  parallel.check_batch_size(config.batch_size, mesh)
  k = config.get('grad_accum_steps', 1)
  if k < 1:
    raise UserError(f'grad_accum_steps={k} must be at least 1 (1: no accumulation)')
  n = mesh.devices.size
  if config.batch_size % (k * n):
    raise UserError(f'batch_size={config.batch_size} is not divisible by grad_accum_steps={k} '
                    f'x the {n} device(s): each microbatch must split evenly over the devices; '
                    f'use a multiple of {k * n} (e.g. --config.batch_size='
                    f'{max(k * n, config.batch_size // (k * n) * (k * n))})')
  if config.eval_batch_size:
    parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  if config.on_nonfinite not in ('skip', 'stop'):
    raise UserError(f"on_nonfinite={config.on_nonfinite!r}: use 'skip' or 'stop'")
  if config.parallel not in ('shard_map', 'pmap'):
    raise UserError(f"parallel={config.parallel!r}: use 'shard_map' or 'pmap'")
  if config.get('cpu_scheduler', CPU_SCHEDULERS[0]) not in CPU_SCHEDULERS:
    raise UserError(f'cpu_scheduler={config.cpu_scheduler!r}: use one of {CPU_SCHEDULERS}')
  nc = config.model.num_classes
  if config.loss not in ('auto', 'bce', 'ce'):
    raise UserError(f"loss={config.loss!r}: use 'bce', 'ce' or 'auto'")
  regions = _check_regions(config)
  weights = tuple(config.get('class_weights', ()))
  if weights and regions:
    raise UserError(f'class_weights={weights} weigh the classes of a softmax; data.regions '
                    "train each region's own BCE: set --config.pos_weight (each region's "
                    'members) instead')
  if weights and nc < 2:
    raise UserError(f'class_weights={weights} weigh the softmax cross-entropy of 2 or more '
                    'classes; with model.num_classes=1 (BCE) set --config.pos_weight instead')
  if weights and len(weights) != nc:
    raise UserError(f'class_weights has {len(weights)} values but model.num_classes={nc}: '
                    'give one weight per class')
  if weights and not (all(w >= 0 for w in weights) and sum(weights) > 0):
    raise UserError(f'class_weights={weights} must be at least 0, and not all 0')
  if config.get('balanced_class_weights', False) and (weights
                                                      or config.get('pos_weight', 1.0) != 1.0):
    raise UserError('balanced_class_weights=True computes class_weights (pos_weight for one '
                    'output channel) from the training pixels; leave those unset, or set them '
                    'yourself without it')
  pos_weight = config.get('pos_weight', 1.0)
  if not 0 < pos_weight < float('inf'):
    raise UserError(f'pos_weight={pos_weight} must be positive')
  if pos_weight != 1.0 and nc > 1 and not regions:
    raise UserError(f'pos_weight={pos_weight} weighs the foreground of BCE (model.num_classes=1); '
                    f'with {nc} classes set --config.class_weights instead')
  decay = config.get('ema_decay', 0.0)
  if not 0 <= decay < 1:
    raise UserError(f'ema_decay={decay} must be in [0, 1) (0: no moving average; e.g. 0.999)')
  gamma = config.get('focal_gamma', 0.0)
  if not 0 <= gamma < float('inf'):
    raise UserError(f'focal_gamma={gamma} must be at least 0 (0: plain cross-entropy; the focal '
                    'loss paper uses 2)')
  border = config.get('border_weight', 0.0)
  if not 0 <= border < float('inf'):
    raise UserError(f"border_weight={border} must be at least 0: the UNet paper's w0 (its 10; "
                    '0: off)')
  if not config.get('border_sigma', 5.0) > 0:
    raise UserError(f'border_sigma={config.border_sigma} must be positive: the width in pixels '
                    "of the UNet paper's separation term (its 5)")
  smoothing = config.get('label_smoothing', 0.0)
  if border and smoothing:
    raise UserError(f'border_weight={border} and label_smoothing={smoothing}: use one of them '
                    '(torch defines no smoothing of a per-pixel weighted cross-entropy)')
  if not 0 <= smoothing <= 1:
    raise UserError(f'label_smoothing={smoothing} must be in [0, 1] (0: hard targets; e.g. 0.1)')
  if smoothing and gamma:
    raise UserError(f'label_smoothing={smoothing} and focal_gamma={gamma}: use one of them '
                    '(the focal loss of smoothed targets is not defined by torch or '
                    'segmentation_models_pytorch)')
  tversky = tuple(config.get('tversky', ()))
  if tversky and not (len(tversky) == 2 and all(0 <= v < float('inf') for v in tversky)
                      and sum(tversky) > 0):
    raise UserError(f'tversky={tversky} must be two weights (alpha, beta), at least 0 and not '
                    "both 0, e.g. --config.tversky='(0.3,0.7)'; () for the soft Dice")
  if config.get('dice_reduction', 'image') not in DICE_REDUCTIONS:
    raise UserError(f'dice_reduction={config.dice_reduction!r}: use one of {DICE_REDUCTIONS}')
  if config.get('generalized_dice', False):
    if tversky or config.get('lovasz', False):
      raise UserError('generalized_dice=True is a Dice term of its own: set it without '
                      '--config.tversky and --config.lovasz')
    if config.get('dice_reduction', 'image') == 'pooled':
      raise UserError("generalized_dice=True weighs each class's counts: use dice_reduction "
                      "'image' or 'batch', not 'pooled' (which adds the classes together)")
    smooth = config.get('dice_smooth', DICE_SMOOTH)
    if smooth > GENERALIZED_DICE_MAX_SMOOTH:
      raise UserError(f"generalized_dice=True weighs each class's counts by 1 / (its pixels)^2, "
                      f'so dice_smooth={smooth} would outweigh them and hold the term near 0; '
                      'set --config.dice_smooth=1e-5 (MONAI\'s GeneralizedDiceLoss default)')
  if config.get('lovasz', False):
    if regions:
      raise UserError('lovasz=True is not defined for data.regions (each a sigmoid of its '
                      'own); use the soft Dice, tversky or generalized_dice')
    if tversky:
      raise UserError(f'lovasz=True and tversky={tversky} both replace the Dice term; set one')
    if config.get('dice_reduction', 'image') not in LOVASZ_REDUCTIONS:
      raise UserError(f"lovasz=True takes dice_reduction 'image' (per image) or 'batch' (over "
                      f"the global batch), not {config.dice_reduction!r}")
    if not config.get('dice_include_background', True):
      raise UserError('lovasz=True scores every class present in the truth (its '
                      "classes='present'); dice_include_background=False is the Dice term's: "
                      'leave it True')
  if (config.loss == 'bce' and nc != 1 and not regions) or (config.loss == 'ce' and nc < 2):
    raise UserError(f"loss='{config.loss}' does not fit model.num_classes={nc}: BCE takes one "
                    'output channel, softmax CE two or more')
  if config.model.upsample not in ('transpose', 'bilinear'):
    raise UserError(f"model.upsample={config.model.upsample!r}: use 'transpose' or 'bilinear'")
  if config.model.get('deep_supervision', False) and config.model.depth < 3:
    raise UserError(f'model.deep_supervision=True needs model.depth of at least 3 (its heads '
                    f'are on the decoder levels between the bottom and the top), got '
                    f'{config.model.depth}; raise model.depth, or leave deep_supervision off')
  lr_multipliers(config)  # (the modules it names, and that freeze does)
  for field, allowed in LEVERS.items():
    if config.model.get(field, allowed[0]) not in allowed:
      raise UserError(f'model.{field}={config.model[field]!r}: use one of {allowed}')
  shape = tuple(config.get('image_shape', ()) or ())
  if shape and not (len(shape) == 2 and all(isinstance(v, int) and v >= 1 for v in shape)):
    raise UserError(f"image_shape={shape} must be (height, width), e.g. --config.image_shape="
                    "'(320,480)'; () for image_size x image_size")
  if min(input_pipeline.image_hw(config)) < 2**config.model.depth:
    raise UserError(f'{_size_field(config)} is below 2**model.depth={2**config.model.depth}')
  crop = config.get('crop_size', 0)
  if crop < 0:
    raise UserError(f'crop_size={crop} must be at least 0 (0: the whole examples)')
  share = config.get('crop_foreground', 0.0)
  if not 0 <= share <= 1:
    raise UserError(f'crop_foreground={share} must be in [0, 1]: the share of crops centred on '
                    'a foreground pixel')
  if share and not crop:
    raise UserError(f'crop_foreground={share} centres some of crop_size\'s patches on the '
                    'foreground, but crop_size is 0 (whole examples); set --config.crop_size')
  first = input_pipeline.first_oversampled(config.batch_size, share)
  if share and first >= config.batch_size and not config.get('crop_foreground_random', False):
    raise UserError(f'crop_foreground={share} centres none of a batch of {config.batch_size} '
                    'on the foreground: as nnU-Net, it centres the patches at positions '
                    f'round({config.batch_size} x (1 - {share})) = {first} and after; raise it, '
                    'or set --config.crop_foreground_random=True to draw for each patch')
  if crop and not 2**config.model.depth <= crop <= min(input_pipeline.image_hw(config)):
    raise UserError(f'crop_size={crop} must be between 2**model.depth={2**config.model.depth} '
                    f'and the smaller side of {_size_field(config)} (the crops are cut from the '
                    'resized examples); 0: train on the whole examples')
  _check_batch_norm_count(config)
  learning_rate_schedule(config)
  make_optimizer(config)


def _check_regions(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], ...] | None:
  """A config's data.regions, refused unless each output channel has one that can be painted
  back into a mask; None without regions."""
  order = tuple(config.data.get('region_class_order', ()))
  try:
    regions = config_regions(config)
  except (TypeError, ValueError):
    raise UserError(f'data.regions={config.data.regions}: give a tuple of regions, each a tuple '
                    "of class ids, e.g. --config.data.regions='((1,2,3),(2,3),(3,))'") from None
  if not regions:
    if order:
      raise UserError(f'data.region_class_order={order} orders data.regions, which is not set')
    return None
  try:
    check_regions(regions, order)
  except ValueError as e:
    raise UserError(f'data.regions: {e}') from None
  nc = config.model.num_classes
  if nc != len(regions):
    raise UserError(f'data.regions has {len(regions)} regions but model.num_classes={nc}: the '
                    f'model has one output channel per region; set '
                    f'--config.model.num_classes={len(regions)}')
  if config.loss == 'ce':
    raise UserError("loss='ce' is a softmax over classes; data.regions train a sigmoid per "
                    "region (BCE): set --config.loss=auto or bce")
  if config.get('balanced_class_weights', False):
    raise UserError('balanced_class_weights=True weighs classes; data.regions are not classes: '
                    'set --config.pos_weight yourself, or leave it off')
  return regions


def check_class_names(names: Sequence[Any], classes: int, field: str, why: str) -> None:
  """One distinct, non-empty name per class (`classes` of them, as `why` says), if any."""
  if not names:
    return
  if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
    raise UserError(f"{field}={names!r} must be one non-empty name per class, e.g. "
                    "('background', 'liver')")
  if len(names) != classes:
    # (--config.data.class_names=a,b arrives as the one name 'a,b')
    tuple_hint = (f', as a tuple: --config.{field}="(\'a\', \'b\')"'
                  if field.startswith('data.') and any(',' in n for n in names) else '')
    raise UserError(f'{field} names {len(names)} class(es) but there are {classes} ({why}); '
                    f'name each class once, in class-id order{tuple_hint}')
  if len(set(names)) != len(names):
    twice = sorted({n for n in names if list(names).count(n) > 1})
    raise UserError(f'{field} names {", ".join(map(repr, twice))} more than once; give each '
                    'class its own name')


def _is_range(value: tuple, top: float | None = None) -> bool:
  """An augment field's (low, high): two numbers with 0 < low <= high (<= top, if given)."""
  return len(value) == 2 and 0 < value[0] <= value[1] and (top is None or value[1] <= top)


_NNUNET_RANGES = {  # field: (what it draws, its largest high, nnU-Net's range)
    'blur': ("nnU-Net's Gaussian blur: a sigma in pixels", None, '(0.5,1.0)'),
    'low_resolution': ("nnU-Net's low-resolution simulation: a scale", 1.0, '(0.5,1.0)'),
}


def _check_nnunet_ranges(aug: ml_collections.ConfigDict, recipe: str) -> None:
  """augment.blur and augment.low_resolution: () or (low, high) ranges, 'nnunet' only."""
  for name, (what, top, theirs) in _NNUNET_RANGES.items():
    value = tuple(aug.get(name, ()) or ())
    if not value:
      continue
    bound = f' <= {top:g}' if top else ''
    if not _is_range(value, top):
      raise UserError(f"augment.{name}={value} must be (low, high) with 0 < low <= high{bound} "
                      f"({what} drawn from it), e.g. --config.augment.{name}='{theirs}' "
                      "(nnU-Net's); () for none")
    if recipe != 'nnunet':
      raise UserError(f"augment.{name}={value} is {what.split(':')[0]}: it needs "
                      "augment.intensity_recipe='nnunet'")


def _check_batch_norm_count(config: ml_collections.ConfigDict) -> None:
  # BatchNorm's statistics are the global microbatch's (SyncBN); the bottom level's map is the
  # smallest. One value per channel there is what PyTorch refuses in training: the model would
  # raise it in the first step's trace, this says which fields to change before any compute.
  images = config.batch_size // config.get('grad_accum_steps', 1)
  height, width = (side // 2**config.model.depth for side in input_pipeline.train_hw(config))
  if images * height * width == 1:
    per = (f' per microbatch (grad_accum_steps={config.grad_accum_steps})'
           if config.get('grad_accum_steps', 1) > 1 else '')
    larger = ('a larger image_shape' if config.get('image_shape', ())
              else f'image_size={2**(config.model.depth + 1)} or more')
    size = _size_field(config)
    if config.get('crop_size', 0):
      size, larger = f'crop_size={config.crop_size}', f'crop_size={2**(config.model.depth + 1)}'
    raise UserError(f'batch_size={config.batch_size} gives 1 image{per} at '
                    f'{size}, whose 1x1 bottom level (model.depth='
                    f'{config.model.depth}) leaves BatchNorm one value per channel, which '
                    f'PyTorch refuses in training too; use 2 or more images per step, or {larger}')


def _size_field(config: ml_collections.ConfigDict) -> str:
  """The field that sets the training size, as a refusal names it."""
  shape = tuple(config.get('image_shape', ()) or ())
  return f'image_shape={shape}' if shape else f'image_size={config.image_size}'


def validate_data(config: ml_collections.ConfigDict, info: input_pipeline.DataInfo) -> None:
  if info.channels != config.model.in_channels:
    raise UserError(f'dataset {info.name!r} has {info.channels}-channel images but '
                    f'model.in_channels={config.model.in_channels}; set '
                    f'--config.model.in_channels={info.channels}')
  classes = label_count(config)
  if len(info.mask_values) > classes and config_regions(config):
    raise UserError(info.too_many_mask_values(
        f'data.regions cover class ids up to {classes - 1}') + '; put the classes above it in '
        'a region (or map them to 0)')
  if len(info.mask_values) > classes:
    line = info.too_many_mask_values(f'model.num_classes={config.model.num_classes}')
    raise UserError(f'{line}{", or if these are your classes" if info.lossy_mask else ""}; set '
                    f'--config.model.num_classes={len(info.mask_values)}')
  if info.num_train < config.batch_size // jax.process_count():
    raise UserError(f'dataset {info.name!r} has {info.num_train} training examples, fewer than '
                    f'one batch ({config.batch_size}); lower --config.batch_size')

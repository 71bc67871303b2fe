"""Pretrained checkpoints on disk: an Orbax tree of variables plus the model config beside it.

A converted checkpoint directory looks like::

    DEST/unet_jax.json   {"format": "unet_jax.pretrained", "model": {...}, "metadata": {...}}
    DEST/variables/      Orbax checkpoint of {'params': ..., 'batch_stats': ...}

The model config travels with the weights, so `load_pretrained(DEST)` needs nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.errors import UserError, first_line
from unet_jax.file_modes import as_created
from unet_jax.image_io import training_size
from unet_jax.model import UNet

FORMAT = 'unet_jax.pretrained'
CONFIG_FILE = 'unet_jax.json'
VARIABLES_DIR = 'variables'
CHECKPOINTS_DIR = 'checkpoints'  # a training workdir's Orbax steps: WORKDIR/checkpoints/<step>/
BEST_STEP = 'best'  # WORKDIR/checkpoints/best: not a folder, a name for the best-scored step
# A workdir's metadata: the PyTorch layout of the weights its run started from (init_from)
INIT_LAYOUT = 'init_from_layout'
MODEL_FIELDS = ('in_channels', 'num_classes', 'base_features', 'depth', 'upsample', 'conv_bias',
                'deep_supervision')
# Fields added since the first checkpoints, written only when they differ from these defaults,
# which are what a checkpoint without them means.
LATER_MODEL_FIELDS = {'deep_supervision': False}


def model_config(model: UNet) -> dict[str, Any]:
  """The architecture fields of a UNet (not runtime choices such as dtype)."""
  return {f: getattr(model, f) for f in MODEL_FIELDS
          if not (f in LATER_MODEL_FIELDS and getattr(model, f) == LATER_MODEL_FIELDS[f])}


def complete_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """A saved model config with the later fields' defaults where it has none (to compare two)."""
  return {**LATER_MODEL_FIELDS, **config}


def model_from_config(config: Mapping[str, Any], **runtime: Any) -> UNet:
  unknown = set(config) - set(MODEL_FIELDS)
  if unknown:
    raise UserError(f'unknown model config fields {sorted(unknown)}; known: {list(MODEL_FIELDS)}')
  return UNet(**config, **runtime)


def abstract_variables(model: UNet) -> dict[str, Any]:
  """Shapes and dtypes of `model.init`'s variables, computed without allocating them."""
  x = jax.ShapeDtypeStruct((1, 2**model.depth, 2**model.depth, model.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_variables(variables: Mapping[str, Any], expected: Mapping[str, Any], source: str) -> None:
  """Raises naming the first missing, unexpected or mis-shaped variable."""
  got, want = _flat(variables), _flat(expected)
  for name in want:
    if name not in got:
      raise UserError(f'{source}: missing variable {name!r}')
  for name in got:
    if name not in want:
      raise UserError(f'{source}: unexpected variable {name!r}')
  for name, leaf in want.items():
    if tuple(got[name].shape) != tuple(leaf.shape):
      raise UserError(f'{source}: variable {name!r} has shape {tuple(got[name].shape)}, '
                      f'the model expects {tuple(leaf.shape)}')


@contextlib.contextmanager
def atomic_directory(dest: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory that becomes `dest` only if the block succeeds."""
  dest = os.path.abspath(dest)
  if os.path.exists(dest) and not overwrite:
    raise UserError(f'{dest}: already exists; choose another destination or pass --overwrite')
  parent = os.path.dirname(dest)
  if not os.path.isdir(parent):
    raise UserError(f'{parent}: no such directory for the destination')
  try:
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(dest)}.tmp-', dir=parent)
    as_created(tmp)
  except OSError as e:
    raise UserError(f'{parent}: cannot write there ({e.strerror})') from None
  try:
    yield tmp
    if os.path.exists(dest):
      old = tmp + '.old'
      os.rename(dest, old)
      os.rename(tmp, dest)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dest)
  except BaseException:
    _remove_for_good(tmp)
    raise


def _remove_for_good(tmp: str, quiet: float = 1.0, limit: float = 15.0) -> None:
  """Removes a failed save's directory, and again whenever it comes back, until it has stayed
  gone for `quiet` seconds (or `limit` have passed). After a refused write, writes of the same
  save still in flight in tensorstore's own threads (which Python cannot wait for) recreate
  their folders: on a full disk a CI run left one '.out.tmp-*' behind after a single removal,
  and a full test run here one after removing until it was gone."""
  start = gone_since = time.monotonic()
  while time.monotonic() - start < limit:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
      gone_since = time.monotonic()
    elif time.monotonic() - gone_since >= quiet:
      return
    time.sleep(0.05)


def save_pretrained(dest: str, model: UNet, variables: Mapping[str, Any],
                    metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
  """Writes variables + model config to `dest` atomically. Returns the absolute path."""
  import orbax.checkpoint as ocp
  check_variables(variables, abstract_variables(model), 'variables to save')
  tree = {k: jax.tree.map(np.asarray, dict(variables[k])) for k in ('params', 'batch_stats')}
  with atomic_directory(dest, overwrite) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, VARIABLES_DIR), tree)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump({'format': FORMAT, 'version': 1, 'model': model_config(model),
                 'metadata': dict(metadata or {})}, f, indent=2)
  return os.path.abspath(dest)


def read_checkpoint_info(path: str) -> dict[str, Any]:
  """The unet_jax.json of a converted checkpoint directory: format, model config, metadata."""
  try:
    with open(os.path.join(path, CONFIG_FILE)) as f:
      info = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{path}: unreadable {CONFIG_FILE} ({e}); the checkpoint is damaged') from None
  if not isinstance(info, dict) or info.get('format') != FORMAT or 'model' not in info:
    raise UserError(f'{path}: {CONFIG_FILE} is not a unet_jax checkpoint description')
  return info


def load_pretrained_with_metadata(path: str, dtype: Any = jnp.float32,
                                  ) -> tuple[UNet, dict[str, Any], dict[str, Any]]:
  """Like `load_pretrained`, also returning the metadata saved with the weights."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if os.path.isfile(path):
    raise UserError(f'{path}: is a file; pass a converted checkpoint directory or a training '
                    'workdir (PyTorch weights: `python -m unet_jax.convert torch-to-flax SRC '
                    'DEST`)')
  parent, name = os.path.split(path)
  if os.path.basename(parent) == CHECKPOINTS_DIR and os.path.isdir(parent):
    if name == BEST_STEP:  # WORKDIR/checkpoints/best: the step with the highest eval Dice
      return _load_training_workdir(os.path.dirname(parent), dtype, BEST_STEP)
    if name.isdigit() and os.path.isdir(path):  # WORKDIR/checkpoints/STEP
      return _load_training_workdir(os.path.dirname(parent), dtype, int(name))
  if not os.path.isdir(path):
    raise UserError(f'{path}: no such checkpoint directory')
  if name == CHECKPOINTS_DIR and not os.path.isfile(os.path.join(path, CONFIG_FILE)):
    path = parent  # WORKDIR/checkpoints: the workdir's latest step
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    return _load_training_workdir(path, dtype)
  if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
    raise UserError(f'{path}: not a unet_jax checkpoint (no {CONFIG_FILE}, no checkpoints/); '
                    'convert PyTorch weights with `python -m unet_jax.convert torch-to-flax SRC '
                    'DEST`, or pass a training workdir')
  info = read_checkpoint_info(path)
  model = model_from_config(info['model'], dtype=dtype)
  expected = abstract_variables(model)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(os.path.join(path, VARIABLES_DIR))
  except Exception as e:  # Orbax raises many types for damaged trees; all mean the same here.
    raise UserError(f'{path}: cannot restore the weights ({first_line(e)}); the checkpoint is '
                    'damaged') from None
  check_variables(variables, expected, path)
  variables = jax.tree.map(jnp.asarray, variables)
  return model, variables, dict(info.get('metadata') or {})


def _load_training_workdir(path: str, dtype: Any, step: int | str | None = None,
                           ) -> tuple[UNet, dict[str, Any], dict[str, Any]]:
  from unet_jax.train_checkpoints import read_workdir
  which = ('its latest checkpoint' if step is None else 'its best checkpoint'
           if step == BEST_STEP else f'its checkpoint of step {step}')
  try:
    step, variables, meta, updates = read_workdir(path, step)
  except FileNotFoundError as e:
    raise UserError(str(e)) from None
  except Exception as e:  # Orbax raises many types for damaged trees; all mean the same here.
    raise UserError(f'{path}: cannot restore {which} ({first_line(e)})') from None
  model = model_from_config(meta['model'], dtype=dtype)
  check_variables(variables, abstract_variables(model), path)
  metadata = dict(meta.get('metadata') or {}, step=step, applied_updates=updates)
  if 'image_size' in (meta.get('config') or {}):  # what the network saw in training
    metadata['image_size'] = training_size(meta['config'])  # (an int, or [height, width])
    # ... and the filter its images were resized with (runs before it could be set: bilinear)
    metadata['resample'] = (meta['config'].get('data') or {}).get('resample', 'bilinear')
    # ... and how they were normalised (runs before data.normalize: scaled to [0, 1])
    metadata['normalize'] = (meta['config'].get('data') or {}).get('normalize', 'unit')
    if metadata['normalize'] == 'ct':  # (with the training foreground's statistics)
      metadata['ct_statistics'] = meta['config']['data'].get('ct_statistics')
    data = meta['config'].get('data') or {}
    if data.get('regions'):  # (its channels are regions: how predict paints their masks)
      from unet_jax.regions import as_regions, check_regions
      regions = as_regions(data['regions'])
      metadata['regions'] = [list(r) for r in regions]
      metadata['region_class_order'] = list(check_regions(
          regions, tuple(data.get('region_class_order', ()))))
  if meta.get('config'):
    metadata['run_config'] = meta['config']  # the training config (data settings included)
  return model, jax.tree.map(jnp.asarray, variables), metadata


def load_pretrained(path: str, dtype: Any = jnp.float32) -> tuple[UNet, dict[str, Any]]:
  """Loads a converted checkpoint directory or a training workdir: returns `(model, variables)`.

  For a workdir, the latest complete checkpoint is used; `WORKDIR/checkpoints/STEP` loads that
  step's, `WORKDIR/checkpoints/best` the one with the highest eval Dice.

  `variables` is `{'params': ..., 'batch_stats': ...}`, ready for
  `model.apply(variables, x, train=False)`. `dtype` is the computation dtype of the model.
  """
  model, variables, _ = load_pretrained_with_metadata(path, dtype)
  return model, variables

"""Reading and writing PyTorch state_dicts (.pth/.pt/.bin and .safetensors) as numpy arrays.

Torch files are opened only with `weights_only=True`: a file that needs anything beyond tensors
and plain containers is refused and none of its code runs. .safetensors files are read without
torch at all.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from unet_jax.errors import UserError, first_line

TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
SAFETENSORS_SUFFIX = '.safetensors'
# Non-tensor entries we carry along as metadata instead of rejecting.
METADATA_KEYS = ('mask_values',)
# A .safetensors header also keeps the classes' names and how the model's images are
# normalised, with a 'ct' run's statistics, and a region model's regions (a .pth holds only
# what a strict load_state_dict of milesial's model tolerates).
SAFETENSORS_METADATA_KEYS = ('mask_values', 'class_names', 'normalize', 'ct_statistics',
                             'regions', 'region_class_order')
# Where training scripts commonly nest the state_dict.
_WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net', 'module')
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_KEY_PREFIXES = ('module.', '_orig_mod.')


def _import_torch():
  try:
    import torch
  except ImportError:
    raise UserError("reading or writing .pth files needs PyTorch: pip install 'unet-jax[torch]' "
                    '(or use .safetensors, which does not)') from None
  return torch


def _load_torch_file(path: str) -> Any:
  torch = _import_torch()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # legacy-format notices would break the one-line contract
      return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(e))
    what = f'it asks to import {found.group(1)}' if found else 'it holds pickled objects'
    raise UserError(
        f'{path}: refused to load: {what}, which a plain state_dict of tensors never does; nothing '
        'from it was run. Re-save it with torch.save(model.state_dict(), ...).') from None
  except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
    raise UserError(f'{path}: cannot read it as a PyTorch file ({first_line(e)}); '
                    'is it truncated or not a checkpoint?') from None


def _load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  import ml_dtypes  # noqa: F401 - numpy knows bfloat16 (BF16 tensors) only once this is loaded
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    tensors = load_file(path)
    with open(path, 'rb') as f:
      header_len = int.from_bytes(f.read(8), 'little')
      header = json.loads(f.read(header_len))
  except (SafetensorError, ValueError, OSError, TypeError) as e:
    raise UserError(f'{path}: cannot read it as a .safetensors file ({first_line(e)}); '
                    'is it truncated?') from None
  meta = header.get('__metadata__') or {}
  extras = {}
  for key in SAFETENSORS_METADATA_KEYS:
    if key in meta:
      try:
        extras[key] = json.loads(meta[key])
      except (ValueError, TypeError):
        raise UserError(f'{path}: its header\'s {key} is not JSON ({str(meta[key])[:40]!r}); '
                        'remove it from the header') from None
  return dict(tensors), extras


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  if not isinstance(obj, Mapping):
    raise UserError(f'{path}: holds a {type(obj).__name__}, not a state_dict; save '
                    'model.state_dict() rather than the model')
  # In a state_dict every value is a tensor; a dict under a known key is a training wrapper
  # such as {'epoch': 3, 'state_dict': {...}, 'optimizer': {...}}.
  for key in _WRAPPER_KEYS:
    if isinstance(obj.get(key), Mapping):
      return _unwrap(obj[key], path)
  return obj


def _strip_prefixes(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for prefix in _KEY_PREFIXES:
      if key.startswith(prefix):
        key, changed = key[len(prefix):], True
  return key


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a state_dict file into (tensors as float/int numpy arrays, metadata entries)."""
  if not os.path.isfile(path):
    raise UserError(f'{path}: no such file')
  lower = path.lower()
  if lower.endswith(SAFETENSORS_SUFFIX):
    tensors, extras = _load_safetensors(path)
  elif lower.endswith(TORCH_SUFFIXES):
    torch = _import_torch()
    raw = _unwrap(_load_torch_file(path), path)
    tensors, extras = {}, {}
    for key, value in raw.items():
      key = _strip_prefixes(str(key))
      if key in METADATA_KEYS:
        extras[key] = value.tolist() if hasattr(value, 'tolist') else value
      elif isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
          value = value.float()
        tensors[key] = value.detach().cpu().numpy()
      else:
        raise UserError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor; '
                        'expected a UNet state_dict')
  else:
    raise UserError(f'{path}: unknown file type; expected one of '
                    f'{", ".join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}')
  tensors = {_strip_prefixes(k): v for k, v in tensors.items()}
  if not tensors:
    raise UserError(f'{path}: holds no tensors; expected a UNet state_dict')
  return tensors, extras


def write_state_dict(path: str, tensors: Mapping[str, np.ndarray],
                     extras: Mapping[str, Any]) -> None:
  """Writes tensors (+ metadata entries) as .pth/.pt/.bin or .safetensors, chosen by suffix."""
  lower = path.lower()
  # Serialised in memory, then written by Python: a full disk is then an OSError saying so
  # (torch.save's own writer reports only "iostream error").
  if lower.endswith(SAFETENSORS_SUFFIX):
    from safetensors.numpy import save
    meta = {'format': 'pt', **{k: json.dumps(v) for k, v in extras.items()}}
    data = save({k: np.array(v, copy=True) for k, v in tensors.items()}, metadata=meta)
  elif lower.endswith(TORCH_SUFFIXES):
    torch = _import_torch()
    from collections import OrderedDict
    state = OrderedDict((k, torch.from_numpy(np.array(v, copy=True))) for k, v in tensors.items())
    for key, value in extras.items():
      state[key] = value
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
  else:
    raise UserError(f'{path}: unknown output type; use a .pth or .safetensors file name')
  with open(path, 'wb') as f:
    f.write(data)

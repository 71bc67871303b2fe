"""PyTorch <-> Flax conversion of UNet checkpoints, and its command line.

    python -m unet_jax.convert torch-to-flax model.pth out/
    python -m unet_jax.convert flax-to-torch out/ model.pth      # or model.safetensors

torch -> flax -> torch gives back the same tensors bit for bit. Every failure is one line on
stderr, exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unet_jax.ct_normalization import CTStatistics
from unet_jax.errors import UserError, disk_error, quiet_failed_saves
from unet_jax.file_modes import replaced_on_success
from unet_jax.image_io import NORMALIZATIONS, check_normalize_flag
from unet_jax.model import DEEP_SUPERVISION_HEAD
from unet_jax.regions import Painting, as_regions, label_classes, painting, parse_regions
from unet_jax.torch_keys import (
  Layout,
  Row,
  detect_layout,
  infer_model_config,
  key_table,
  nested_unet_prefix,
  to_flax,
  to_torch,
)

_COUNTER = np.int64  # PyTorch stores num_batches_tracked as int64


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def state_dict_to_flax(tensors: Mapping[str, np.ndarray], source: str = 'state_dict',
                       ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Maps a UNet state_dict (seed or milesial names) to Flax.

  Returns:
    (model config, variables {'params', 'batch_stats'}, metadata) where metadata holds the
    source layout and each BatchNorm's num_batches_tracked, so the way back is exact.
  """
  from unet_jax.checkpoint import abstract_variables, check_variables, model_from_config
  # A UNet inside a larger module (a Lightning module, a model with a loss that has weights):
  # its own tensors are taken, the other modules' left out.
  prefix = nested_unet_prefix(tensors.keys(), source)
  if prefix:
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  layout = detect_layout(tensors.keys(), source)
  config = infer_model_config(tensors, layout, source)
  rows = key_table(layout=layout, **{k: config[k] for k in ('depth', 'upsample', 'conv_bias')})
  known = {r.torch_key for r in rows}
  for row in rows:
    if row.torch_key not in tensors:
      raise UserError(f'{source}: missing key {row.torch_key!r} (expected in a {layout}-layout '
                      f'UNet of depth {config["depth"]}, upsample={config["upsample"]})')
  for key in tensors:
    if key not in known:
      heads = (' (deep supervision heads are for training only: leave them out of the file, '
               'and convert the network without them)' if key.startswith(DEEP_SUPERVISION_HEAD)
               else '')
      raise UserError(f'{source}: unexpected key {key!r} for a {layout}-layout UNet of depth '
                      f'{config["depth"]}, upsample={config["upsample"]}{heads}')

  model = model_from_config(config)
  expected = abstract_variables(model)
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  counters: dict[str, int] = {}
  for row in rows:
    value = tensors[row.torch_key]
    if row.kind == 'counter':
      counters['/'.join(row.path)] = int(np.asarray(value).reshape(()))
      continue
    want = _get(expected[row.collection], row.path)
    if value.ndim != len(want.shape):
      raise UserError(f'{source}: key {row.torch_key!r} has shape {tuple(value.shape)}, which '
                      f'does not fit {row.flax_name} {tuple(want.shape)}')
    array = np.ascontiguousarray(to_flax(row.kind, value)).astype(np.float32)
    if array.shape != tuple(want.shape):
      torch_shape = tuple(to_torch(row.kind, np.empty(want.shape)).shape)
      raise UserError(f'{source}: key {row.torch_key!r} has shape {tuple(value.shape)}, the model '
                      f'inferred from the file expects {torch_shape}')
    _set(variables[row.collection], row.path, array)
  check_variables(variables, expected, source)
  metadata = {'source_layout': layout, 'num_batches_tracked': counters}
  if prefix:
    metadata['source_prefix'] = prefix
  return config, variables, metadata


def flax_to_state_dict(config: Mapping[str, Any], variables: Mapping[str, Any], layout: Layout,
                       num_batches_tracked: Mapping[str, int] | None = None,
                       default_count: int = 0) -> dict[str, np.ndarray]:
  """The inverse of `state_dict_to_flax`: ordered as PyTorch lists it, float32 + int64 counters.

  BatchNorm counters come from `num_batches_tracked` (kept by torch-to-flax), else
  `default_count` (for weights trained here, the updates applied: what PyTorch would count).
  """
  counters = dict(num_batches_tracked or {})
  rows: list[Row] = key_table(layout=layout, depth=config['depth'], upsample=config['upsample'],
                              conv_bias=config['conv_bias'])
  out = {}
  for row in rows:
    if row.kind == 'counter':
      out[row.torch_key] = np.asarray(counters.get('/'.join(row.path), default_count), _COUNTER)
    else:
      value = np.asarray(_get(variables[row.collection], row.path))
      out[row.torch_key] = np.ascontiguousarray(to_torch(row.kind, value))
  return out


def parse_mask_values(text: str) -> list:
  """--mask_values: '0,255' (gray values) or '#000000,#ff0000' (colours, kept as [r, g, b] as
  milesial's mask_values keeps them)."""
  values: list = []
  for item in text.split(','):
    item = item.strip()
    try:
      if item.startswith('#') and len(item) == 7:
        values.append([int(item[i:i + 2], 16) for i in (1, 3, 5)])
        continue
      if item.isdigit() and int(item) <= 255:
        values.append(int(item))
        continue
    except ValueError:
      pass
    raise UserError(f'--mask_values {text}: {item!r} is neither a gray value 0-255 nor a colour '
                    '#rrggbb; give one per class, e.g. 0,255 or #000000,#ff0000')
  if len({type(v) for v in values}) > 1:
    raise UserError(f'--mask_values {text}: mixes gray values and colours; give one kind')
  if len({str(v) for v in values}) != len(values):
    raise UserError(f'--mask_values {text}: a value more than once; give each class its own')
  return values


def _check_class_labels(config: Mapping[str, Any], metadata: Mapping[str, Any],
                        class_names: Sequence[str], mask_values: list | None, src: str,
                        labels: int | None = None) -> None:
  """One name per output channel and one mask value per class (`labels` of them, a region
  model's; else its output channels', 2 for one), and no other values than the file's own."""
  from unet_jax.config_checks import check_class_names
  classes = max(config['num_classes'], 2)  # (one output channel: background and foreground)
  why = f'{src} has {config["num_classes"]} output channel(s)'
  check_class_names(class_names, classes, '--class_names', why)
  own_names = metadata.get('class_names')
  if own_names is not None:  # (a .safetensors header's, as flax-to-torch writes them)
    check_class_names(own_names, classes, f'{src}: its class_names', why)
    if class_names and list(class_names) != own_names:
      raise UserError(f'{src}: holds its own class_names {own_names}, not '
                      f'{list(class_names)}; leave out --class_names')
  if mask_values is None:
    return
  if labels is not None:
    classes, why = labels, f'the regions cover class ids 0..{labels - 1}'
  if len(mask_values) != classes:
    raise UserError(f'--mask_values gives {len(mask_values)} value(s) but there are {classes} '
                    f'classes ({why}); give one per class, in class-id order')
  own = metadata.get('mask_values')
  if own is not None and own != mask_values:
    raise UserError(f'{src}: holds its own mask_values {own}, not {mask_values}; leave out '
                    '--mask_values')


def _check_file_normalization(extras: Mapping[str, Any], flag: str | None, src: str,
                              channels: int) -> None:
  """A file's recorded normalisation (a .safetensors header's `normalize`, with 'ct' its
  `ct_statistics`, one per of the model's `channels`): one this project knows, and not
  another than --normalize says."""
  recorded = extras.get('normalize')
  if recorded is None:
    return
  if recorded not in NORMALIZATIONS:
    raise UserError(f'{src}: its header records normalize {recorded!r}, which this project does '
                    f"not know ({', '.join(NORMALIZATIONS)}); remove it from the header")
  if flag is not None and flag != recorded:
    raise UserError(f"{src}: records that its images were normalised '{recorded}', not "
                    f"'{flag}'; leave out --normalize")
  if recorded == 'ct':
    statistics = extras.get('ct_statistics')
    try:
      counts = {len(values) for values in CTStatistics.from_dict(statistics)}
    except (TypeError, KeyError, ValueError, AttributeError):
      raise UserError(f"{src}: records normalize 'ct' without its ct_statistics (mean, std, "
                      'percentile_00_5, percentile_99_5, a list per channel); write it with '
                      'flax-to-torch from the training run') from None
    if counts != {channels}:
      raise UserError(f"{src}: its ct_statistics give {' or '.join(map(str, sorted(counts)))} "
                      f'channel(s), but the model takes {channels}; write it with '
                      'flax-to-torch from the training run')


def _file_regions(config: Mapping[str, Any], extras: Mapping[str, Any],
                  regions: Sequence[Sequence[int]] | None, order: Sequence[int], src: str,
                  ) -> Painting | None:
  """The regions of the model's channels (--regions, or a .safetensors header's, as
  flax-to-torch writes a region run's) and the class each paints; None for a model of
  classes. Refused where they do not fit the model, or differ from the file's own."""
  own = as_regions(extras.get('regions'))
  given = as_regions(regions)
  if own and given and own != given:
    raise UserError(f'{src}: its header records regions {[list(r) for r in own]}, not '
                    f'{[list(r) for r in given]}; leave out --regions')
  chosen = given or own
  if not chosen:
    if order:
      raise UserError('--region_class_order orders --regions, which are not given')
    return None
  return painting(chosen, tuple(order) or tuple(extras.get('region_class_order') or ()),
                  config['num_classes'], src, '--region_class_order', f'{src}: regions')


def torch_to_flax(src: str, dest: str, overwrite: bool = False,
                  class_names: Sequence[str] = (), mask_values: list | None = None,
                  normalize: str | None = None, regions: Sequence[Sequence[int]] | None = None,
                  region_class_order: Sequence[int] = ()) -> str:
  """Converts a PyTorch UNet state_dict file into a checkpoint directory for `load_pretrained`.

  `class_names`, `mask_values`: one per class, kept as a trained checkpoint keeps them (predict
  writes each class as its mask value; export's model.json names the classes): a state_dict
  holds neither (milesial's may hold mask_values). `normalize`: how the model's images were
  normalised ('zscore': each image's channels to mean 0 and deviation 1; 'minmax': stretched
  to [0, 1]), kept as a training run's data.normalize, so predict, evaluate and export give
  it its images so; None: as the file's header records it (a .safetensors that flax-to-torch
  wrote: a run's own, 'ct' with its statistics), else 'unit'. `regions` (and
  `region_class_order`): the channels are regions (regions.py), as a data.regions run's are,
  so predict paints their masks and evaluate scores each; default: as the header records."""
  from unet_jax.checkpoint import model_from_config, save_pretrained
  from unet_jax.state_dict_io import read_state_dict
  if os.path.exists(dest) and not overwrite:
    raise UserError(f'{dest}: already exists; choose another destination or pass --overwrite')
  if normalize is not None:
    check_normalize_flag(normalize)
  tensors, extras = read_state_dict(src)
  config, variables, metadata = state_dict_to_flax(tensors, src)
  _check_file_normalization(extras, normalize, src, config['in_channels'])
  painted = _file_regions(config, extras, regions, region_class_order, src)
  metadata.update(extras, source_entries=sorted(extras))  # (what the file held besides tensors)
  _check_class_labels(config, metadata, class_names, mask_values, src,
                      label_classes(painted.regions) if painted else None)
  if painted:
    metadata['regions'] = [list(r) for r in painted.regions]
    metadata['region_class_order'] = list(painted.order)
  if mask_values is not None:
    metadata['mask_values'] = mask_values
  if class_names:
    metadata['class_names'] = list(class_names)
  if normalize not in (None, 'unit'):  # (none recorded: scaled to [0, 1], as before the flag)
    metadata['normalize'] = normalize
  return save_pretrained(dest, model_from_config(config), variables, metadata, overwrite)


def flax_to_torch(src: str, dest: str, layout: str = 'auto', overwrite: bool = False) -> str:
  """Writes a checkpoint directory as a PyTorch state_dict (.pth/.pt/.bin or .safetensors).

  layout: 'seed', 'milesial', or 'auto' (the layout it was converted from, or for a workdir
  the layout of the PyTorch weights its run started from; else 'seed').
  """
  from unet_jax.checkpoint import INIT_LAYOUT, load_pretrained_with_metadata, model_config
  from unet_jax.state_dict_io import (
    METADATA_KEYS,
    SAFETENSORS_METADATA_KEYS,
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    write_state_dict,
  )
  if not dest.lower().endswith(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)):
    raise UserError(f'{dest}: unknown output type; use a .pth or .safetensors file name')
  if os.path.exists(dest) and not overwrite:
    raise UserError(f'{dest}: already exists; choose another destination or pass --overwrite')
  if layout not in ('auto', 'seed', 'milesial'):
    raise UserError(f"unknown layout {layout!r}; use 'seed', 'milesial' or 'auto'")
  model, variables, metadata = load_pretrained_with_metadata(src)
  if layout == 'auto':
    layout = metadata.get('source_layout') or metadata.get(INIT_LAYOUT) or 'seed'
  tensors = flax_to_state_dict(model_config(model), variables, layout,  # type: ignore[arg-type]
                               metadata.get('num_batches_tracked'),
                               metadata.get('applied_updates', 0))
  if model.deep_supervision:  # (the layouts have no place for them; predict never reads them)
    heads = sorted(k for k in variables['params'] if k.startswith(DEEP_SUPERVISION_HEAD))
    print(f'note: {src}: its deep supervision heads ({", ".join(heads)}) are for training only '
          'and left out', file=sys.stderr, flush=True)
  safetensors = dest.lower().endswith(SAFETENSORS_SUFFIX)
  kept = SAFETENSORS_METADATA_KEYS if safetensors else METADATA_KEYS
  extras = {k: metadata[k] for k in kept if k in metadata}
  # In a .pth, mask_values is an entry of the state_dict itself: milesial's predict.py pops it
  # before load_state_dict, but the seed's class would refuse it in a strict load. So a
  # seed-layout .pth carries it only if the file it was converted from did (the way back stays
  # exact; not where torch-to-flax's --mask_values gave it); .safetensors keep it in their
  # header, which load_state_dict never sees. (Conversions before `source_entries`: a
  # converted checkpoint's mask_values were the file's.)
  from_file = metadata.get('source_entries',
                           ['mask_values'] if 'source_layout' in metadata else [])
  if layout == 'seed' and not safetensors and 'mask_values' not in from_file:
    extras.pop('mask_values', None)
  if extras.get('normalize') == 'unit':  # (the default: said by saying nothing)
    extras.pop('normalize')
  if metadata.get('regions') and not safetensors:
    kind = os.path.splitext(dest)[1]
    print(f'note: {src}: its channels are regions {metadata["regions"]}, which a {kind} file '
          'cannot record; write a .safetensors to keep them (torch-to-flax reads them back), '
          'or give --regions when converting it back', file=sys.stderr, flush=True)
  dest_dir = os.path.dirname(os.path.abspath(dest))
  if not os.path.isdir(dest_dir):
    raise UserError(f'{dest_dir}: no such directory for the destination')
  with replaced_on_success(dest, '.convert-') as tmp:
    write_state_dict(tmp, tensors, extras)
  return os.path.abspath(dest)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m unet_jax.convert',
      description='Convert UNet checkpoints between PyTorch and Flax (numerically identical).')
  sub = parser.add_subparsers(dest='command', required=True)
  t2f = sub.add_parser('torch-to-flax', help='PyTorch state_dict file -> checkpoint directory')
  t2f.add_argument('src', help='.pth/.pt/.bin (torch.save of a state_dict) or .safetensors')
  t2f.add_argument('dest', help='checkpoint directory to create')
  t2f.add_argument('--class_names', type=lambda text: text.split(','), default=[],
                   metavar='NAME,NAME,...', help="each class's name, in class-id order, for "
                   "export's model.json (e.g. background,liver,tumour)")
  t2f.add_argument('--mask_values', default=None, metavar='V,V,...',
                   help="each class's value in the masks predict writes, in class-id order: "
                   'gray 0-255 (e.g. 0,1,2) or colours (#000000,#ff0000); default: the '
                   "file's own (milesial's), else 0,255 for two classes, spread grays for more")
  t2f.add_argument('--normalize', default=None, help="how the model's images were "
                   "normalised: 'unit' (scaled to [0, 1]), 'zscore' (then each image's "
                   "channels to mean 0 and deviation 1, as nnU-Net) or 'minmax' (then each "
                   "image's channels stretched to [0, 1], nnU-Net's rescale_to_0_1); predict, "
                   'evaluate and export then do the same (default: as a .safetensors header '
                   "that flax-to-torch wrote records it, a 'ct' run's with its statistics, "
                   "else 'unit')")
  t2f.add_argument('--regions', default=None, metavar='C,C;C;...',
                   help="the model's channels are regions, each the sigmoid of a set of class "
                   "ids (as a data.regions run's): e.g. '1,2,3;2,3;3' for BraTS's whole "
                   'tumour, tumour core, enhancing; predict paints their masks (default: as a '
                   ".safetensors header records them, else none)")
  t2f.add_argument('--region_class_order', default='', metavar='C,C,...',
                   help="with --regions: the class each region's pixels paint, in order "
                   "(nnU-Net's regions_class_order; default: the one class each covers that no "
                   'later region does)')
  f2t = sub.add_parser('flax-to-torch', help='checkpoint directory -> PyTorch state_dict file')
  f2t.add_argument('src', help='checkpoint directory (from torch-to-flax or training)')
  f2t.add_argument('dest', help='.pth or .safetensors file to create')
  f2t.add_argument('--layout', default='auto', choices=('auto', 'seed', 'milesial'),
                   help="key names to write (default: the source's, else the seed's)")
  for p in (t2f, f2t):
    p.add_argument('--overwrite', action='store_true', help='replace DEST if it exists')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    with quiet_failed_saves():  # a full disk: the line below, not Orbax's thread logs
      _run(args)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


def _class_order(text: str) -> tuple[int, ...]:
  """--region_class_order '1,2,3' -> (1, 2, 3); '' -> ()."""
  if not text:
    return ()
  try:
    return tuple(int(c) for c in text.split(','))
  except ValueError:
    raise UserError(f"--region_class_order {text!r}: give each region's class, "
                    "comma-separated, e.g. '1,2,3'") from None


def _run(args: argparse.Namespace) -> None:
  try:
    if args.command == 'torch-to-flax':
      values = None if args.mask_values is None else parse_mask_values(args.mask_values)
      out = torch_to_flax(args.src, args.dest, overwrite=args.overwrite,
                          class_names=args.class_names, mask_values=values,
                          normalize=args.normalize, regions=None if args.regions is None
                          else parse_regions(args.regions, '--regions'),
                          region_class_order=_class_order(args.region_class_order))
      from unet_jax.checkpoint import read_checkpoint_info
      prefix = read_checkpoint_info(out)['metadata'].get('source_prefix')
      taken = f" (the UNet under '{prefix}' in {args.src})" if prefix else ''
      print(f'wrote {out}{taken}; load it with unet_jax.load_pretrained({out!r})')
    else:
      out = flax_to_torch(args.src, args.dest, layout=args.layout, overwrite=args.overwrite)
      print(f'wrote {out}')
  except Exception as e:
    full = disk_error(e)
    if full is None:
      raise
    raise UserError(f'{args.dest}: cannot write ({full}); nothing was written; free space or '
                    'choose another destination') from None


if __name__ == '__main__':
  sys.exit(main())

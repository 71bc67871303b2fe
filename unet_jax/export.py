"""Exports a checkpoint's network as one self-contained file for serving: a serialized
`jax.export` artifact (StableHLO) with the weights inside, callable with JAX alone.

    python -m unet_jax.export workdirs/base model.jax [--size 64] [--platforms cpu,cuda]

and wherever it is served (no unet_jax, no flax, no checkpoint):

    exp = jax.export.deserialize(open('model.jax', 'rb').read())
    logits = exp.call(images)  # (N, S, S, C) float32 in [0, 1] -> (N, S, S, classes), any N

Beside it, `model.json` says what the artifact takes and gives: size, channels, classes, the
mask values that class ids stand for (and the classes' names, where the run named them), the
platforms, the checkpoint it came from. The batch dimension is symbolic; height and width are
fixed at `--size` (default: the run's image_size, the size the network saw in training), since
the network's kernels are chosen per shape.
Several checkpoints export their ensemble (ensemble.py): its output is the log of the mean of
their probabilities, which the same sigmoid or softmax turns into that mean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from unet_jax.ct_normalization import CTStatistics, recorded_normalization
from unet_jax.errors import UserError
from unet_jax.file_modes import replaced_on_success
from unet_jax.image_io import height_width, normalized, parse_size
from unet_jax.regions import as_regions

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise UserError(f'--platforms {",".join(platforms)}: choose among {", ".join(PLATFORMS)} '
                    '(e.g. --platforms cpu,cuda)')
  return tuple(dict.fromkeys(platforms))


def export_checkpoint(checkpoint: str | Sequence[str], size: int | Sequence[int] | None = None,
                      platforms: Sequence[str] | None = None) -> tuple[bytes, dict[str, Any]]:
  """The serialized artifact of `checkpoint`'s eval-mode network (logits) at `size` x `size`
  (or (height, width)), any batch, and its description. `platforms`: the ones it runs on
  (default: this machine's). Several checkpoints: their ensemble, whose logits are the log of
  their mean probabilities."""
  import jax
  import jax.numpy as jnp
  from jax import export

  from unet_jax.checkpoint import model_config
  from unet_jax.ensemble import Ensemble, load_one_task
  platforms = _check_platforms(platforms or (jax.default_backend(),))
  paths = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
  loaded = load_one_task(paths)
  model, variables, meta = loaded[0]
  sizes = {json.dumps(m.get('image_size')) for _, _, m in loaded}
  if size is None and len(sizes) > 1:
    raise UserError(f'{" and ".join(paths)} were trained at other sizes '
                    f'({", ".join(sorted(sizes))}); give the one to export at with --size')
  size = size or meta.get('image_size')  # (a workdir's: an int, or [height, width])
  if not size:
    raise UserError(f'{paths[0]}: a converted checkpoint records no image size; give one '
                    'with --size (a multiple of 2**depth is exact, as in training)')
  height, width = height_width(size)
  depth = max(m.depth for m, _, _ in loaded)
  if min(height, width) < 2**depth:
    raise UserError(f'--size {size} is below the model\'s minimum {2**depth} '
                    f'(2**depth, depth={depth})')
  # Winograd's conv is the CPU's kernel; XLA's own conv computes the same on every platform.
  members = [m if platforms == ('cpu',) else m.clone(wide_convs='xla') for m, _, _ in loaded]
  model = members[0]
  regions = as_regions(meta.get('regions'))  # (one task's members have the same)
  network = (model if len(members) == 1 else Ensemble(tuple(members), regions=regions))
  weights = variables if len(members) == 1 else tuple(v for _, v, _ in loaded)
  named = {tuple(m.get('class_names') or ()) for _, _, m in loaded}
  class_names = named.pop() if len(named) == 1 else ()  # (members named otherwise: none)
  (batch,) = export.symbolic_shape('n')
  images = jax.ShapeDtypeStruct((batch, height, width, model.in_channels), jnp.float32)
  # The weights are closed over, so they travel inside the artifact as constants.
  # A run with data.normalize='zscore' (or 'minmax', 'ct') normalises each image inside the
  # artifact, so that a server gives it images scaled to [0, 1] whichever way the run trained.
  how = recorded_normalization(meta)  # (one task's members normalise alike)
  forward = jax.jit(lambda x: network.apply(weights, normalized(x, how),
                                            train=False).astype(jnp.float32))
  exported = export.export(forward, platforms=platforms)(images)
  description = {
      'format': 'jax.export', 'input': f'(N, {height}, {width}, {model.in_channels}) float32, '
      'images scaled to [0, 1]', 'output': f'(N, {height}, {width}, {model.num_classes}) '
      'float32 logits (' + ('each region: sigmoid' if regions else
                            'one channel: sigmoid; several: softmax') + ')',
      'size': size,
      'height': height, 'width': width,
      'in_channels': model.in_channels, 'num_classes': model.num_classes,
      'mask_values': meta.get('mask_values') or [],
      **({'mask_palette': meta['mask_palette']} if meta.get('mask_palette') else {}),
      # The classes' names, where the run named them (data.class_names or a dataset.json) and,
      # for an ensemble, every member by the same names.
      **({'class_names': list(class_names)} if class_names else {}),
      # How training resized its images (PIL's filter), for a server to do the same.
      **({'resample': meta['resample']} if meta.get('resample') else {}),
      # (done inside the artifact, said for whoever reads the logits' provenance)
      **({'normalize': f'{meta["normalize"]}, inside the artifact'} if how != 'unit' else {}),
      **({'ct_statistics': how.to_dict()} if isinstance(how, CTStatistics) else {}),
      # A region model's channels, and the class each paints into a mask, in this order.
      **({'regions': meta['regions'], 'region_class_order': meta['region_class_order']}
         if regions else {}),
      'platforms': list(platforms),
      'model': model_config(model), 'checkpoint': os.path.abspath(paths[0]),
      'step': meta.get('step'), 'jax_version': jax.__version__}
  if len(paths) > 1:  # (what each member is; the output is the log of their mean probabilities)
    description.update(
        output=f'(N, {height}, {width}, {model.num_classes}) float32, the log of the mean of '
        'the members\' probabilities (one channel or region: its logit; sigmoid or softmax gives '
        'that mean)',
        ensemble=[{'checkpoint': os.path.abspath(p), 'step': m.get('step'),
                   'model': model_config(member)}
                  for p, member, (_, _, m) in zip(paths, members, loaded, strict=True)])
  return bytes(exported.serialize()), description


def _write_atomically(files: dict[str, bytes]) -> None:
  """Each file written to a temporary name first; renamed only once all are complete."""
  try:
    with contextlib.ExitStack() as renames:
      for path, data in files.items():
        with open(renames.enter_context(replaced_on_success(path, '.export-')), 'wb') as f:
          f.write(data)
  except OSError as e:
    raise UserError(f'{next(iter(files))}: cannot write ({e.strerror}); nothing was '
                    'written') from None


def description_path(dest: str) -> str:
  """model.jax -> model.json (the artifact's description beside it)."""
  return os.path.splitext(dest)[0] + '.json'


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m unet_jax.export',
      description='Export a checkpoint as one jax.export file, callable with JAX alone.')
  parser.add_argument('checkpoint', nargs='+', help='training workdir (or '
                      'WORKDIR/checkpoints/STEP, .../best) or converted checkpoint directory; '
                      'several: their ensemble (the mean of their probabilities)')
  parser.add_argument('dest', help='file to create, e.g. model.jax (model.json beside it)')
  parser.add_argument('--size', type=parse_size, default=None,
                      help="input height and width: S, or HEIGHTxWIDTH (default: the run's "
                           'image_size or image_shape)')
  parser.add_argument('--platforms', default=None,
                      help="comma-separated, of cpu, cuda, rocm, tpu (default: this machine's)")
  parser.add_argument('--overwrite', action='store_true', help='replace DEST if it exists')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    dest, about = os.path.abspath(args.dest), description_path(os.path.abspath(args.dest))
    if not os.path.isdir(os.path.dirname(dest)):
      raise UserError(f'{os.path.dirname(dest)}: no such directory for the destination')
    if dest == about:
      raise UserError(f'{args.dest}: name the artifact with a suffix, e.g. model.jax (its '
                      'description goes to model.json)')
    existing = [p for p in (dest, about) if os.path.exists(p)]
    if existing and not args.overwrite:
      raise UserError(f'{existing[0]}: exists; pass --overwrite to replace it')
    if args.platforms is not None:
      _check_platforms(args.platforms.split(','))
    data, description = export_checkpoint(
        args.checkpoint, args.size, args.platforms.split(',') if args.platforms else None)
    _write_atomically({dest: data,
                       about: (json.dumps(description, indent=2) + '\n').encode()})
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {dest} ({len(data) / 2**20:.1f} MiB; {", ".join(description["platforms"])}; '
        f'(N, {description["height"]}, {description["width"]}, {description["in_channels"]}) '
        'float32 images -> logits) and '
        f'{about}\nload it with: jax.export.deserialize(open({dest!r}, "rb").read()).call(images)')
  return 0


if __name__ == '__main__':
  sys.exit(main())

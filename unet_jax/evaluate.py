"""Scores a checkpoint on a dataset split: the Dice, IoU and accuracies of training's evaluation.

    python -m unet_jax.evaluate --checkpoint workdirs/base/checkpoints/best
    python -m unet_jax.evaluate --checkpoint converted/ --config configs/folder.py \\
        --config.data.root=my_data --config.image_size=256 --split all

A training workdir's own run config says which dataset, split and image size it was evaluated
on, so a checkpoint scores here exactly what the run logged for it. A converted checkpoint
records no dataset: `--config` names one (any training config; its model fields are ignored,
the checkpoint's are used).
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import jax
import ml_collections

from unet_jax import input_pipeline, losses, parallel
from unet_jax.errors import UserError

ALL_SPLITS = 'all'


def _run_config(meta: dict[str, Any], config: ml_collections.ConfigDict | None,
                checkpoint: str) -> ml_collections.ConfigDict:
  if config is not None:
    return ml_collections.ConfigDict(config.to_dict())
  if not meta.get('run_config'):
    raise UserError(f'{checkpoint}: a converted checkpoint records no dataset; name one with '
                    '--config (e.g. --config configs/folder.py --config.data.root=DIR '
                    '--config.image_size=SIZE)')
  return ml_collections.ConfigDict(meta['run_config'])


def evaluate_checkpoint(checkpoint: str, config: ml_collections.ConfigDict | None = None,
                        split: str | None = None) -> dict[str, Any]:
  """Scores `checkpoint` on `split` (default: the config's data.eval_split; 'all': every
  split together) at the config's image_size, over all local devices.

  `config`: the data settings (a training config); None takes a workdir's own.
  Returns the metrics (as in metrics.jsonl, without the `eval_` prefix) plus `images`,
  `image_size`, `split`, `dataset` and `step` (None for a converted checkpoint).
  """
  from unet_jax.checkpoint import load_pretrained_with_metadata, model_config
  from unet_jax.train import build_model, eval_step, evaluation_sums
  model, variables, meta = load_pretrained_with_metadata(checkpoint)
  config = _run_config(meta, config, checkpoint)
  config.model.update(model_config(model))  # the checkpoint's network, whatever the config says
  mesh = parallel.make_mesh(jax.local_devices())
  # The run's eval batch, rounded up to fill every device here (the last batch is padded and
  # its padding left out of the scores, so the batch size changes nothing but speed).
  n = mesh.devices.size
  config.eval_batch_size = -(-(config.get('eval_batch_size') or config.batch_size) // n) * n
  if config.image_size < 2**model.depth:
    raise UserError(f'image_size={config.image_size} is below the model\'s minimum '
                    f'{2**model.depth}')
  split = split or config.data.eval_split
  config.data.eval_split = config.data.train_split  # (a split that exists, for `info` first)
  _, _, info = input_pipeline.load_sources(config)
  if split != ALL_SPLITS and split not in info.splits:
    raise UserError(f'dataset {info.name!r} has no split {split!r} (it has '
                    f"{', '.join(info.splits)}); choose one with --split, or --split all")
  if info.channels != model.in_channels:
    raise UserError(f'dataset {info.name!r} has {info.channels}-channel images but the '
                    f'checkpoint\'s model takes {model.in_channels}')
  if len(info.mask_values) > max(model.num_classes, 2):
    raise UserError(f'dataset {info.name!r} masks hold {len(info.mask_values)} values '
                    f'{info.mask_values[:8]} but the checkpoint\'s model has '
                    f'{model.num_classes} output class(es)')
  variables = jax.device_put(variables, parallel.replicated(mesh))
  p_eval = parallel.distribute(
      functools.partial(eval_step, model=build_model(config, None), ignore_id=info.ignore_id),
      mesh, config.get('parallel', 'shard_map'), donate_state=False)
  sums = None
  for name in info.splits if split == ALL_SPLITS else (split,):
    config.data.eval_split = name
    source = input_pipeline.load_sources(config)[1]
    part = evaluation_sums(p_eval, variables, input_pipeline.eval_dataset(source, config))
    sums = part if sums is None else jax.tree.map(lambda a, b: a + b, sums, part)
  metrics: dict[str, Any] = losses.finalize_eval_metrics(sums)
  metrics.update(images=int(sums['count']), image_size=config.image_size, split=split,
                 dataset=info.name, step=meta.get('step'))
  return metrics


def _report(checkpoint: str, metrics: dict[str, Any]) -> str:
  """Two lines for people, then the metrics as one JSON line."""
  step = f' (step {metrics["step"]})' if metrics['step'] is not None else ''
  size = metrics['image_size']
  scores = '  '.join(f'{k} {v:.4f}' for k, v in metrics.items() if isinstance(v, float))
  return (f'{checkpoint}{step} on {metrics["dataset"]!r}, split {metrics["split"]}: '
          f'{metrics["images"]} images at {size}x{size}\n{scores}\n{json.dumps(metrics)}')


def main(argv: list[str]) -> None:
  from absl import app, flags, logging
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  try:
    metrics = evaluate_checkpoint(flags.FLAGS.checkpoint, flags.FLAGS.config, flags.FLAGS.split)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(_report(flags.FLAGS.checkpoint, metrics), flush=True)


if __name__ == '__main__':
  import os

  from absl import app, flags
  from ml_collections import config_flags
  sys.path.insert(0, os.getcwd())  # a config file's `from configs import base`
  flags.DEFINE_string('checkpoint', None, 'training workdir (or WORKDIR/checkpoints/STEP, '
                      '.../best) or converted checkpoint directory', required=True)
  config_flags.DEFINE_config_file('config', None, 'a training config naming the dataset '
                                  '(default: a workdir\'s own)', lock_config=True)
  flags.DEFINE_string('split', None, "the split to score (default: the config's "
                      "data.eval_split; 'all': every split together)")
  app.run(main)

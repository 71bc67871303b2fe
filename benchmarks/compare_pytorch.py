"""Side-by-side benchmark: the seed UNet in PyTorch vs unet_jax, same machine, one run.

    python benchmarks/compare_pytorch.py                      # CPU defaults: 1x128x128, batch 8
    python benchmarks/compare_pytorch.py --size 480 --batch 2 --repeats 2

Each side runs in its own process (so its peak RSS is its own), and the sides alternate
(A B C A B C ...); the table quotes medians over repeats. Sides:
  torch        the seed model (tests/torch_reference.py), Adam, BCE-with-logits, float32
  jax_plain    unet_jax.UNet under a plain jitted optax step, what a researcher would write
  jax_project  the project's own train step (unet_jax.train.train_step via parallel.distribute)
Measured: training images/s, eval images/s, first-step time (compilation included) and peak RSS.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_levers():
  # By path, not `import unet_jax`: the package loads JAX, which would add its memory to the
  # torch worker's peak RSS. unet_jax/levers.py imports nothing.
  spec = importlib.util.spec_from_file_location('unet_jax_levers',
                                                os.path.join(REPO, 'unet_jax', 'levers.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.LEVERS, module.CPU_SCHEDULERS


LEVERS, CPU_SCHEDULERS = _load_levers()
SIDES = ('torch', 'jax_plain', 'jax_project')


def _levers(args) -> dict:
  """The UNet speed-lever settings of this run, as UNet keyword arguments."""
  return {**{name: getattr(args, name) for name in LEVERS}, 'remat': args.remat}


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, steps: int) -> float:
  """Seconds per call, median of `steps` calls (each synchronised)."""
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def run_torch(args) -> dict:
  import torch
  sys.path.insert(0, os.path.join(REPO, 'tests'))
  from torch_reference import SeedUNet
  torch.manual_seed(0)
  model = SeedUNet(args.in_channels, args.num_classes, base=args.base_features)
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  x = torch.randn(args.batch, args.in_channels, args.size, args.size)
  y = (torch.rand(args.batch, args.num_classes, args.size, args.size) > 0.5).float()
  loss_fn = torch.nn.BCEWithLogitsLoss()

  def train_step():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  def eval_step():
    model.eval()
    with torch.no_grad():
      return model(x).sum().item()

  t = time.perf_counter()
  train_step()
  first = time.perf_counter() - t
  return {'first_step_s': first, 'train_step_s': _timed(train_step, args.steps),
          'eval_step_s': _timed(eval_step, args.steps) if not args.train_only else None}


def run_jax(args, project: bool) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from unet_jax import UNet

  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.size, args.size, args.in_channels), np.float32)
  labels = (rng.random((args.batch, args.size, args.size)) > 0.5).astype(np.int32)
  if project:
    from configs import base
    from unet_jax import parallel, train
    config = base.get_config()
    config.model.in_channels, config.model.num_classes = args.in_channels, args.num_classes
    config.model.base_features = args.base_features
    config.model.update(_levers(args))
    config.image_size, config.batch_size = args.size, args.batch
    config.learning_rate, config.schedule = 1e-4, 'constant'
    config.cpu_scheduler = args.cpu_scheduler
    mesh = parallel.make_mesh(jax.devices()[:1])
    model = train.build_model(config, parallel.AXIS)
    state = train.create_train_state(config, model, mesh)
    step = parallel.distribute(functools.partial(train.train_step, model=model, dice_weight=0.0),
                               mesh, compiler_options=train.step_compiler_options(config, mesh))
    batch = {'image': x, 'mask': labels}
    holder = {'state': state}

    def train_step():
      holder['state'], metrics = step(holder['state'], batch)
      return float(metrics['loss'])

    eval_model = train.build_model(config, None)
    eval_fn = jax.jit(lambda v, x: eval_model.apply(v, x, train=False).sum())

    def eval_step():
      s = holder['state']
      return float(eval_fn({'params': s.params, 'batch_stats': s.batch_stats}, x))
  else:
    model = UNet(args.in_channels, args.num_classes, base_features=args.base_features,
                 **_levers(args))
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.size, args.size,
                                                         args.in_channels)), train=False)
    tx = optax.adam(1e-4)
    y = (labels[..., None] == 1).astype(np.float32)

    @jax.jit
    def plain_step(params, batch_stats, opt_state, x, y):
      def loss_fn(p):
        logits, upd = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                                  mutable=['batch_stats'])
        return optax.sigmoid_binary_cross_entropy(logits, y).mean(), upd['batch_stats']
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), stats, opt_state, loss

    holder = {'p': variables['params'], 's': variables['batch_stats'],
              'o': tx.init(variables['params'])}

    def train_step():
      holder['p'], holder['s'], holder['o'], loss = plain_step(holder['p'], holder['s'],
                                                              holder['o'], x, y)
      return float(loss)

    eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False).sum())

    def eval_step():
      return float(eval_fn({'params': holder['p'], 'batch_stats': holder['s']}, x))

  t = time.perf_counter()
  train_step()
  first = time.perf_counter() - t
  if args.train_only:
    return {'first_step_s': first, 'train_step_s': _timed(train_step, args.steps),
            'eval_step_s': None}
  eval_step()  # compile outside the timing
  return {'first_step_s': first, 'train_step_s': _timed(train_step, args.steps),
          'eval_step_s': _timed(eval_step, args.steps)}


def worker(args) -> None:
  sys.path.insert(0, REPO)
  result = run_torch(args) if args.worker == 'torch' else run_jax(
      args, project=args.worker == 'jax_project')
  result['peak_rss_mb'] = _peak_rss_mb()
  print('RESULT ' + json.dumps(result), flush=True)


def _spawn(side: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', side, '--size', str(args.size),
         '--batch', str(args.batch), '--steps', str(args.steps), '--in_channels',
         str(args.in_channels), '--num_classes', str(args.num_classes), '--base_features',
         str(args.base_features)]
  cmd += [f'--{name}={getattr(args, name)}' for name in LEVERS]
  cmd += ['--remat'] if args.remat else []
  cmd += [f'--cpu_scheduler={args.cpu_scheduler}']
  cmd += ['--train_only'] if getattr(args, 'train_only', False) else []
  out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
  lines = [line for line in out.stdout.splitlines() if line.startswith('RESULT ')]
  if out.returncode != 0 or not lines:
    raise SystemExit(f'{side} failed:\n{out.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--size', type=int, default=128)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--steps', type=int, default=5, help='timed steps per measurement')
  p.add_argument('--repeats', type=int, default=3, help='A B C rounds; medians are quoted')
  p.add_argument('--in_channels', type=int, default=1)
  p.add_argument('--num_classes', type=int, default=1)
  p.add_argument('--base_features', type=int, default=64)
  p.add_argument('--sides', default=','.join(SIDES))
  # The speed levers of unet_jax.UNet (jax sides only), to measure each on its own.
  for name, choices in LEVERS.items():
    p.add_argument(f'--{name}', default=choices[0], choices=choices)
  p.add_argument('--remat', action='store_true')
  p.add_argument('--cpu_scheduler', default=CPU_SCHEDULERS[0], choices=CPU_SCHEDULERS,
                 help="jax_project only: XLA's CPU op order (unet_jax/step_compilation.py)")
  p.add_argument('--train_only', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--worker', choices=SIDES, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)

  sides = args.sides.split(',')
  runs: dict[str, list[dict]] = {s: [] for s in sides}
  for r in range(args.repeats):
    order = sides if r % 2 == 0 else sides[::-1]  # A B C, then C B A: no side always first
    for side in order:
      runs[side].append(_spawn(side, args))
      print(f'round {r + 1}: {side} {runs[side][-1]}', file=sys.stderr, flush=True)

  def med(side, key):
    return statistics.median(run[key] for run in runs[side])

  rows = {}
  for side in sides:
    rows[side] = {
        'train_img_per_s': args.batch / med(side, 'train_step_s'),
        'eval_img_per_s': args.batch / med(side, 'eval_step_s'),
        'first_step_s': med(side, 'first_step_s'),
        'peak_rss_mb': med(side, 'peak_rss_mb'),
    }
  ref = rows.get('torch')
  print(f'\n{args.batch}x{args.in_channels}x{args.size}x{args.size}, base_features='
        f'{args.base_features}, Adam, float32, medians of {args.repeats} alternating rounds; '
        f'jax levers: ' + ', '.join(f'{k}={v}' for k, v in _levers(args).items())
        + f'; jax_project cpu_scheduler={args.cpu_scheduler}')
  header = f'{"side":<12} {"train img/s":>12} {"eval img/s":>11} {"first step s":>13} ' \
           f'{"peak RSS MB":>12}'
  print(header)
  for side, row in rows.items():
    print(f'{side:<12} {row["train_img_per_s"]:>12.2f} {row["eval_img_per_s"]:>11.2f} '
          f'{row["first_step_s"]:>13.2f} {row["peak_rss_mb"]:>12.0f}')
  ratios = {}
  if ref:
    for side, row in rows.items():
      if side == 'torch':
        continue
      ratios[side] = {
          'train_ratio': row['train_img_per_s'] / ref['train_img_per_s'],
          'eval_ratio': row['eval_img_per_s'] / ref['eval_img_per_s'],
          'peak_rss_ratio': row['peak_rss_mb'] / ref['peak_rss_mb'],
      }
      print(f'{side} / torch: train {ratios[side]["train_ratio"]:.2f}x, eval '
            f'{ratios[side]["eval_ratio"]:.2f}x, peak RSS {ratios[side]["peak_rss_ratio"]:.2f}x')
  print(json.dumps({'shape': [args.batch, args.in_channels, args.size, args.size],
                    'levers': _levers(args), 'cpu_scheduler': args.cpu_scheduler,
                    'base_features': args.base_features, 'repeats': args.repeats,
                    'results': rows, 'ratios_vs_torch': ratios}))


if __name__ == '__main__':
  main()

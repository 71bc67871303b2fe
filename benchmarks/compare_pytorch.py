"""Side-by-side benchmark: the seed UNet in PyTorch vs unet_jax, same machine, one run.

    python benchmarks/compare_pytorch.py                      # CPU defaults: 1x128x128, batch 8
    python benchmarks/compare_pytorch.py --size 480 --batch 2 --repeats 2
    python benchmarks/compare_pytorch.py --size 480 --batch 16 --precision bf16 \
        --sides torch,torch_compile,jax_plain,jax_project                 # on a GPU

Each side runs in its own process (so its peak memory is its own), and the sides alternate
(A B C, C B A, ...); the table quotes medians over repeats. Sides:
  torch          the seed model (tests/torch_reference.py), Adam, BCE-with-logits; with
                 --precision bf16: autocast to bfloat16 and channels_last (PyTorch AMP)
  torch_compile  the same under torch.compile (opt-in: compiling takes a minute or more)
  jax_plain      unet_jax.UNet under a plain jitted optax step, what a researcher would write
  jax_project    the project's own train step (unet_jax.train.train_step via parallel.distribute)
--deep_supervision: nnU-Net's deep supervision on both sides that support it (torch: the
reference's heads on every decoder level, nnU-Net's weights and nearest-exact labels;
jax_project: model.deep_supervision); jax_plain has none.
--freeze encoder (or modules, comma-separated: in_conv,down1,..): those modules frozen on both
sides that support it (torch: requires_grad_(False), which Adam and autograd skip; jax_project:
config.freeze); jax_plain has none. TFLOP/s and MFU are then left out (the step does less).
Measured: training images/s, eval images/s, first-step time (compilation included), peak RSS,
and on a GPU peak device memory and MFU (model_flops.py: convolution FLOPs per training step over
the card's datasheet peak). Each side uses a GPU when its framework sees one. Prints a table and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
# Neither loads JAX (unet_jax's names load lazily), which would add its memory to the torch
# worker's peak RSS.
import model_flops  # noqa: E402

from unet_jax import huge_pages  # noqa: E402
from unet_jax.levers import CPU_SCHEDULERS, LEVERS  # noqa: E402

SIDES = ('torch', 'torch_compile', 'jax_plain', 'jax_project')
DEFAULT_SIDES = ('torch', 'jax_plain', 'jax_project')


# Every lever on XLA's own op (skip_concat has no 'xla': 'concat' is the plain form).
ALL_XLA_LEVERS = {**{name: 'xla' for name in LEVERS}, 'skip_concat': 'concat'}


def _levers(args) -> dict:
  """The UNet speed-lever settings of this run, as UNet keyword arguments."""
  if args.no_levers:
    return {**ALL_XLA_LEVERS, 'remat': args.remat}
  return {**{name: getattr(args, name) for name in LEVERS}, 'remat': args.remat}


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, sync, steps: int, block: int) -> float:
  """Seconds per call: the median over `steps` timings of `block` calls run back to back.

  `sync` waits for a call's result; it runs once per timing, after the block, so that on a GPU
  the host queues the next step while the device runs this one (as in a real training loop).
  """
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    for _ in range(block):
      out = fn()
    sync(out)
    times.append((time.perf_counter() - t) / block)
  return statistics.median(times)


def _block(args, on_gpu: bool) -> int:
  return args.block or (5 if on_gpu else 1)


def _measure(args, train_step, eval_step, sync, on_gpu: bool) -> dict:
  """First-step time, then training and eval seconds per step (each compiled before timing)."""
  t = time.perf_counter()
  sync(train_step())
  first = time.perf_counter() - t
  if not args.train_only:  # (max_batch.py's probes: first step, one timed, nothing else)
    sync(train_step())  # a second step: anything compiled lazily after the first
  block = _block(args, on_gpu)
  result = {'first_step_s': first, 'train_step_s': _timed(train_step, sync, args.steps, block),
            'eval_step_s': None}
  if not args.train_only:
    sync(eval_step())  # compile outside the timing
    result['eval_step_s'] = _timed(eval_step, sync, args.steps, block)
  return result


def _frozen(args) -> tuple[str, ...]:
  """The modules --freeze names, as the main process expanded them for the workers."""
  return tuple(n for n in args.freeze.split(',') if n)


def torch_steps(size: int, batch: int, in_channels: int, num_classes: int, base: int,
                precision: str, compiled: bool, grad_accum: int = 1,
                deep_supervision: bool = False, frozen: tuple[str, ...] = ()):
  """The seed model's training and eval steps in PyTorch, on the GPU when there is one.

  Returns (train_step, eval_step, model, on_gpu); each step returns an unsynchronised tensor.
  bf16 is PyTorch AMP as its docs recommend for convnets: autocast plus channels_last.
  `grad_accum` > 1: each step's batch in that many chunks, (loss / k).backward() on each.
  `deep_supervision`: nnU-Net's (tests/torch_reference.py's DeepSupervisedSeedUNet: a head on
  every decoder level; the loss over them weighed 1/2**i, the coarsest 0, normalised, against
  the labels interpolated 'nearest-exact', as its DeepSupervisionWrapper).
  `frozen`: modules whose parameters are requires_grad_(False) (given to Adam all the same, as
  a fine-tuning script does: it skips them).
  """
  import torch
  sys.path.insert(0, os.path.join(REPO, 'tests'))
  from torch_reference import DeepSupervisedSeedUNet, SeedUNet, nnunet_deep_supervision_loss
  on_gpu = torch.cuda.is_available()
  device = torch.device('cuda' if on_gpu else 'cpu')
  if on_gpu:
    torch.backends.cudnn.benchmark = True  # what a PyTorch user tuning for speed sets
  torch.manual_seed(0)
  model = (DeepSupervisedSeedUNet if deep_supervision else SeedUNet)(
      in_channels, num_classes, base=base).to(device)
  for name in frozen:
    getattr(model, name).requires_grad_(False)
  x = torch.randn(batch, in_channels, size, size, device=device)
  y = (torch.rand(batch, num_classes, size, size, device=device) > 0.5).float()
  bf16 = precision == 'bf16'
  if bf16:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  forward = torch.compile(model) if compiled else model
  bce = torch.nn.BCEWithLogitsLoss()

  def loss_fn(outputs, y):
    if not deep_supervision:
      return bce(outputs.float(), y)
    return nnunet_deep_supervision_loss(outputs, y, lambda o, t: bce(o.float(), t))

  def autocast():
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

  def train_step():
    model.train()
    opt.zero_grad(set_to_none=True)
    for x_part, y_part in zip(x.chunk(grad_accum), y.chunk(grad_accum), strict=True):
      with autocast():
        loss = loss_fn(forward(x_part), y_part)
      (loss / grad_accum if grad_accum > 1 else loss).backward()
    opt.step()
    return loss

  def eval_step():
    model.eval()
    with torch.no_grad(), autocast():
      return forward(x).float().sum()  # (deep supervision's heads are for training only)

  return train_step, eval_step, model, on_gpu


def run_torch(args) -> dict:
  import torch
  train_step, eval_step, _, on_gpu = torch_steps(
      args.size, args.batch, args.in_channels, args.num_classes, args.base_features,
      args.precision, compiled=args.worker == 'torch_compile', grad_accum=args.grad_accum,
      deep_supervision=args.deep_supervision, frozen=_frozen(args))
  result = _measure(args, train_step, eval_step, lambda t: t.item(), on_gpu)
  if on_gpu:
    result['peak_device_mb'] = torch.cuda.max_memory_allocated() / 2**20
    result['device_name'] = torch.cuda.get_device_name()
  return result


def plain_jax_step(model, tx):
  """What a researcher writes: (params, batch_stats, opt_state, x, y) -> the same, and the loss.

  BCE-with-logits on float32 logits, Adam through optax; jit it (and donate) as you like."""
  import jax
  import jax.numpy as jnp
  import optax

  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, upd = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                                mutable=['batch_stats'])
      loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), y).mean()
      return loss, upd['batch_stats']
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return step


def run_jax(args, project: bool) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from unet_jax import UNet

  on_gpu = jax.default_backend() == 'gpu'
  dtype = jnp.bfloat16 if args.precision == 'bf16' else jnp.float32
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.size, args.size, args.in_channels), np.float32)
  labels = (rng.random((args.batch, args.size, args.size)) > 0.5).astype(np.int32)
  # On the device before timing, as the PyTorch side's tensors are.
  x, labels = jax.device_put(x), jax.device_put(labels)
  if project:
    from configs import base
    from unet_jax import parallel, step_compilation, train
    config = base.get_config()
    config.model.in_channels, config.model.num_classes = args.in_channels, args.num_classes
    config.model.base_features = args.base_features
    config.model.update(_levers(args))
    config.model.deep_supervision = args.deep_supervision
    config.freeze = _frozen(args)
    config.image_size, config.batch_size = args.size, args.batch
    config.learning_rate, config.schedule = 1e-4, 'constant'
    config.half_precision = args.precision == 'bf16'
    config.cpu_scheduler = args.cpu_scheduler
    mesh = parallel.make_mesh(jax.devices()[:1])
    model = train.build_model(config, parallel.AXIS)
    state = train.create_train_state(config, model, mesh)
    step = parallel.distribute(functools.partial(train.train_step, model=model, dice_weight=0.0,
                                                 grad_accum_steps=args.grad_accum,
                                                 frozen=_frozen(args)),
                               mesh, compiler_options=train.step_compiler_options(config, mesh))
    batch = {'image': x, 'mask': labels}
    holder = {'state': state}

    def train_step():
      holder['state'], metrics = step(holder['state'], batch)
      return metrics['loss']

    eval_model = train.build_model(config, None)
    # Compiled as train.py compiles its eval step: with the project's compiler options.
    eval_fn = step_compilation.compile_per_signature(
        jax.jit(lambda v, x: eval_model.apply(v, x, train=False).astype(jnp.float32).sum()),
        train.step_compiler_options(config, mesh))

    def eval_step():
      s = holder['state']
      return eval_fn({'params': s.params, 'batch_stats': s.batch_stats}, x)
  else:
    model = UNet(args.in_channels, args.num_classes, base_features=args.base_features,
                 dtype=dtype, **_levers(args))
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.size, args.size,
                                                         args.in_channels)), train=False)
    tx = optax.adam(1e-4)
    y = (labels[..., None] == 1).astype(jnp.float32)
    plain_step = jax.jit(plain_jax_step(model, tx))

    holder = {'p': variables['params'], 's': variables['batch_stats'],
              'o': tx.init(variables['params'])}

    def train_step():
      holder['p'], holder['s'], holder['o'], loss = plain_step(holder['p'], holder['s'],
                                                              holder['o'], x, y)
      return loss

    eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False).astype(jnp.float32).sum())

    def eval_step():
      return eval_fn({'params': holder['p'], 'batch_stats': holder['s']}, x)

  result = _measure(args, train_step, eval_step, float, on_gpu)
  if on_gpu:
    device = jax.devices()[0]
    result['peak_device_mb'] = device.memory_stats()['peak_bytes_in_use'] / 2**20
    result['device_name'] = device.device_kind
  return result


def worker(args) -> None:
  result = run_torch(args) if args.worker.startswith('torch') else run_jax(
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
  cmd += ['--deep_supervision'] if getattr(args, 'deep_supervision', False) else []
  cmd += [f'--freeze={",".join(args.frozen)}'] if getattr(args, 'frozen', ()) else []
  cmd += [f'--grad_accum={getattr(args, "grad_accum", 1)}']
  cmd += ['--no_levers'] if getattr(args, 'no_levers', False) else []
  cmd += [f'--cpu_scheduler={args.cpu_scheduler}']
  cmd += [f'--precision={getattr(args, "precision", "fp32")}',
          f'--block={getattr(args, "block", 0)}']
  cmd += ['--train_only'] if getattr(args, 'train_only', False) else []
  env = dict(os.environ)
  if getattr(args, 'huge_pages', 'on') == 'on':  # every side alike, as train.py runs
    env = huge_pages.environ_with_huge_pages(env) or env
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
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
  p.add_argument('--sides', default=','.join(DEFAULT_SIDES), help=f'any of {", ".join(SIDES)}')
  p.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'),
                 help='bf16: PyTorch autocast + channels_last; unet_jax dtype=bfloat16 (float32 '
                      'parameters and BatchNorm statistics on both sides)')
  p.add_argument('--block', type=int, default=0,
                 help='steps per timing, synchronised once at the end (0: 1 on CPU, 5 on GPU)')
  # The speed levers of unet_jax.UNet (jax sides only), to measure each on its own.
  for name, choices in LEVERS.items():
    p.add_argument(f'--{name}', default=choices[0], choices=choices)
  p.add_argument('--no_levers', action='store_true',
                 help="every lever above set to XLA's own op (on a GPU, XLA's ops are cuDNN's)")
  p.add_argument('--remat', action='store_true')
  p.add_argument('--deep_supervision', action='store_true',
                 help="nnU-Net's deep supervision (torch and jax_project sides)")
  p.add_argument('--freeze', default='',
                 help='encoder, or modules (in_conv,down1,..) frozen (torch and jax_project)')
  p.add_argument('--grad_accum', type=int, default=1,
                 help='each training step in this many microbatches (torch, jax_project)')
  p.add_argument('--cpu_scheduler', default=CPU_SCHEDULERS[0], choices=CPU_SCHEDULERS,
                 help="jax_project only: XLA's CPU op order (unet_jax/step_compilation.py)")
  p.add_argument('--huge_pages', default='on', choices=('on', 'off'),
                 help="every side's heap on transparent huge pages (glibc), as train.py sets "
                      'it (unet_jax/huge_pages.py); off: the environment as it is')
  p.add_argument('--peak_tflops', type=float, default=0,
                 help="the device's peak for MFU (0: NVIDIA's datasheet figure for known GPUs)")
  p.add_argument('--train_only', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--worker', choices=SIDES, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  if args.freeze:  # (expanded here: the workers' torch side loads no unet_jax module)
    from unet_jax.errors import UserError
    from unet_jax.freezing import freeze_names, frozen_modules, module_names
    try:
      args.frozen = frozen_modules(freeze_names(args.freeze), module_names(4))
    except UserError as e:
      raise SystemExit(f'--freeze: {e}') from None

  sides = args.sides.split(',')
  unknown = [s for s in sides if s not in SIDES]
  if unknown:
    raise SystemExit(f'unknown side {unknown[0]!r}; use any of {", ".join(SIDES)}')
  if args.grad_accum > 1 and 'jax_plain' in sides:
    raise SystemExit('--grad_accum: the jax_plain side has no accumulation; leave it out '
                     '(--sides torch,jax_project)')
  if args.freeze and 'jax_plain' in sides:
    raise SystemExit('--freeze: the jax_plain side freezes nothing; leave it out (--sides '
                     'torch,jax_project)')
  if args.deep_supervision and 'jax_plain' in sides:
    raise SystemExit('--deep_supervision: the jax_plain side has no deep supervision; leave it '
                     'out (--sides torch,jax_project)')
  if args.grad_accum < 1 or args.batch % args.grad_accum:
    raise SystemExit(f'--grad_accum={args.grad_accum} must be at least 1 and divide '
                     f'--batch={args.batch}')
  runs: dict[str, list[dict]] = {s: [] for s in sides}
  failed: dict[str, str] = {}
  for r in range(args.repeats):
    order = sides if r % 2 == 0 else sides[::-1]  # A B C, then C B A: no side always first
    for side in order:
      if side in failed:
        continue
      try:
        runs[side].append(_spawn(side, args))
      except SystemExit as e:  # one side failing (say torch.compile without a C compiler)
        failed[side] = str(e)  # leaves the others' numbers
        print(f'round {r + 1}: {e}', file=sys.stderr, flush=True)
        continue
      print(f'round {r + 1}: {side} {runs[side][-1]}', file=sys.stderr, flush=True)
  sides = [s for s in sides if s not in failed]
  if not sides:
    raise SystemExit('every side failed')

  def med(side, key):
    values = [run[key] for run in runs[side] if run.get(key) is not None]
    return statistics.median(values) if values else None

  flops = model_flops.seed_unet_flops(args.size, args.in_channels, args.num_classes,
                                      args.base_features)
  rows = {}
  for side in sides:
    name = runs[side][0].get('device_name', 'cpu')
    peak = args.peak_tflops or model_flops.peak_tflops(name, args.precision)
    train = args.batch / med(side, 'train_step_s')
    rows[side] = {
        'train_img_per_s': train,
        'eval_img_per_s': args.batch / med(side, 'eval_step_s'),
        # The slowest round's: torch.compile caches its kernels on disk (and jax can, with
        # JAX_COMPILATION_CACHE_DIR), so later rounds may start warm.
        'first_step_s': max(run['first_step_s'] for run in runs[side]),
        'peak_rss_mb': med(side, 'peak_rss_mb'),
        'peak_device_mb': med(side, 'peak_device_mb'),
        'device': name,
        'train_tflop_per_s': None if args.freeze else train * flops['train'] / 1e12,
        'mfu': train * flops['train'] / 1e12 / peak if peak and not args.freeze else None,
    }
  print(f'\n{args.batch}x{args.in_channels}x{args.size}x{args.size}, base_features='
        f'{args.base_features}, Adam, {args.precision}, on {rows[sides[0]]["device"]}, medians '
        f'of {args.repeats} alternating rounds; jax levers: '
        + ', '.join(f'{k}={v}' for k, v in _levers(args).items())
        + f'; jax_project cpu_scheduler={args.cpu_scheduler}; huge pages {args.huge_pages}'
        + (f'; {args.grad_accum} microbatches per step' if args.grad_accum > 1 else '')
        + ("; nnU-Net's deep supervision" if args.deep_supervision else '')
        + (f'; frozen: {" ".join(args.frozen)}' if args.freeze else '')
        + f' (every side); {flops["train"] / 1e9:.1f} GFLOP '
        'per image per training step (convolutions)')
  print(f'{"side":<14} {"train img/s":>12} {"eval img/s":>11} {"first step s":>13} '
        f'{"peak RSS MB":>12} {"peak dev MB":>12} {"TFLOP/s":>8} {"MFU":>6}')

  def fmt(value, spec):
    return '-' if value is None else format(value, spec)

  for side in failed:
    print(f'{side:<14} failed: {failed[side].splitlines()[-1]}')
  for side, row in rows.items():
    print(f'{side:<14} {row["train_img_per_s"]:>12.2f} {row["eval_img_per_s"]:>11.2f} '
          f'{row["first_step_s"]:>13.2f} {row["peak_rss_mb"]:>12.0f} '
          f'{fmt(row["peak_device_mb"], ".0f"):>12} {fmt(row["train_tflop_per_s"], ".3g"):>8} '
          f'{"-" if row["mfu"] is None else format(row["mfu"], ".1%"):>6}')
  ratios = {}
  for ref_side in ('torch', 'torch_compile'):
    ref = rows.get(ref_side)
    if not ref:
      continue
    for side, row in rows.items():
      if not side.startswith('jax'):
        continue
      memory = 'peak_device_mb' if row['peak_device_mb'] and ref['peak_device_mb'] else \
          'peak_rss_mb'
      r = ratios.setdefault(f'{side}/{ref_side}', {
          'train_ratio': row['train_img_per_s'] / ref['train_img_per_s'],
          'eval_ratio': row['eval_img_per_s'] / ref['eval_img_per_s'],
          'memory_ratio': row[memory] / ref[memory], 'memory': memory})
      print(f'{side} / {ref_side}: train {r["train_ratio"]:.2f}x, eval {r["eval_ratio"]:.2f}x, '
            f'{memory} {r["memory_ratio"]:.2f}x')
  print(json.dumps({'shape': [args.batch, args.in_channels, args.size, args.size],
                    'precision': args.precision, 'levers': _levers(args),
                    'cpu_scheduler': args.cpu_scheduler, 'huge_pages': args.huge_pages,
                    'base_features': args.base_features, 'grad_accum': args.grad_accum,
                    'deep_supervision': args.deep_supervision,
                    'frozen': list(getattr(args, 'frozen', ())),
                    'repeats': args.repeats, 'train_gflop_per_image': flops['train'] / 1e9,
                    'results': rows, 'ratios': ratios,
                    'failed': {side: error[-300:] for side, error in failed.items()}}))


if __name__ == '__main__':
  main()

"""Largest training batch that fits a memory budget, PyTorch vs unet_jax, at the seed's 480x480.

    python benchmarks/max_batch.py --budget_mb 8000

For each side, one training step (Adam, float32, 1x480x480, full seed UNet) runs in its own
process at batch 1 and batch 2; peak RSS is about linear in the batch (fixed cost + per image),
which predicts the largest batch within the budget. The prediction is then checked by running
it: one down while over the budget, one up while the next batch still fits, so the batch quoted
is the largest one measured to fit. Sides: torch, jax_project, and jax_project with
`model.remat=True`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import CPU_SCHEDULERS, LEVERS, _spawn  # noqa: E402

SIDES = (('torch', False), ('jax_project', False), ('jax_project', True))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--budget_mb', type=float, default=8000)
  p.add_argument('--size', type=int, default=480)
  p.add_argument('--base_features', type=int, default=64)
  args = p.parse_args()

  def probe(side, remat, batch):
    defaults = {name: choices[0] for name, choices in LEVERS.items()}
    ns = argparse.Namespace(size=args.size, batch=batch, steps=1, in_channels=1, num_classes=1,
                            base_features=args.base_features, remat=remat, train_only=True,
                            cpu_scheduler=CPU_SCHEDULERS[0], huge_pages='on',
                            **defaults)
    return _spawn(side, ns)['peak_rss_mb']

  rows = {}
  for side, remat in SIDES:
    name = side + (' + remat' if remat else '')
    one, two = probe(side, remat, 1), probe(side, remat, 2)
    per_image = max(two - one, 1e-6)
    fixed = one - per_image
    best = max(1, math.floor((args.budget_mb - fixed) / per_image))
    measured = {1: one, 2: two}

    def rss(batch, side=side, remat=remat, measured=measured):
      if batch not in measured:
        measured[batch] = probe(side, remat, batch)
      return measured[batch]

    while best >= 1 and rss(best) > args.budget_mb:
      best -= 1
    while best >= 1 and rss(best + 1) <= args.budget_mb:
      best += 1
    confirmed = measured[best] if best >= 1 else None
    rows[name] = {'rss_batch1_mb': one, 'rss_batch2_mb': two, 'per_image_mb': per_image,
                  'max_batch': best, 'rss_at_max_mb': confirmed,
                  'measured_mb': {str(b): measured[b] for b in sorted(measured)}}
    print(f'{name}: {rows[name]}', file=sys.stderr, flush=True)

  print(f'\n1x{args.size}x{args.size}, base_features={args.base_features}, Adam, float32, '
        f'budget {args.budget_mb:.0f} MB peak RSS')
  print(f'{"side":<22} {"MB/image":>9} {"max batch":>10} {"RSS at max":>11}')
  for name, r in rows.items():
    at_max = f'{r["rss_at_max_mb"]:.0f}' if r['rss_at_max_mb'] else '-'
    print(f'{name:<22} {r["per_image_mb"]:>9.0f} {r["max_batch"]:>10d} {at_max:>11}')
  torch_max = rows['torch']['max_batch']
  ratios = {n: r['max_batch'] / torch_max for n, r in rows.items() if n != 'torch' and torch_max}
  for n, r in ratios.items():
    print(f'{n} / torch: {r:.2f}x the batch')
  print(json.dumps({'size': args.size, 'budget_mb': args.budget_mb, 'results': rows,
                    'ratios_vs_torch': ratios}))


if __name__ == '__main__':
  main()

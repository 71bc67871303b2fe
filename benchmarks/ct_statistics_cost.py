"""What gathering data.normalize='ct' statistics costs when a run starts: seconds and peak RSS.

    python benchmarks/ct_statistics_cost.py --cases 40 --size 256 --channels 2

Random images of `size` x `size` with `channels` channels, each case's centre quarter labelled
foreground, through ct_normalization.foreground_statistics with `--samples` draws in all
(nnU-Net's 10^8 by default). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from unet_jax.ct_normalization import CT_SAMPLES, foreground_statistics


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--cases', type=int, default=40)
  p.add_argument('--size', type=int, default=256)
  p.add_argument('--channels', type=int, default=2)
  p.add_argument('--samples', type=int, default=CT_SAMPLES)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  mask = np.zeros((args.size, args.size), np.uint8)
  mask[args.size // 4:3 * args.size // 4, args.size // 4:3 * args.size // 4] = 1
  cases = [(rng.random((args.size, args.size, args.channels), dtype=np.float32), mask)
           for _ in range(args.cases)]
  start = time.perf_counter()
  foreground_statistics(cases, len(cases), args.samples)
  seconds = time.perf_counter() - start
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (Linux: KiB)
  print(json.dumps({**vars(args), 'seconds': round(seconds, 2), 'peak_rss_mb': round(peak_mb)}))


if __name__ == '__main__':
  main()

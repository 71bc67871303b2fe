"""Shared helpers: the PyTorch reference is in tests/torch_reference.py, written from SEED.md."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(2)


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def move_off_init(model: torch.nn.Module, in_channels: int, num_classes: int, hw=(32, 32),
                  steps: int = 3, seed: int = 0) -> torch.nn.Module:
  """A few Adam steps so weights and BN statistics are not at their 0/1 initial values."""
  g = torch.Generator().manual_seed(seed)
  opt = torch.optim.Adam(model.parameters(), lr=1e-2)
  model.train()
  for _ in range(steps):
    x = torch.randn(4, in_channels, *hw, generator=g) * 2 + 0.5
    y = torch.randn(4, num_classes, *hw, generator=g)
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
  return model.eval()


def max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
  """max |got - want| relative to the scale of `want` (its max |value|, at least 1e-6)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


@pytest.fixture(autouse=True)
def _seeded():
  torch.manual_seed(0)
  np.random.seed(0)


# Eight CPU devices for the data-parallel tests; must happen before JAX picks its backend.
# Tests that need one device take the first one.
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

"""Test-time augmentation by flips: the mean of the logits of an image and its mirror images.

The network sees the image as it is, flipped top-bottom, left-right and both; each output is
flipped back and the four are averaged (ttach's `flip_transform` merged by mean; segmentation
is equivariant to flips, the network only nearly so). It costs four forward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Axes of an NHWC batch to flip: none, H (top-bottom), W (left-right), both.
FLIPS = ((), (1,), (2,), (1, 2))


def flip_averaged(apply: Callable[[jax.Array], jax.Array], images: jax.Array) -> jax.Array:
  """mean over FLIPS of flip(apply(flip(images))), in float32."""
  total = None
  for axes in FLIPS:
    out = apply(jnp.flip(images, axes) if axes else images).astype(jnp.float32)
    out = jnp.flip(out, axes) if axes else out
    total = out if total is None else total + out
  return total / len(FLIPS)


def eval_logits(model: Any, variables: Any, images: jax.Array, tta: bool = False) -> jax.Array:
  """`model.apply(variables, images, train=False)`, or with `tta` its mean over flips."""
  if tta:
    return flip_averaged(lambda x: model.apply(variables, x, train=False), images)
  return model.apply(variables, images, train=False)

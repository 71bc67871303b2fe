"""Image files to 8-bit arrays, one rule for training (image_folder) and prediction.

PIL's own `convert('L')` clips 16-bit gray values at 255, which turned a 16-bit microscopy or
medical image into an almost white one; here 16 bits are scaled to 8 (65535 -> 255), as the
8-bit images a model trains on are scaled to [0, 1] from 255.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unet_jax.errors import UserError


def eight_bit(im: Any, path: str) -> Any:
  """A PIL image of 16-bit or 32-bit integer gray values as 8-bit gray ('L'), rounding v / 257
  (values outside 0..65535 clipped); 32-bit float images are refused; others pass unchanged."""
  from PIL import Image
  if im.mode == 'F':
    raise UserError(f'{path}: a 32-bit float image, whose value range is unknown; save it as an '
                    '8- or 16-bit image')
  if im.mode == 'I' or im.mode.startswith('I;16'):
    values = np.clip(np.asarray(im, np.float64), 0, 65535)
    return Image.fromarray(np.round(values / 257).astype(np.uint8), 'L')
  return im

"""The UNet paper's weight map: its separation term against distances counted pixel by pixel,
in the loss against torch's per-pixel cross-entropy, in the stream, and through the step."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unet_jax import losses
from unet_jax.border_weights import separation_term
from unet_jax.deep_supervision import deep_supervision_loss, downsampled_labels
from unet_jax.input_pipeline import preprocess


def _objects(mask, background, ignore):
  """4-connected regions of each class but the background and the ignored id, by flood fill."""
  seen, found = np.zeros(mask.shape, bool), []
  for start in zip(*np.nonzero(~np.isin(mask, [background, ignore])), strict=True):
    if seen[start]:
      continue
    region, todo = [], [start]
    seen[start] = True
    while todo:
      y, x = todo.pop()
      region.append((y, x))
      for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
        if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and not seen[ny, nx]
            and mask[ny, nx] == mask[y, x]):
          seen[ny, nx] = True
          todo.append((ny, nx))
    found.append(np.array(region, float))
  return found


def _reference(mask, w0, sigma, ignore=None):
  """w0 exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels, d1 <= d2 the two smallest of
  each object's nearest-pixel distance, every pair of pixels measured."""
  background = 1 if ignore == 0 else 0
  objects = _objects(mask, background, ignore)
  out = np.zeros(mask.shape)
  if len(objects) < 2:
    return out
  for y, x in zip(*np.nonzero(mask == background), strict=True):
    d = sorted(np.sqrt(((o - (y, x)) ** 2).sum(1)).min() for o in objects)
    out[y, x] = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
  return out


def test_separation_term_matches_distances_counted_pixel_by_pixel():
  mask = np.zeros((18, 23), np.uint8)
  mask[2:7, 2:8] = 1                                      # two objects of class 1 ...
  mask[2:7, 10:15] = 1
  mask[9:16, 4:9] = 2                                     # ... one of class 2 beside them
  mask[8, 10] = mask[9, 11] = 1                           # diagonal neighbours: two objects
  mask[12:15, 15:20] = 3                                  # ignored where 3 is the ignored id
  for ignore in (None, 3):
    got = separation_term(mask, 10.0, 5.0, ignore)
    want = _reference(mask, 10.0, 5.0, ignore)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got[mask != 0].max() == 0 and got.max() > 5  # (the gaps weigh most)
  # The ignored id 0: class 0 (the background) is id 1.
  shifted = np.where(mask == 0, 1, np.where(mask == 1, 2, 0)).astype(np.uint8)
  np.testing.assert_allclose(separation_term(shifted, 10.0, 3.0, 0),
                             _reference(shifted, 10.0, 3.0, 0), rtol=1e-6, atol=1e-6)
  # One object: no gap to keep.
  single = np.zeros((8, 8), np.uint8)
  single[2:5, 2:5] = 1
  assert not separation_term(single, 10.0, 5.0).any()


@pytest.mark.parametrize('k', [1, 3])
def test_the_weighted_cross_entropy_matches_torch(k):
  # sum over valid pixels of (class weight, else 1, + the term) x torch's per-pixel loss,
  # over the sum of those weights.
  rng = np.random.default_rng(k)
  logits = rng.standard_normal((2, 6, 7, k)).astype(np.float32) * 2
  labels = rng.integers(0, max(k, 2) + 1, (2, 6, 7))       # the last id is ignored
  ignore = max(k, 2)
  border = (rng.random((2, 6, 7)) * 10).astype(np.float32)
  valid = labels != ignore
  ids = np.where(valid, labels, 0)
  x = torch.tensor(logits)
  if k == 1:
    per_pixel = F.binary_cross_entropy_with_logits(x[..., 0], torch.tensor(ids == 1).float(),
                                                   reduction='none').numpy()
    base, options = np.ones(labels.shape), {}
  else:
    per_pixel = F.cross_entropy(x.permute(0, 3, 1, 2), torch.tensor(ids),
                                reduction='none').numpy()
    class_weights = (0.3, 1.0, 2.0)
    base, options = np.asarray(class_weights)[ids], {'class_weights': class_weights}
  w = (base + border) * valid
  want = (w * per_pixel).sum() / w.sum()
  _, metrics = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                        ignore_id=ignore, border=jnp.asarray(border), **options)
  np.testing.assert_allclose(metrics['ce_loss'], want, rtol=1e-6)
  plain = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                   ignore_id=ignore, **options)[1]
  assert abs(float(plain['ce_loss']) - want) > 1e-3
  np.testing.assert_allclose(metrics['dice_loss'], plain['dice_loss'])  # (Dice unweighted)
  with pytest.raises(ValueError, match='border and label_smoothing: use one of them'):
    losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                             border=jnp.asarray(border), label_smoothing=0.1)


def test_deep_supervision_takes_the_map_by_the_labels_pixels():
  rng = np.random.default_rng(4)
  labels = jnp.asarray(rng.integers(0, 2, (2, 16, 16)))
  border = jnp.asarray(rng.random((2, 16, 16)) * 10, jnp.float32)
  outputs = [jnp.asarray(rng.standard_normal((2, 16 // 2**i, 16 // 2**i, 1)), jnp.float32)
             for i in range(3)]

  def loss(logits, labels, border):
    return losses.segmentation_loss(logits, labels, dice_weight=1.0, border=border)

  got, _ = deep_supervision_loss(outputs, labels, loss, border)
  want, _ = deep_supervision_loss(
      outputs, labels, lambda x, y: loss(x, y, downsampled_labels(border, x.shape[1:3])))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  unweighted, _ = deep_supervision_loss(outputs, labels, lambda x, y: loss(x, y, None))
  assert abs(float(got) - float(unweighted)) > 1e-3


def test_the_stream_gives_the_map_of_the_examples_mask_cut_as_its_patch():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (24, 24, 1)).astype(np.uint8)
  mask = np.zeros((24, 24), np.uint8)
  mask[2:9, 3:11], mask[2:9, 13:20], mask[13:21, 6:16] = 1, 1, 1
  aug = ml_collections.ConfigDict(dict(min_scale=1.0, flip_horizontal=True, flip_vertical=True))
  whole = separation_term(mask, 10.0, 5.0)
  for seed in range(6):
    out = preprocess({'image': image, 'mask': mask}, (24, 24), np.random.default_rng(seed), aug,
                     crop=12, border=(10.0, 5.0))
    plain = preprocess({'image': image, 'mask': mask}, (24, 24), np.random.default_rng(seed),
                       aug, crop=12)
    np.testing.assert_array_equal(out['mask'], plain['mask'])  # (the same draws)
    np.testing.assert_array_equal(out['image'], plain['image'])
    assert 'weight' not in plain and out['weight'].shape == (12, 12)
    # The map of the flipped example's mask, at the patch: found in the flipped whole map.
    flipped = [f(whole) for f in (lambda a: a, np.fliplr, np.flipud, lambda a: a[::-1, ::-1])]
    assert any(np.array_equal(out['weight'], f[y:y + 12, x:x + 12])
               and np.array_equal(out['mask'], fm[y:y + 12, x:x + 12])
               for f, fm in zip(flipped, [g(mask) for g in (lambda a: a, np.fliplr, np.flipud,
                                                            lambda a: a[::-1, ::-1])],
                                strict=True)
               for y in range(13) for x in range(13))

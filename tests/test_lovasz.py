"""The Lovász loss against the paper's PyTorch code (Berman et al. 2018, written out here),
values and gradients, and on 8 devices against 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unet_jax import losses
from unet_jax.lovasz import lovasz_loss


def _lovasz_grad(gt_sorted):
  gts = gt_sorted.sum()
  intersection = gts - gt_sorted.float().cumsum(0)
  union = gts + (1 - gt_sorted).float().cumsum(0)
  jaccard = 1. - intersection / union
  if len(gt_sorted) > 1:
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
  return jaccard


def _hinge_flat(logits, labels):
  """lovasz_hinge_flat: the pixels kept (ignored ones dropped), flattened."""
  if len(labels) == 0:
    return logits.sum() * 0.
  errors = 1. - logits * (2. * labels.float() - 1.)
  errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
  return torch.dot(torch.relu(errors_sorted), _lovasz_grad(labels[perm]))


def _softmax_flat(probas, labels):
  """lovasz_softmax_flat with classes='present': (pixels, C) probabilities."""
  if probas.numel() == 0:
    return probas.sum() * 0.
  per_class = []
  for c in range(probas.size(1)):
    fg = (labels == c).float()
    if fg.sum() == 0:
      continue
    errors_sorted, perm = torch.sort((fg - probas[:, c]).abs(), 0, descending=True)
    per_class.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
  return torch.stack(per_class).mean() if per_class else probas.sum() * 0.


def _torch_lovasz(logits, labels, ignore, per_image):
  """The paper's lovasz_hinge / lovasz_softmax (segmentation_models_pytorch's LovaszLoss,
  from_logits) of (N, H, W, C) logits, with pixels of label `ignore` dropped."""
  x = torch.tensor(logits, requires_grad=True)
  y = torch.tensor(labels)
  binary = logits.shape[-1] == 1
  scores = x[..., 0] if binary else torch.softmax(x, -1)
  flat = _hinge_flat if binary else _softmax_flat
  parts = [(scores[i], y[i]) for i in range(len(labels))] if per_image else [(scores, y)]
  loss = torch.stack([flat(s[t != ignore], t[t != ignore]) for s, t in parts]).mean()
  loss.backward()
  return loss.item(), x.grad.numpy()


def _cases(rng, k):
  logits = (rng.standard_normal((4, 6, 5, k)) * 2).astype(np.float32)
  labels = rng.integers(0, 1 + max(k, 2), (4, 6, 5))       # the last id is ignored
  ignore = max(k, 2)
  labels[1] = ignore                                        # an image with nothing to score
  labels[2] = np.where(labels[2] == 1, 0, labels[2])        # one without class 1
  return logits, labels, ignore


@pytest.mark.parametrize('k', [1, 4])
@pytest.mark.parametrize('reduction', ['image', 'batch'])
def test_lovasz_matches_the_papers_code(k, reduction):
  logits, labels, ignore = _cases(np.random.default_rng(k), k)
  want, want_grad = _torch_lovasz(logits, labels, ignore, per_image=reduction == 'image')

  def ours(x):
    return losses.segmentation_loss(x, labels, dice_weight=1.0, ignore_id=ignore, lovasz=True,
                                    dice_reduction=reduction)[1]['dice_loss']

  got, grad = jax.value_and_grad(ours)(jnp.asarray(logits))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  assert abs(float(got) - float(losses.segmentation_loss(
      jnp.asarray(logits), labels, dice_weight=1.0, ignore_id=ignore,
      dice_reduction=reduction)[1]['dice_loss'])) > 1e-2  # not the Dice


def test_lovasz_refusals():
  x, labels = jnp.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4), int)
  with pytest.raises(ValueError, match="reduction='pooled': use one of"):
    lovasz_loss(x, labels, reduction='pooled')
  with pytest.raises(ValueError, match='lovasz replaces the Dice term: it takes no tversky'):
    losses.segmentation_loss(x, labels, dice_weight=1.0, lovasz=True, tversky=(0.3, 0.7))


@pytest.mark.parametrize('check_vma', [True, False])
@pytest.mark.parametrize('k', [1, 3])
def test_batch_lovasz_under_a_users_shard_map_equals_one_device(check_vma, k):
  # Over the global batch: each device gathers every pixel, and its gradient is its own
  # pixels' (with check_vma the loss meaned over the axis before differentiating, without it
  # the gradients after, as train.py's step).
  mesh = jax.make_mesh((8,), ('d',))
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((8, 6, 5, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, (8, 6, 5)))
  valid = jnp.asarray(rng.random((8, 6, 5)) > 0.2)
  w = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)

  def loss(w, x, labels, valid, axis_name=None):
    return lovasz_loss(x @ w, labels, valid, 'batch', axis_name)

  def per_device(w, x, labels, valid):
    if check_vma:
      return jax.value_and_grad(lambda w: jax.lax.pmean(loss(w, x, labels, valid, 'd'), 'd'))(w)
    value, grad = jax.value_and_grad(loss)(w, x, labels, valid, 'd')
    return jax.lax.pmean(value, 'd'), jax.lax.pmean(grad, 'd')

  sharded = [jax.device_put(a, NamedSharding(mesh, P('d'))) for a in (x, labels, valid)]
  value, grad = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('d'), P('d'), P('d')),
                                      out_specs=P(), check_vma=check_vma))(w, *sharded)
  want_value, want_grad = jax.value_and_grad(loss)(w, x, labels, valid)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * float(
      jnp.abs(want_grad).max()))
  per_image = jax.value_and_grad(lambda w: lovasz_loss(x @ w, labels, valid, 'image'))(w)[0]
  assert abs(float(per_image) - float(want_value)) > 1e-3


def test_lovasz_gradient_is_finite_and_zero_when_everything_is_ignored():
  labels = np.full((2, 4, 4), 2)
  for k in (1, 3):
    for reduction in ('image', 'batch'):
      def loss(x, reduction=reduction):
        return losses.segmentation_loss(x, labels, dice_weight=1.0, ignore_id=2, lovasz=True,
                                        dice_reduction=reduction)[0]
      value, grad = jax.value_and_grad(loss)(jnp.ones((2, 4, 4, k)))
      assert float(value) == 0 and np.all(np.asarray(grad) == 0)

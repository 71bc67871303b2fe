"""Losses against PyTorch's, and metrics on cases worked out by hand (empty masks included)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unet_jax import losses


def test_bce_and_ce_match_torch():
  logits = np.random.randn(2, 5, 6, 1).astype(np.float32) * 3
  labels = (np.random.rand(2, 5, 6) > 0.5).astype(np.int32)
  want = F.binary_cross_entropy_with_logits(torch.tensor(logits[..., 0]),
                                            torch.tensor(labels, dtype=torch.float32))
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), labels), want, rtol=1e-6)
  logits = np.random.randn(2, 5, 6, 4).astype(np.float32) * 3
  labels = np.random.randint(0, 4, (2, 5, 6))
  want = F.cross_entropy(torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(labels))
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), labels), want, rtol=1e-6)


def test_soft_dice_loss_is_zero_for_confident_right_answers_and_empty_masks():
  labels = np.zeros((2, 4, 4), np.int32)
  labels[0, :2] = 1                     # image 1 has no foreground at all
  logits = np.where(labels == 1, 50.0, -50.0)[..., None].astype(np.float32)
  assert float(losses.soft_dice_loss(jnp.asarray(logits), labels)) < 1e-6
  wrong = -logits
  assert float(losses.soft_dice_loss(jnp.asarray(wrong), labels)) > 0.45


def test_metrics_by_hand_binary():
  labels = np.zeros((3, 2, 4), np.int32)
  pred = np.zeros((3, 2, 4), np.int32)
  labels[0, 0, :2] = 1
  pred[0, 0, 1:3] = 1                         # image 0: tp=1 fp=1 fn=1 -> dice 0.5, iou 1/3
  # image 1: empty truth, empty prediction -> perfect
  pred[2, 1, 0] = 1                           # image 2: empty truth, one false positive -> 0
  logits = np.where(pred == 1, 3.0, -3.0)[..., None].astype(np.float32)
  s = losses.per_image_scores(jnp.asarray(logits), labels)
  np.testing.assert_allclose(s['dice'][:, 0], [0.5, 1.0, 0.0])
  np.testing.assert_allclose(s['iou'][:, 0], [1 / 3, 1.0, 0.0])
  np.testing.assert_allclose(s['pixel_accuracy'], [6 / 8, 1.0, 7 / 8])
  sums = losses.summed_eval_metrics(jnp.asarray(logits), labels, np.array([1, 1, 0]))
  final = losses.finalize_eval_metrics(sums)
  assert abs(final['dice'] - 0.75) < 1e-6   # padded image 2 is not counted
  assert abs(final['pixel_accuracy'] - (6 / 8 + 1) / 2) < 1e-6


def test_metrics_multiclass_report_per_class():
  labels = np.array([[[0, 1, 2, 2]]])
  logits = np.eye(3, dtype=np.float32)[np.array([[[0, 1, 2, 1]]])] * 5
  final = losses.finalize_eval_metrics(losses.summed_eval_metrics(jnp.asarray(logits), labels,
                                                                  np.array([1])))
  assert final['dice_class0'] == 1.0
  assert abs(final['dice_class1'] - 2 / 3) < 1e-6 and abs(final['dice_class2'] - 2 / 3) < 1e-6
  assert abs(final['dice'] - (1 + 4 / 3) / 3) < 1e-6
  assert final['pixel_accuracy'] == 0.75


def test_metrics_without_background_match_monai_and_milesial():
  from monai.metrics import DiceMetric, MeanIoU
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((5, 9, 11, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (5, 9, 11))
  logits[..., 0] += 1.0  # (the background predicted more often: its Dice unlike the others')
  labels[0], logits[0, ..., 0] = 0, 9.0  # image 0: classes 1-3 in neither mask (each scores 1)
  labels[1][labels[1] == 3] = 2          # image 1: class 3 only predicted (scores 0)
  sums = losses.summed_eval_metrics(jnp.asarray(logits), labels, np.ones(5))
  pred = F.one_hot(torch.tensor(logits).argmax(-1), 4).permute(0, 3, 1, 2)
  truth = F.one_hot(torch.tensor(labels), 4).permute(0, 3, 1, 2)
  for include in (True, False):
    got = losses.finalize_eval_metrics(sums, include_background=include)
    for name, metric in (('dice', DiceMetric), ('iou', MeanIoU)):
      want = metric(include_background=include, ignore_empty=False)(pred, truth).mean()
      assert got[name] == pytest.approx(float(want), rel=1e-6), (name, include)
    # Each class's own score either way.
    assert got['dice_class0'] == pytest.approx(float(DiceMetric(ignore_empty=False)(
        pred, truth)[:, 0].mean()), rel=1e-6)
  assert abs(got['dice'] - losses.finalize_eval_metrics(sums)['dice']) > 1e-2
  # milesial/Pytorch-UNet's evaluate.py, written out from its utils/dice_score.py:
  # multiclass_dice_coeff(pred[:, 1:], truth[:, 1:]), each image and class its own Dice.
  p, t = pred[:, 1:].flatten(0, 1).float(), truth[:, 1:].flatten(0, 1).float()
  inter, sets = 2 * (p * t).sum(dim=(-1, -2)), p.sum(dim=(-1, -2)) + t.sum(dim=(-1, -2))
  milesial = ((inter + 1e-6) / (torch.where(sets == 0, inter, sets) + 1e-6)).mean()
  assert got['dice'] == pytest.approx(float(milesial), rel=1e-6)
  # A binary model scores its foreground, with or without the background.
  binary = losses.summed_eval_metrics(jnp.asarray(logits[..., :1]), labels.clip(0, 1),
                                      np.ones(5))
  assert losses.finalize_eval_metrics(binary, include_background=False) == \
      losses.finalize_eval_metrics(binary)


def test_ignored_pixels_match_torch_ignore_index():
  rng = np.random.default_rng(0)
  # K=4 classes plus an ignored label id 2 in the middle: ids 3 and 4 are classes 2 and 3.
  logits = rng.standard_normal((3, 5, 6, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 5, (3, 5, 6))
  labels[1] = 2                                           # an image with nothing to score
  torch_labels = np.where(labels == 2, -100, np.where(labels > 2, labels - 1, labels))
  _, metrics = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                        ignore_id=2)
  want = F.cross_entropy(torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(torch_labels),
                         ignore_index=-100)
  np.testing.assert_allclose(metrics['ce_loss'], want, rtol=1e-6)
  # Soft Dice over the valid pixels only, per image and class, then meaned.
  valid = (torch_labels >= 0)[..., None]
  probs = torch.softmax(torch.tensor(logits), -1).numpy() * valid
  onehot = np.eye(4)[np.maximum(torch_labels, 0)] * valid
  dice = (2 * (probs * onehot).sum((1, 2)) + 1) / (probs.sum((1, 2)) + onehot.sum((1, 2)) + 1)
  np.testing.assert_allclose(metrics['dice_loss'], 1 - dice.mean(), rtol=1e-6)
  # Binary: BCE meaned over the valid pixels.
  logits = rng.standard_normal((2, 5, 6, 1)).astype(np.float32) * 3
  labels = rng.integers(0, 3, (2, 5, 6))                 # 0, 1, and 2 ignored
  per_pixel = F.binary_cross_entropy_with_logits(
      torch.tensor(logits[..., 0]), torch.tensor(labels == 1, dtype=torch.float32),
      reduction='none')
  want = per_pixel[torch.tensor(labels != 2)].mean()
  _, metrics = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                        ignore_id=2)
  np.testing.assert_allclose(metrics['ce_loss'], want, rtol=1e-6)


def test_metrics_leave_ignored_pixels_out():
  labels = np.array([[[0, 1, 1, 2, 2, 0]]])               # 2: ignored
  pred = np.array([[[0, 1, 0, 1, 0, 1]]])                 # a foreground guess on an ignored pixel
  logits = np.where(pred == 1, 3.0, -3.0)[..., None].astype(np.float32)
  s = losses.per_image_scores(jnp.asarray(logits), *losses.valid_labels(labels, 2))
  np.testing.assert_allclose(s['dice'][:, 0], [2 / (2 + 1 + 1)])  # tp 1, fp 1, fn 1
  np.testing.assert_allclose(s['pixel_accuracy'], [2 / 4])
  final = losses.finalize_eval_metrics(losses.summed_eval_metrics(
      jnp.asarray(logits), np.full((1, 1, 6), 2), np.array([1]), ignore_id=2))
  assert final['dice'] == 1.0 and final['pixel_accuracy'] == 1.0  # nothing to score


def test_class_weights_and_pos_weight_match_torch():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((3, 5, 6, 3)).astype(np.float32) * 3
  labels = rng.integers(0, 4, (3, 5, 6))                 # 3: ignored in the second case
  weights = (0.2, 1.0, 3.5)
  t_logits = torch.tensor(logits).permute(0, 3, 1, 2)
  for ignore_id in (None, 3):
    ours = np.minimum(labels, 2) if ignore_id is None else labels
    theirs = ours if ignore_id is None else np.where(labels == 3, -100, labels)
    want = F.cross_entropy(t_logits, torch.tensor(theirs), weight=torch.tensor(weights),
                           ignore_index=-100)
    _, metrics = losses.segmentation_loss(jnp.asarray(logits), ours, dice_weight=1.0,
                                          ignore_id=ignore_id, class_weights=weights)
    np.testing.assert_allclose(metrics['ce_loss'], want, rtol=1e-6)
  # BCE's pos_weight, also over the valid pixels only.
  logits = torch.tensor(rng.standard_normal((2, 5, 6)).astype(np.float32) * 3)
  labels = rng.integers(0, 3, (2, 5, 6))                 # 2: ignored in the second case
  binary = np.minimum(labels, 1)
  want = F.binary_cross_entropy_with_logits(logits, torch.tensor(binary, dtype=torch.float32),
                                            pos_weight=torch.tensor(4.0))
  _, metrics = losses.segmentation_loss(jnp.asarray(logits[..., None]), binary, dice_weight=1.0,
                                        pos_weight=4.0)
  np.testing.assert_allclose(metrics['ce_loss'], want, rtol=1e-6)
  per_pixel = F.binary_cross_entropy_with_logits(
      logits, torch.tensor(labels == 1, dtype=torch.float32), pos_weight=torch.tensor(4.0),
      reduction='none')
  want = per_pixel[torch.tensor(labels != 2)].mean()
  _, metrics = losses.segmentation_loss(jnp.asarray(logits[..., None]), labels, dice_weight=1.0,
                                        ignore_id=2, pos_weight=4.0)
  np.testing.assert_allclose(metrics['ce_loss'], want, rtol=1e-6)


@pytest.mark.parametrize('smoothing', [0.1, 1.0])
def test_label_smoothing_matches_torch(smoothing):
  # Softmax: torch's CrossEntropyLoss(label_smoothing=...), whose smoothing term weighs each
  # class's -log p by that class's weight, alone and with weights and ignored pixels.
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((3, 5, 6, 3)).astype(np.float32) * 3
  labels = rng.integers(0, 4, (3, 5, 6))                 # 3: ignored where ignore_id is set
  labels[2] = 3                                           # an image with nothing to score
  t_logits = torch.tensor(logits).permute(0, 3, 1, 2)
  for ignore_id in (None, 3):
    for weights in (None, (0.2, 1.0, 3.5)):
      ours = np.minimum(labels, 2) if ignore_id is None else labels
      theirs = ours if ignore_id is None else np.where(labels == 3, -100, labels)
      want = F.cross_entropy(t_logits, torch.tensor(theirs), ignore_index=-100,
                             weight=None if weights is None else torch.tensor(weights),
                             label_smoothing=smoothing)
      _, metrics = losses.segmentation_loss(jnp.asarray(logits), ours, dice_weight=1.0,
                                            ignore_id=ignore_id, class_weights=weights,
                                            label_smoothing=smoothing)
      np.testing.assert_allclose(metrics['ce_loss'], want, rtol=2e-6)
  # BCE: the target y(1 - e) + e/2, with torch's pos_weight, over the valid pixels;
  # segmentation_models_pytorch's SoftBCEWithLogitsLoss(smooth_factor=e/2) written out.
  x = torch.tensor(rng.standard_normal((2, 5, 6)).astype(np.float32) * 3)
  labels = rng.integers(0, 3, (2, 5, 6))                 # 2: ignored
  y = torch.tensor(labels == 1, dtype=torch.float32)
  soft = (1 - y) * (smoothing / 2) + y * (1 - smoothing / 2)
  per_pixel = F.binary_cross_entropy_with_logits(x, soft, pos_weight=torch.tensor(4.0),
                                                 reduction='none')
  want = per_pixel[torch.tensor(labels != 2)].mean()
  _, metrics = losses.segmentation_loss(jnp.asarray(x.numpy()[..., None]), labels,
                                        dice_weight=1.0, ignore_id=2, pos_weight=4.0,
                                        label_smoothing=smoothing)
  np.testing.assert_allclose(metrics['ce_loss'], want, rtol=2e-6)
  # A binary model is a 2-class softmax of logits (0, x): the same smoothing gives the same loss.
  two = jnp.stack([jnp.zeros_like(jnp.asarray(x.numpy())), jnp.asarray(x.numpy())], -1)
  np.testing.assert_allclose(
      losses.cross_entropy(two, np.minimum(labels, 1), label_smoothing=smoothing),
      losses.cross_entropy(jnp.asarray(x.numpy()[..., None]), np.minimum(labels, 1),
                           label_smoothing=smoothing), rtol=2e-6)
  with pytest.raises(ValueError, match='focal_gamma and label_smoothing: use one of them'):
    losses.cross_entropy(two, labels, focal_gamma=2.0, label_smoothing=smoothing)


def test_a_batch_with_every_pixel_ignored_has_a_finite_zero_gradient():
  import jax
  labels = np.full((2, 4, 4), 2)
  grad = jax.grad(lambda x: losses.segmentation_loss(x, labels, dice_weight=1.0,
                                                     ignore_id=2)[0])(jnp.ones((2, 4, 4, 2)))
  assert np.all(np.asarray(grad) == 0)


def _torch_sigmoid_focal(logits, targets, gamma, alpha=-1.0):
  """torchvision.ops.sigmoid_focal_loss's formula, reduction='none'."""
  p = torch.sigmoid(logits)
  ce = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


def test_focal_loss_matches_torch():
  rng = np.random.default_rng(2)
  for gamma in (0.5, 2.0):
    # Softmax: the focal term of the true class's log-probability, class weights and ignored
    # pixels reduced as F.cross_entropy reduces them.
    logits = rng.standard_normal((3, 5, 6, 3)).astype(np.float32) * 3
    labels = rng.integers(0, 4, (3, 5, 6))               # 3: ignored
    weights = torch.tensor((0.2, 1.0, 3.5))
    t_logits = torch.tensor(logits).permute(0, 3, 1, 2)
    t_labels = torch.tensor(np.where(labels == 3, -100, labels))
    ce = F.cross_entropy(t_logits, t_labels, reduction='none')   # 0 where ignored
    p_t = torch.exp(-ce)
    w = torch.where(t_labels >= 0, weights[t_labels.clamp(min=0)], 0.0)
    want = (w * ce * (1 - p_t) ** gamma).sum() / w.sum()
    _, metrics = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                          ignore_id=3, class_weights=tuple(weights.tolist()),
                                          focal_gamma=gamma)
    np.testing.assert_allclose(metrics['ce_loss'], want, rtol=2e-6)
    # Binary: torchvision's sigmoid focal loss; its alpha is (1 - alpha) x ours with
    # pos_weight = alpha / (1 - alpha).
    x = torch.tensor(rng.standard_normal((2, 5, 6)).astype(np.float32) * 3)
    y = rng.integers(0, 2, (2, 5, 6))
    t = torch.tensor(y, dtype=torch.float32)
    _, metrics = losses.segmentation_loss(jnp.asarray(x[..., None]), y, dice_weight=1.0,
                                          focal_gamma=gamma)
    np.testing.assert_allclose(metrics['ce_loss'], _torch_sigmoid_focal(x, t, gamma).mean(),
                               rtol=2e-6)
    _, metrics = losses.segmentation_loss(jnp.asarray(x[..., None]), y, dice_weight=1.0,
                                          focal_gamma=gamma, pos_weight=0.25 / 0.75)
    np.testing.assert_allclose(0.75 * metrics['ce_loss'],
                               _torch_sigmoid_focal(x, t, gamma, alpha=0.25).mean(), rtol=2e-6)
    # gamma 0 is the plain cross-entropy; the focal one is smaller
    plain = losses.segmentation_loss(jnp.asarray(x[..., None]), y, dice_weight=1.0)[1]
    np.testing.assert_allclose(plain['ce_loss'], F.binary_cross_entropy_with_logits(x, t),
                               rtol=1e-6)
    assert metrics['ce_loss'] < plain['ce_loss']


def test_focal_loss_gradient_is_finite_where_the_answer_is_certain():
  import jax
  # p_t is 1 in float32 at these logits: (1 - p_t)^0.5 has an infinite slope at 0 unfloored.
  labels = np.asarray([[[1, 0]]])
  for logits in (jnp.asarray([[[[200.0], [-200.0]]]]),              # binary
                 jnp.asarray([[[[-200.0, 200.0], [200.0, -200.0]]]])):  # softmax
    for gamma in (0.5, 2.0):
      grad = jax.grad(lambda x, g=gamma: losses.segmentation_loss(
          x, labels, dice_weight=0.0, focal_gamma=g)[0])(logits)
      assert np.all(np.isfinite(np.asarray(grad))), gamma


def test_batch_dice_matches_monai_and_milesial():
  from monai.losses import DiceLoss, TverskyLoss
  rng = np.random.default_rng(5)
  smooth = dict(smooth_nr=1.0, smooth_dr=1.0)  # (ours: 1 pixel)
  # Softmax over 3 classes, counts summed over the batch per class, then the mean over classes.
  logits = rng.standard_normal((3, 6, 7, 3)).astype(np.float32) * 2
  labels = rng.integers(0, 3, (3, 6, 7))
  labels[0] = 0  # (an image without classes 1, 2: per image it would weigh as much as the rest)
  nchw_logits, targets = torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(labels)[:, None]
  want = DiceLoss(softmax=True, to_onehot_y=True, batch=True, **smooth)(nchw_logits, targets)
  _, batch = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                      dice_reduction='batch')
  np.testing.assert_allclose(batch['dice_loss'], want, rtol=1e-6)
  _, per_image = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0)
  np.testing.assert_allclose(per_image['dice_loss'], DiceLoss(
      softmax=True, to_onehot_y=True, **smooth)(nchw_logits, targets), rtol=1e-6)
  assert abs(float(per_image['dice_loss']) - float(batch['dice_loss'])) > 1e-3
  want = TverskyLoss(softmax=True, to_onehot_y=True, batch=True, alpha=0.3, beta=0.7,
                     **smooth)(nchw_logits, targets)
  _, metrics = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                        tversky=(0.3, 0.7), dice_reduction='batch')
  np.testing.assert_allclose(metrics['dice_loss'], want, rtol=1e-6)
  # BCE's foreground: milesial/Pytorch-UNet's dice_loss(sigmoid(logits), masks), written out
  # from its utils/dice_score.py (reduce_batch_first: one Dice over the batch), with its
  # epsilon (1e-6) as dice_smooth (configs/milesial.py's).
  logits = rng.standard_normal((4, 16, 16)).astype(np.float32) * 3
  masks = (rng.random((4, 16, 16)) < 0.3).astype(np.float32)
  p, t = torch.sigmoid(torch.tensor(logits)), torch.tensor(masks)
  inter, sets = 2 * (p * t).sum(dim=(-1, -2, -3)), p.sum(dim=(-1, -2, -3)) + t.sum(
      dim=(-1, -2, -3))
  milesial = 1 - ((inter + 1e-6) / (torch.where(sets == 0, inter, sets) + 1e-6)).mean()
  _, metrics = losses.segmentation_loss(jnp.asarray(logits[..., None]), masks.astype(np.int32),
                                        dice_weight=1.0, dice_reduction='batch', dice_smooth=1e-6)
  np.testing.assert_allclose(metrics['dice_loss'], milesial, rtol=1e-6)
  _, pooled = losses.segmentation_loss(jnp.asarray(logits[..., None]), masks.astype(np.int32),
                                       dice_weight=1.0, dice_reduction='pooled',
                                       dice_smooth=1e-6)
  assert pooled['dice_loss'] == metrics['dice_loss']  # (one channel: nothing more to pool)
  # Several classes: milesial's dice_loss(softmax(logits), one_hot(masks), multiclass=True),
  # which flattens the classes into the batch: one Dice over images and classes together.
  logits = rng.standard_normal((3, 8, 9, 4)).astype(np.float32) * 2
  labels = rng.integers(0, 4, (3, 8, 9))
  p = torch.softmax(torch.tensor(logits).permute(0, 3, 1, 2), 1).flatten(0, 1)
  t = F.one_hot(torch.tensor(labels), 4).permute(0, 3, 1, 2).float().flatten(0, 1)
  inter, sets = 2 * (p * t).sum(dim=(-1, -2, -3)), p.sum(dim=(-1, -2, -3)) + t.sum(
      dim=(-1, -2, -3))
  milesial = 1 - ((inter + 1e-6) / (torch.where(sets == 0, inter, sets) + 1e-6)).mean()
  _, pooled = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                       dice_reduction='pooled', dice_smooth=1e-6)
  np.testing.assert_allclose(pooled['dice_loss'], milesial, rtol=1e-6)
  _, batch = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                      dice_reduction='batch')
  assert abs(float(batch['dice_loss']) - float(pooled['dice_loss'])) > 1e-3
  with pytest.raises(ValueError, match=r"reduction='pixel': use one of \('image', 'batch', "
                     r"'pooled'\)"):
    losses.soft_dice_loss(jnp.asarray(logits[..., None]), masks, reduction='pixel')


def test_dice_smoothing_as_nnunets_soft_dice():
  # nnU-Net's MemoryEfficientSoftDiceLoss(batch_dice=True, do_bg=False, smooth=1e-5), written
  # out from its dice.py: per class over the batch, (2 TP + smooth) / clip(P + T + smooth,
  # 1e-8), meaned; its loss is -dc, ours 1 - dc (the same gradient). Class 3 is absent from
  # the truth: how much its false alarms cost is the smoothing's doing.
  rng = np.random.default_rng(8)
  logits = rng.standard_normal((3, 6, 7, 4)).astype(np.float32) * 2
  labels = rng.integers(0, 3, (3, 6, 7))
  p = torch.softmax(torch.tensor(logits).permute(0, 3, 1, 2), 1)[:, 1:]
  t = F.one_hot(torch.tensor(labels), 4).permute(0, 3, 1, 2).float()[:, 1:]
  tp, total = (p * t).sum(dim=(0, 2, 3)), p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3))
  dc = ((2 * tp + 1e-5) / torch.clip(total + 1e-5, 1e-8)).mean()
  _, ours = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                     dice_reduction='batch', dice_include_background=False,
                                     dice_smooth=1e-5)
  np.testing.assert_allclose(ours['dice_loss'], 1 - dc, rtol=1e-6)
  _, one_pixel = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                          dice_reduction='batch', dice_include_background=False)
  assert abs(float(one_pixel['dice_loss']) - float(ours['dice_loss'])) > 1e-3


def test_dice_without_background_matches_monai():
  from monai.losses import DiceLoss, TverskyLoss
  rng = np.random.default_rng(6)
  smooth = dict(smooth_nr=1.0, smooth_dr=1.0)  # (ours: 1 pixel)
  logits = rng.standard_normal((3, 6, 7, 4)).astype(np.float32) * 2
  labels = rng.integers(0, 4, (3, 6, 7))
  labels[1] = 0
  nchw_logits, targets = torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(labels)[:, None]
  for batch, reduction in ((False, 'image'), (True, 'batch')):
    monai = dict(softmax=True, to_onehot_y=True, batch=batch, include_background=False,
                 **smooth)
    _, got = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                      dice_reduction=reduction, dice_include_background=False)
    np.testing.assert_allclose(got['dice_loss'], DiceLoss(**monai)(nchw_logits, targets),
                               rtol=1e-6)
    _, with_background = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                                  dice_reduction=reduction)
    assert abs(float(got['dice_loss']) - float(with_background['dice_loss'])) > 1e-3
    assert got['ce_loss'] == with_background['ce_loss']  # (the cross-entropy keeps every class)
    _, got = losses.segmentation_loss(
        jnp.asarray(logits), labels, dice_weight=1.0, dice_reduction=reduction,
        dice_include_background=False, tversky=(0.3, 0.7))
    np.testing.assert_allclose(got['dice_loss'], TverskyLoss(alpha=0.3, beta=0.7, **monai)(
        nchw_logits, targets), rtol=1e-6)
  # 'pooled': one Dice over the batch and the classes but 0 (milesial's formula on them).
  p = torch.softmax(nchw_logits, 1)[:, 1:].flatten(0, 1)
  t = F.one_hot(torch.tensor(labels), 4).permute(0, 3, 1, 2)[:, 1:].float().flatten(0, 1)
  inter, sets = 2 * (p * t).sum(), p.sum() + t.sum()
  _, got = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                    dice_reduction='pooled', dice_include_background=False)
  np.testing.assert_allclose(got['dice_loss'], 1 - (inter + 1.0) / (sets + 1.0), rtol=1e-6)
  # One output channel: the foreground either way.
  binary = logits[..., :1]
  for reduction in losses.DICE_REDUCTIONS:
    _, a = losses.segmentation_loss(jnp.asarray(binary), labels == 1, dice_weight=1.0,
                                    dice_reduction=reduction, dice_include_background=False)
    _, b = losses.segmentation_loss(jnp.asarray(binary), labels == 1, dice_weight=1.0,
                                    dice_reduction=reduction)
    assert a['dice_loss'] == b['dice_loss']


@pytest.mark.parametrize('check_vma,reduction', [(True, 'batch'), (False, 'batch'),
                                                 (True, 'pooled'), (False, 'pooled')])
def test_batch_dice_under_a_users_shard_map_equals_one_device(check_vma, reduction):
  # Your own per-device step, as Door 2 describes: with check_vma the loss is meaned over the
  # axis before differentiating, without it (train.py's) the gradients after.
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((8,), ('d',))
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((8, 6, 5, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, (8, 6, 5)))
  w = jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)

  def loss(w, x, labels, axis_name=None):
    return losses.soft_dice_loss(x @ w, labels, reduction=reduction, axis_name=axis_name)

  def per_device(w, x, labels):
    if check_vma:
      return jax.value_and_grad(lambda w: jax.lax.pmean(loss(w, x, labels, 'd'), 'd'))(w)
    value, grad = jax.value_and_grad(loss)(w, x, labels, 'd')
    return jax.lax.pmean(value, 'd'), jax.lax.pmean(grad, 'd')

  sharded = [jax.device_put(a, NamedSharding(mesh, P('d'))) for a in (x, labels)]
  value, grad = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('d'), P('d')),
                                      out_specs=P(), check_vma=check_vma))(w, *sharded)
  want_value, want_grad = jax.value_and_grad(loss)(w, x, labels)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * float(
      jnp.abs(want_grad).max()))


@pytest.mark.parametrize('alpha,beta', [(0.3, 0.7), (0.8, 0.1)])
def test_tversky_term_matches_monai(alpha, beta):
  from monai.losses import TverskyLoss
  rng = np.random.default_rng(2)
  common = dict(alpha=alpha, beta=beta, smooth_nr=1.0, smooth_dr=1.0)  # (ours: 1 pixel)
  # Softmax over 3 classes, every class scored, per image and class, then the mean.
  logits = rng.standard_normal((3, 6, 7, 3)).astype(np.float32) * 2
  labels = rng.integers(0, 3, (3, 6, 7))
  want = TverskyLoss(softmax=True, to_onehot_y=True, **common)(
      torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(labels)[:, None])
  _, metrics = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                        tversky=(alpha, beta))
  np.testing.assert_allclose(metrics['dice_loss'], want, rtol=1e-6)
  # BCE's foreground, with ignored pixels (label 2): MONAI has no mask, but a pixel with
  # probability 0 and target 0 adds to no count, which is what leaving it out does.
  logits = rng.standard_normal((2, 6, 7)).astype(np.float32) * 2
  labels = rng.integers(0, 3, (2, 6, 7))
  shown = torch.tensor(np.where(labels == 2, -1e4, logits))[:, None]
  want = TverskyLoss(sigmoid=True, **common)(shown, torch.tensor(labels == 1).float()[:, None])
  _, metrics = losses.segmentation_loss(jnp.asarray(logits[..., None]), labels, dice_weight=1.0,
                                        ignore_id=2, tversky=(alpha, beta))
  np.testing.assert_allclose(metrics['dice_loss'], want, rtol=1e-6)
  plain = losses.segmentation_loss(jnp.asarray(logits[..., None]), labels, dice_weight=1.0,
                                   ignore_id=2)[1]
  assert abs(float(plain['dice_loss']) - float(metrics['dice_loss'])) > 1e-2


@pytest.mark.parametrize('k', [1, 3])
def test_tversky_one_one_is_segmentation_models_pytorchs_jaccard_loss(k):
  # segmentation_models_pytorch's JaccardLoss (from_logits, smooth=s), written out: the soft
  # IoU (TP + s) / (P + T - TP + s) over the batch per class, 1 minus it, meaned over classes
  # (a class absent from the batch's truth would count 0 there; every class is present here).
  rng = np.random.default_rng(9)
  logits = rng.standard_normal((3, 6, 7, k)).astype(np.float32) * 2
  labels = rng.integers(0, max(k, 2), (3, 6, 7))
  x = torch.tensor(logits).permute(0, 3, 1, 2).flatten(2)            # (N, C, pixels)
  if k == 1:
    probs, truth = torch.sigmoid(x), torch.tensor(labels == 1).float().flatten(1)[:, None]
  else:
    probs, truth = torch.softmax(x, 1), F.one_hot(torch.tensor(labels).flatten(1), k)
    truth = truth.permute(0, 2, 1).float()
  smooth = 0.5
  tp = (probs * truth).sum((0, 2))
  iou = (tp + smooth) / (probs.sum((0, 2)) + truth.sum((0, 2)) - tp + smooth)
  assert bool((truth.sum((0, 2)) > 0).all())
  _, metrics = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                        tversky=(1.0, 1.0), dice_reduction='batch',
                                        dice_smooth=smooth)
  np.testing.assert_allclose(metrics['dice_loss'], (1 - iou).mean(), rtol=1e-6)


@pytest.mark.parametrize('k,include_background', [(1, True), (4, True), (4, False)])
@pytest.mark.parametrize('reduction', ['image', 'batch'])
def test_generalized_dice_matches_monai(k, reduction, include_background):
  # MONAI's GeneralizedDiceLoss (w_type='square') on the valid pixels: per image, each image's
  # valid pixels as an image of its own (then the mean); per batch, all of them as one. (One
  # output channel is its foreground either way.)
  from monai.losses import GeneralizedDiceLoss
  rng = np.random.default_rng(k)
  logits = rng.standard_normal((4, 6, 5, k)).astype(np.float32) * 2
  ignore = max(k, 2)
  # Imbalanced: class 0 in most pixels (where the weights matter); `ignore` is left out.
  labels = np.where(rng.random((4, 6, 5)) < 0.6, 0, rng.integers(1, ignore + 1, (4, 6, 5)))
  labels[1] = ignore                                        # nothing valid
  labels[2] = np.where(labels[2] == 1, 0, labels[2])        # class 1 absent: MONAI's max weight
  labels[3] = np.where(labels[3] == 0, ignore, labels[3])   # class 0 absent
  smooth = 1e-3
  gdl = GeneralizedDiceLoss(sigmoid=k == 1, softmax=k > 1, to_onehot_y=k > 1,
                            include_background=include_background, smooth_nr=smooth,
                            smooth_dr=smooth)
  x = torch.tensor(logits).permute(0, 3, 1, 2).flatten(2)   # (N, C, pixels)
  y = torch.tensor(labels).flatten(1)[:, None]
  keep = y[:, 0] != ignore
  if k == 1:
    y = (y == 1).float()
  if reduction == 'image':
    want = np.mean([float(gdl(x[i:i + 1][..., keep[i]], y[i:i + 1][..., keep[i]]))
                    for i in range(len(labels))])
  else:
    want = float(gdl(x.permute(1, 0, 2)[:, keep][None], y.permute(1, 0, 2)[:, keep][None]))
  _, metrics = losses.segmentation_loss(
      jnp.asarray(logits), labels, dice_weight=1.0, ignore_id=ignore, generalized_dice=True,
      dice_reduction=reduction, dice_include_background=include_background, dice_smooth=smooth)
  np.testing.assert_allclose(metrics['dice_loss'], want, rtol=1e-5, atol=1e-6)
  plain = losses.segmentation_loss(
      jnp.asarray(logits), labels, dice_weight=1.0, ignore_id=ignore, dice_reduction=reduction,
      dice_include_background=include_background, dice_smooth=smooth)[1]
  assert abs(float(plain['dice_loss']) - want) > 1e-3

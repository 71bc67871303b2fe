"""Region-based (multi-label) segmentation: losses and metrics against torch and MONAI, the
painting of masks against nnU-Net's rule, and the regions' refusals."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import tiny_config

from unet_jax import input_pipeline, losses, regions, train

BRATS = ((1, 2, 3), (2, 3), (3,))


def _torch_targets(labels, regions_):
  """(N, R, H, W) float memberships, built in torch."""
  t = torch.tensor(labels)
  return torch.stack([torch.isin(t, torch.tensor(r)) for r in regions_], 1).float()


def _case(seed, n=4, h=6, w=5, classes=4, ignore=None):
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((n, h, w, len(BRATS))).astype(np.float32) * 2
  labels = rng.integers(0, classes + (ignore is not None), (n, h, w))
  return logits, labels


@pytest.mark.parametrize('reduction', ['image', 'batch'])
def test_region_loss_is_torchs_bce_and_monais_sigmoid_dice(reduction):
  from monai.losses import DiceLoss
  logits, labels = _case(0)
  labels[1] = 0                                          # an image with no region at all
  _, metrics = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                        regions=BRATS, dice_reduction=reduction)
  x = torch.tensor(logits).permute(0, 3, 1, 2)
  y = _torch_targets(labels, BRATS)
  np.testing.assert_allclose(metrics['ce_loss'], F.binary_cross_entropy_with_logits(x, y),
                             rtol=1e-6)
  dice = DiceLoss(sigmoid=True, batch=reduction == 'batch', smooth_nr=1.0, smooth_dr=1.0)
  np.testing.assert_allclose(metrics['dice_loss'], dice(x, y), rtol=1e-6)
  # ... and not the softmax loss of the same channels.
  _, softmax = losses.segmentation_loss(jnp.asarray(logits), np.minimum(labels, 2),
                                        dice_weight=1.0, dice_reduction=reduction)
  assert abs(float(softmax['ce_loss']) - float(metrics['ce_loss'])) > 1e-2


def test_region_loss_leaves_ignored_pixels_out_and_weighs_as_torch():
  # Class id 2 ignored: ids 3, 4 are classes 2, 3. BCE: the mean over the valid pixels' every
  # region; pos_weight weighs each region's members (torch's scalar pos_weight broadcasts).
  logits, labels = _case(1, ignore=2)
  labels[2] = 2                                          # nothing valid in this image
  torch_labels = np.where(labels > 2, labels - 1, np.where(labels == 2, 0, labels))
  valid = torch.tensor(labels != 2)[:, None].float().expand(-1, len(BRATS), -1, -1)
  x = torch.tensor(logits).permute(0, 3, 1, 2)
  y = _torch_targets(torch_labels, BRATS)
  _, metrics = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                        ignore_id=2, regions=BRATS, pos_weight=3.0)
  per = F.binary_cross_entropy_with_logits(x, y, reduction='none',
                                           pos_weight=torch.tensor(3.0))
  np.testing.assert_allclose(metrics['ce_loss'], (per * valid).sum() / valid.sum(), rtol=1e-6)
  p = torch.sigmoid(x) * valid
  t = y * valid
  dice = (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)
  np.testing.assert_allclose(metrics['dice_loss'], 1 - dice.mean(), rtol=1e-6)
  # The UNet paper's border map adds to each pixel's weight, the same in every region.
  border = np.random.default_rng(2).random(labels.shape).astype(np.float32) * 5
  _, weighted = losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0,
                                         ignore_id=2, regions=BRATS,
                                         border=jnp.asarray(border))
  w = (1 + torch.tensor(border))[:, None] * valid
  per = F.binary_cross_entropy_with_logits(x, y, reduction='none')
  np.testing.assert_allclose(weighted['ce_loss'], (per * w).sum() / w.sum(), rtol=1e-6)


def test_one_region_of_class_one_is_the_binary_model():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((3, 6, 5, 1)), jnp.float32)
  labels = rng.integers(0, 3, (3, 6, 5))
  options = dict(dice_weight=1.0, ignore_id=2, focal_gamma=2.0, pos_weight=2.0)
  _, binary = losses.segmentation_loss(logits, labels, **options)
  _, region = losses.segmentation_loss(logits, labels, regions=((1,),), **options)
  for key in binary:
    np.testing.assert_allclose(region[key], binary[key], rtol=1e-6)
  valid = labels < 2
  a = losses.per_image_scores(logits, np.where(valid, labels, 0), valid)
  b = losses.per_image_scores(logits, np.where(valid, labels, 0), valid, regions=((1,),))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_region_scores_match_monai_per_image_and_region():
  from monai.metrics import DiceMetric, MeanIoU
  logits, labels = _case(4, n=6, h=12, w=10)
  labels[0] = 0                                 # no region in truth ...
  logits[0] = -5.0                              # ... nor predicted: 1, as for an absent class
  logits[1, ..., 2] = 5.0                       # enhancing predicted everywhere
  scores = losses.per_image_scores(jnp.asarray(logits), labels, regions=BRATS)
  pred = torch.tensor(logits > 0).permute(0, 3, 1, 2).float()
  y = _torch_targets(labels, BRATS)
  dice = DiceMetric(include_background=True, reduction='none', ignore_empty=False)(pred, y)
  iou = MeanIoU(include_background=True, reduction='none', ignore_empty=False)(pred, y)
  np.testing.assert_allclose(scores['dice'], dice, rtol=1e-6)
  np.testing.assert_allclose(scores['iou'], iou, rtol=1e-6)
  recall = ((pred * y).sum((2, 3)) / y.sum((2, 3)).clamp(min=1)).numpy()
  np.testing.assert_allclose(scores['class_accuracy'],
                             np.where(y.sum((2, 3)) == 0, 1.0, recall), rtol=1e-6)
  every_region_right = (pred == y).all(1).float().mean((1, 2))
  np.testing.assert_allclose(scores['pixel_accuracy'], every_region_right, rtol=1e-6)


def test_region_metrics_leave_ignored_pixels_out():
  logits, labels = _case(5, ignore=2)
  sums = losses.summed_eval_metrics(jnp.asarray(logits), labels, np.ones(len(labels), bool),
                                    ignore_id=2, regions=BRATS)
  keep = labels != 2
  ids = np.where(labels > 2, labels - 1, labels)
  pred = logits > 0
  truth = np.stack([np.isin(ids, r) for r in BRATS], -1)
  for k in range(len(BRATS)):
    dices = []
    for i in range(len(labels)):
      p, t = pred[i, ..., k][keep[i]], truth[i, ..., k][keep[i]]
      dices.append(1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum()))
    np.testing.assert_allclose(sums['dice'][k], sum(dices), rtol=1e-6)


def test_region_batch_dice_on_eight_devices_equals_one():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((8,), ('d',))
  logits, labels = _case(6, n=8, ignore=2)
  w = jnp.asarray(np.random.default_rng(7).standard_normal((3, 3)), jnp.float32)
  options = dict(dice_weight=1.0, ignore_id=2, regions=BRATS, dice_reduction='batch',
                 pos_weight=2.0)

  def loss(w, x, labels, axis_name=None):
    return losses.segmentation_loss(x @ w, labels, axis_name=axis_name, **options)[0]

  def per_device(w, x, labels):
    value, grad = jax.value_and_grad(loss)(w, x, labels, 'd')
    return jax.lax.pmean(value, 'd'), jax.lax.pmean(grad, 'd')

  sharded = [jax.device_put(jnp.asarray(a), NamedSharding(mesh, P('d')))
             for a in (logits, labels)]
  value, grad = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('d'), P('d')),
                                      out_specs=P(), check_vma=False))(w, *sharded)
  want_value, want_grad = jax.value_and_grad(loss)(w, jnp.asarray(logits), labels)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def _nnunet_paint(probabilities, regions_class_order):
  # nnU-Net's LabelManager.convert_probabilities_to_segmentation with regions, (R, H, W).
  segmentation = np.zeros(probabilities.shape[1:], dtype=np.uint16)
  for i, c in enumerate(regions_class_order):
    segmentation[probabilities[i] > 0.5] = c
  return segmentation


def test_masks_are_painted_as_nnunet_paints_them():
  rng = np.random.default_rng(8)
  probs = rng.random((5, 7, 3))
  order = regions.check_regions(BRATS)
  assert order == (1, 2, 3)
  np.testing.assert_array_equal(regions.paint(probs, order),
                                _nnunet_paint(probs.transpose(2, 0, 1), order))
  # Painting the true memberships gives the labels back.
  labels = rng.integers(0, 4, (2, 7, 5))
  targets = np.asarray(regions.region_targets(jnp.asarray(labels), BRATS))
  np.testing.assert_array_equal(regions.paint(targets, order), labels)
  # Disjoint regions paint their one class each; a given order is used as it stands.
  assert regions.check_regions(((1,), (2,))) == (1, 2)
  assert regions.check_regions(((1, 2), (2,)), order=(1, 2)) == (1, 2)


@pytest.mark.parametrize('value,order,message', [
    (((1, 2), ()), (), 'region 1 is empty'),
    (((0, 1),), (), 'class 0 is the background'),
    (((1, 1),), (), 'names a class twice'),
    (((1, 2), (2, 1)), (), 'name one set of classes twice'),
    (((3,), (2, 3)), (), 'region 0 (3,) covers no class that no later region does'),
    (((1, 2), (3,)), (), 'region 0 (1, 2) covers classes (1, 2)'),
    (((1, 2), (2,)), (1,), 'has 1 classes for 2 regions'),
    (((1, 2), (2,)), (3, 2), 'class 3, which it does not cover'),
])
def test_regions_that_cannot_be_trained_or_painted_are_refused(value, order, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    regions.check_regions(value, order)


def test_region_loss_refuses_class_weights_and_lovasz():
  logits, labels = _case(9)
  for extra in (dict(class_weights=(1.0, 2.0, 3.0)), dict(lovasz=True)):
    with pytest.raises(ValueError, match='takes no class_weights'):
      losses.segmentation_loss(jnp.asarray(logits), labels, dice_weight=1.0, regions=BRATS,
                               **extra)


# --- Through training, evaluate and predict -------------------------------------------------


def _nested_folder(root, n=12, size=32):
  """Gray masks of nested squares, BraTS-like: 1 around 2 around 3 (values 0, 1, 2, 3); in
  every other case a second, smaller object in a corner (for post-processing to remove)."""
  from PIL import Image
  os.makedirs(root / 'images'), os.makedirs(root / 'masks')
  rng = np.random.default_rng(0)
  for i in range(n):
    mask = np.zeros((size, size), np.uint8)
    y, x = rng.integers(0, 4, 2)
    for value, inset in ((1, 0), (2, 4), (3, 8)):
      if value < 3 or i % 3:                      # (some cases without class 3)
        mask[y + inset:y + 18 - inset, x + inset:x + 18 - inset] = value
    if i % 2 == 0:
      mask[24:31, 24:31] = 1
      mask[26:29, 26:29] = 2
    image = (rng.random((size, size)) * 60 + mask * 50).astype(np.uint8)
    Image.fromarray(image).save(root / 'images' / f'case{i:02d}.png')
    Image.fromarray(mask).save(root / 'masks' / f'case{i:02d}.png')


def _region_config(root, **overrides):
  return tiny_config(**{'data.name': 'image_folder', 'data.root': str(root),
                        'data.regions': BRATS, 'model.num_classes': 3, 'batch_size': 8,
                        'image_size': 32, 'num_train_steps': 30, 'eval_every_steps': 30,
                        'checkpoint_every_steps': 30, 'data.holdout_percent': 25.0,
                        # (long enough to predict some of each region, not all or nothing)
                        'model.base_features': 8, 'augment.min_scale': 1.0, **overrides})


@pytest.fixture(scope='module')
def region_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('regions')
  _nested_folder(root / 'data')
  wd = str(root / 'wd')
  metrics = train.train_and_evaluate(_region_config(root / 'data'), wd)
  return root, wd, metrics


def test_a_region_run_scores_each_region_as_evaluate_and_numpy_do(region_run):
  from unet_jax.checkpoint import load_pretrained_with_metadata
  from unet_jax.evaluate import evaluate_checkpoint
  root, wd, metrics = region_run
  assert {'dice_class0', 'dice_class1', 'dice_class2'} <= set(metrics)
  assert 'dice_class3' not in metrics
  assert 0.5 < metrics['dice_class0'] < 1  # (some of each region predicted, and not all)
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    assert json.loads(f.readlines()[-1])['eval_dice'] == metrics['dice']
  model, variables, meta = load_pretrained_with_metadata(wd)
  assert meta['regions'] == [[1, 2, 3], [2, 3], [3]] and meta['region_class_order'] == [1, 2, 3]
  got = evaluate_checkpoint(wd, per_image=True)
  assert {k: v for k, v in got.items() if k in metrics} == metrics
  assert got['regions'] == [[1, 2, 3], [2, 3], [3]]
  from unet_jax.evaluate import _report
  report = _report([wd], {k: v for k, v in got.items() if k != 'per_image'})
  assert '0 (classes 1,2,3)' in report and '2 (classes 3)' in report
  # An ensemble of the run with itself: each region's mean sigmoid is its own, so its scores.
  twice = evaluate_checkpoint([wd, wd])
  for k in ('dice', 'iou', 'dice_class2'):
    assert twice[k] == pytest.approx(metrics[k], abs=1e-6)
  # Each held-out image scored by hand: the network's logits, each region's Dice in numpy.
  config = _region_config(root / 'data')
  source = input_pipeline.load_sources(config)[1]
  dices = []
  for i in range(len(source)):
    example = input_pipeline.preprocess(input_pipeline._adapt(config, source[i]), 32, None, None)
    logits = np.asarray(model.apply(variables, example['image'][None], train=False))[0]
    row = []
    for k, region in enumerate(BRATS):
      p, t = logits[..., k] > 0, np.isin(example['mask'], region)
      row.append(1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum()))
    dices.append(row)
    if i == 0:  # the first sample PNG's row: image | truth | the mask painted from the regions
      from PIL import Image
      drawn = np.asarray(Image.open(os.path.join(wd, 'samples', 'step_0000030.png')))[:32]
      np.testing.assert_array_equal(drawn[:, 34:66, 0], example['mask'] * 85)
      painted = _nnunet_paint((logits > 0).transpose(2, 0, 1), (1, 2, 3))
      assert 0 < painted.sum()
      np.testing.assert_array_equal(drawn[:, 68:100, 0], painted * 85)
  np.testing.assert_allclose([r['dice'] for r in got['per_image']], np.mean(dices, 1),
                             rtol=1e-6)
  for k in range(3):
    np.testing.assert_allclose(metrics[f'dice_class{k}'], np.mean(dices, 0)[k], rtol=1e-5)


def test_predict_paints_a_region_runs_masks_as_nnunet(region_run, tmp_path):
  from PIL import Image

  from unet_jax.checkpoint import load_pretrained_with_metadata
  from unet_jax.predict import main as predict_main
  root, wd, _ = region_run
  images = root / 'data' / 'images'
  assert predict_main([str(images), '--checkpoint', wd, '--output', str(tmp_path / 'out'),
                       '--probabilities', '--threshold', '0.4']) == 0
  model, variables, _ = load_pretrained_with_metadata(wd)
  for name in ('case00', 'case05'):
    image = np.asarray(Image.open(images / f'{name}.png'), np.float32)[None, ..., None] / 255
    logits = np.asarray(model.apply(variables, image, train=False))[0]
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = _nnunet_paint((probs > 0.4).transpose(2, 0, 1), (1, 2, 3))
    written = np.asarray(Image.open(tmp_path / 'out' / f'{name}_mask.png'))
    np.testing.assert_array_equal(written, want)  # (the masks' values are 0, 1, 2, 3)
    np.testing.assert_allclose(np.load(tmp_path / 'out' / f'{name}_prob.npy'), probs,
                               rtol=1e-5, atol=1e-6)
  # An ensemble of the run with itself: the same probabilities, so the same masks.
  assert predict_main([str(images / 'case05.png'), '--checkpoint', wd, '--checkpoint', wd,
                       '--output', str(tmp_path / 'two'), '--threshold', '0.4']) == 0
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'two' / 'case05_mask.png')),
                                np.asarray(Image.open(tmp_path / 'out' / 'case05_mask.png')))


def test_predict_refuses_instances_of_regions(region_run, tmp_path, capsys):
  from unet_jax.predict import main as predict_main
  root, wd, _ = region_run
  assert predict_main([str(root / 'data' / 'images'), '--checkpoint', wd, '--output',
                       str(tmp_path / 'out'), '--instances']) == 2
  assert '--instances numbers the objects of each class, but this model\'s channels are ' \
         'regions that overlap' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_evaluate_refuses_leaving_class_0_out_of_regions(region_run):
  from unet_jax.errors import UserError
  from unet_jax.evaluate import evaluate_checkpoint
  _, wd, _ = region_run
  with pytest.raises(UserError, match='--noinclude_background leaves class 0 out'):
    evaluate_checkpoint(wd, include_background=False)


def _nnunet_post_by_flood_fill(classes, regions_, reference):
  """nnU-Net's region post-processing written out: each region's pixels one mask, the pixels
  `reference` (a flood fill of test_predict's on a 0/1 map) drops set to 0."""
  out = classes.copy()
  for region in regions_:
    inside = np.isin(out, region).astype(np.int32)
    out[(inside == 1) & (reference(inside) == 0)] = 0
  return out


def test_region_post_processing_is_nnunets_per_region():
  from test_predict import _largest_components_by_flood_fill, _small_regions_removed_by_flood_fill

  from unet_jax.post_processing import PostProcessing
  rng = np.random.default_rng(12)
  classes = rng.choice(4, size=(17, 23), p=[0.5, 0.2, 0.15, 0.15]).astype(np.int32)
  got = PostProcessing(largest_component=True).per_region(classes, BRATS)
  want = _nnunet_post_by_flood_fill(classes, BRATS, _largest_components_by_flood_fill)
  np.testing.assert_array_equal(got, want)
  assert (got != classes).any() and (got != PostProcessing(True)(classes)).any()
  got = PostProcessing(min_region_size=4).per_region(classes, BRATS)
  want = _nnunet_post_by_flood_fill(
      classes, BRATS, lambda m: _small_regions_removed_by_flood_fill(m, 4))
  np.testing.assert_array_equal(got, want)


def test_evaluate_scores_each_regions_surface_objects_and_the_painted_confusion(region_run):
  from test_evaluate import _monai_surface

  from unet_jax.checkpoint import load_pretrained_with_metadata
  from unet_jax.evaluate import evaluate_checkpoint
  from unet_jax.object_scores import object_counts, summed
  root, wd, metrics = region_run
  got = evaluate_checkpoint(wd, per_image=True, surface=True, objects=True, confusion=True)
  assert got['dice'] == metrics['dice']
  model, variables, _ = load_pretrained_with_metadata(wd)
  config = _region_config(root / 'data')
  source = input_pipeline.load_sources(config)[1]
  confusion, counts = np.zeros((4, 4), np.int64), []
  for i, row in enumerate(got['per_image']):
    example = input_pipeline.preprocess(input_pipeline._adapt(config, source[i]), 32, None, None)
    logits = np.asarray(model.apply(variables, example['image'][None], train=False))[0]
    truth = example['mask']
    painted = _nnunet_paint((logits > 0).transpose(2, 0, 1), (1, 2, 3))
    confusion += np.bincount(truth.ravel() * 4 + painted.ravel(), minlength=16).reshape(4, 4)
    hd95 = []
    for k, region in enumerate(BRATS):
      p, t = logits[..., k] > 0, np.isin(truth, region)
      hd95.append(_monai_surface(p, t)[0])
      counts.append(object_counts(p.astype(np.int32), t.astype(np.int32)))
      want = hd95[-1]
      assert (row[f'hd95_class{k}'] is None) == np.isnan(want)
      if not np.isnan(want):
        assert row[f'hd95_class{k}'] == pytest.approx(want, abs=1e-6)
  assert got['confusion'] == confusion.tolist()
  totals = summed(counts)
  assert got['objects_true'] == totals['objects_true'] > 0
  assert got['objects_matched'] == totals['objects_matched']
  from unet_jax.object_scores import object_scores
  for k in range(3):  # (each region's own object scores: counts[i * 3 + k] is image i's)
    own = object_scores(summed(counts[k::3]))
    assert got[f'object_f1_class{k}'] == pytest.approx(own['object_f1'], abs=1e-12)
    assert got[f'panoptic_quality_class{k}'] == pytest.approx(own['panoptic_quality'],
                                                              abs=1e-12)


@pytest.mark.parametrize('flag', ['--largest_component', '--min_region_size'])
def test_evaluate_post_processed_regions_scores_predicts_masks(region_run, tmp_path, flag):
  # What predict writes with the flag, its regions scored in NumPy, is what evaluate scores.
  from PIL import Image

  from unet_jax.evaluate import evaluate_checkpoint
  from unet_jax.predict import main as predict_main
  root, wd, _ = region_run
  config = _region_config(root / 'data')
  source = input_pipeline.load_sources(config)[1]
  names = [str(np.asarray(source[i]['file_name']).item().decode()) for i in range(len(source))]
  images = root / 'data' / 'images'
  extra = [flag] + (['60'] if flag == '--min_region_size' else [])
  assert predict_main([*(str(images / n) for n in names), '--checkpoint', wd, '--output',
                       str(tmp_path / 'out'), *extra]) == 0
  got = evaluate_checkpoint(wd, per_image=True, largest_component=flag == '--largest_component',
                            min_region_size=60 if flag == '--min_region_size' else 0)
  plain = evaluate_checkpoint(wd, per_image=True)
  changed = 0
  for row, before, name in zip(got['per_image'], plain['per_image'], names, strict=True):
    written = np.asarray(Image.open(tmp_path / 'out' / f'{os.path.splitext(name)[0]}_mask.png'))
    truth = np.asarray(Image.open(root / 'data' / 'masks' / name))
    for k, region in enumerate(BRATS):
      p, t = np.isin(written, region), np.isin(truth, region)
      want = 1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum())
      assert row[f'dice_class{k}'] == pytest.approx(want, abs=1e-6)
      changed += row[f'dice_class{k}'] != before[f'dice_class{k}']
  assert changed  # (the post-processing changed some region's score)


def test_a_run_resumed_with_other_regions_is_refused(region_run, tmp_path):
  import shutil

  from unet_jax.errors import UserError
  root, wd, _ = region_run
  copy = str(tmp_path / 'wd')
  shutil.copytree(wd, copy)
  config = _region_config(root / 'data', **{'data.regions': ((1, 2, 3), (2, 3), (2,)),
                                            'num_train_steps': 40})
  with pytest.raises(UserError, match=re.escape(
      'was saved by a run with data.regions=[[1, 2, 3], [2, 3], [3]], this config has '
      'data.regions=((1, 2, 3), (2, 3), (2,))')):
    train.train_and_evaluate(config, copy)


@pytest.mark.parametrize('overrides,message', [
    ({'model.num_classes': 4}, 'data.regions has 3 regions but model.num_classes=4: the model '
     'has one output channel per region; set --config.model.num_classes=3'),
    ({'loss': 'ce'}, "loss='ce' is a softmax over classes"),
    ({'class_weights': (1.0, 2.0, 3.0)}, 'class_weights=(1.0, 2.0, 3.0) weigh the classes of a '
     'softmax'),
    ({'lovasz': True}, 'lovasz=True is not defined for data.regions'),
    ({'balanced_class_weights': True}, 'balanced_class_weights=True weighs classes'),
    ({'data.regions': ((1, 2), (3,))}, 'data.regions: region 0 (1, 2) covers classes (1, 2) '
     'that no later region does'),
    ({'data.regions': (1, 2)}, 'data.regions=(1, 2): give a tuple of regions'),
    ({'data.regions': (), 'model.num_classes': 4, 'data.region_class_order': (1, 2)},
     'data.region_class_order=(1, 2) orders data.regions, which is not set'),
    ({'data.regions': ((1, 2), (2,)), 'model.num_classes': 2},
     "dataset 'image_folder' masks hold 4 values [0, 1, 2, 3] but data.regions cover class ids "
     'up to 2; put the classes above it in a region'),
])
def test_regions_that_do_not_fit_the_run_are_refused_before_compute(tmp_path, overrides,
                                                                    message):
  from unet_jax.errors import UserError
  _nested_folder(tmp_path / 'data', n=4)
  with pytest.raises(UserError, match=re.escape(message)):
    train.train_and_evaluate(_region_config(tmp_path / 'data', **overrides),
                             str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()


@pytest.fixture(scope='module')
def other_runs(region_run):
  """The region run's data trained again: with another seed, and with other regions."""
  root, _, _ = region_run
  seed, regions_ = str(root / 'seed1'), str(root / 'other_regions')
  train.train_and_evaluate(_region_config(root / 'data', seed=1), seed)
  train.train_and_evaluate(_region_config(root / 'data', **{
      'data.regions': ((1, 2, 3), (2, 3), (2,))}), regions_)
  return seed, regions_


def test_export_of_regions_and_their_ensemble(region_run, other_runs, tmp_path, capsys):
  from unet_jax.checkpoint import load_pretrained_with_metadata
  from unet_jax.export import main as export_main
  _, wd, _ = region_run
  seed, other = other_runs
  out = tmp_path / 'pair.jax'
  assert export_main([wd, seed, str(out)]) == 0, capsys.readouterr().err
  about = json.loads((tmp_path / 'pair.json').read_text())
  assert about['regions'] == [[1, 2, 3], [2, 3], [3]] and about['region_class_order'] == [1, 2, 3]
  x = np.random.default_rng(4).random((2, 32, 32, 1), np.float32)
  got = np.asarray(jax.export.deserialize(out.read_bytes()).call(x), np.float64)
  mean = np.mean([1 / (1 + np.exp(-np.asarray(m.apply(v, x, train=False), np.float64)))
                  for m, v, _ in map(load_pretrained_with_metadata, (wd, seed))], 0)
  np.testing.assert_allclose(1 / (1 + np.exp(-got)), mean, atol=1e-6)
  # Runs of other regions are not one task.
  assert export_main([wd, other, str(tmp_path / 'mixed.jax')]) == 2
  assert (f'{wd} and {other} cannot be averaged: their channels are other regions (data.regions '
          '[[1, 2, 3], [2, 3], [3]] and [[1, 2, 3], [2, 3], [2]], painted as classes [1, 2, 3] '
          'and [1, 3, 2])') in capsys.readouterr().err
  assert not (tmp_path / 'mixed.jax').exists()


# --- Conversion ------------------------------------------------------------------------------


def test_a_torch_region_model_converts_and_predicts_nnunets_painting(tmp_path, capsys):
  # A PyTorch UNet of 3 region channels (as nnU-Net or segmentation_models_pytorch's
  # 'multilabel' mode trains one): converted with --regions, predict paints the masks torch's
  # sigmoids give, as nnU-Net paints them.
  from conftest import move_off_init, nchw
  from PIL import Image
  from torch_reference import SeedUNet

  from unet_jax.convert import main as convert_main
  from unet_jax.predict import main as predict_main
  ref = move_off_init(SeedUNet(1, 3, base=4, depth=2), 1, 3, hw=(16, 16)).eval()
  images = np.random.default_rng(5).integers(0, 256, (2, 20, 16), np.uint8)
  x = nchw(images[..., None].astype(np.float32) / 255)
  with torch.no_grad():  # (each channel's logits about 0: every region in part of the image;
    # the midpoint of the two middle ones, so no pixel's logit is 0 within float rounding)
    ref.out_conv.conv.bias -= torch.quantile(ref(x).transpose(0, 1).flatten(1), 0.5, dim=1)
  torch.save(ref.state_dict(), tmp_path / 'regions.pth')
  ckpt = str(tmp_path / 'ckpt')
  assert convert_main(['torch-to-flax', str(tmp_path / 'regions.pth'), ckpt, '--regions',
                       '1,2,3;2,3;3', '--mask_values', '0,1,2,4']) == 0
  os.makedirs(tmp_path / 'in')
  for i, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / 'in' / f'x{i}.png')
  assert predict_main([str(tmp_path / 'in'), '--checkpoint', ckpt, '--output',
                       str(tmp_path / 'out')]) == 0, capsys.readouterr().err
  with torch.no_grad():
    probs = torch.sigmoid(ref(x))
  values = np.array([0, 1, 2, 4])
  for i, p in enumerate(probs.numpy()):
    want = values[_nnunet_paint(p, (1, 2, 3))]
    assert len(np.unique(want)) > 2                  # (several regions predicted)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / f'x{i}_mask.png')),
                                  want)
  # The Python API, given the regions: class ids.
  from unet_jax import load_pretrained
  from unet_jax.predict import predict
  model, variables = load_pretrained(ckpt)
  got = predict(model, variables, images[..., None], regions=BRATS, threshold=0.3)
  for i, p in enumerate(probs.numpy()):
    np.testing.assert_array_equal(got[i], _nnunet_paint(p > 0.3, (1, 2, 3)))
  # --largest_component: nnU-Net's post-processing of each region (not of each class).
  from test_predict import _largest_components_by_flood_fill

  from unet_jax.predict import keep_largest_component
  assert predict_main([str(tmp_path / 'in'), '--checkpoint', ckpt, '--output',
                       str(tmp_path / 'largest'), '--largest_component']) == 0
  differs = 0
  for i, p in enumerate(probs.numpy()):
    painted = _nnunet_paint(p, (1, 2, 3)).astype(np.int32)
    want = values[_nnunet_post_by_flood_fill(painted, BRATS, _largest_components_by_flood_fill)]
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / 'largest' / f'x{i}_mask.png')), want)
    differs += (want != values[keep_largest_component(painted)]).any()
  assert differs


def test_a_region_run_keeps_its_regions_through_safetensors_and_back(region_run, tmp_path,
                                                                     capsys):
  from PIL import Image

  from unet_jax.checkpoint import load_pretrained_with_metadata
  from unet_jax.convert import main as convert_main
  from unet_jax.evaluate import evaluate_checkpoint
  from unet_jax.predict import main as predict_main
  root, wd, metrics = region_run
  st, back = str(tmp_path / 'run.safetensors'), str(tmp_path / 'back')
  assert convert_main(['flax-to-torch', wd, st]) == 0
  assert convert_main(['torch-to-flax', st, back]) == 0
  _, _, meta = load_pretrained_with_metadata(back)
  assert meta['regions'] == [[1, 2, 3], [2, 3], [3]] and meta['region_class_order'] == [1, 2, 3]
  image = str(root / 'data' / 'images' / 'case03.png')
  for ckpt, out in ((wd, 'a'), (back, 'b')):
    assert predict_main([image, '--checkpoint', ckpt, '--output', str(tmp_path / out),
                         '--size', '0']) == 0
  a, b = (np.asarray(Image.open(tmp_path / d / 'case03_mask.png')) for d in 'ab')
  np.testing.assert_array_equal(a, b)
  # evaluate: the converted checkpoint's regions go into the config that names its data.
  config = _region_config(root / 'data', **{'data.regions': ()})
  got = evaluate_checkpoint(back, config)
  assert got['dice'] == pytest.approx(metrics['dice'], abs=1e-6)
  with pytest.raises(Exception, match='its channels are the regions'):
    evaluate_checkpoint(back, _region_config(root / 'data', **{
        'data.regions': ((1, 2, 3), (2, 3), (2,))}))
  # A .pth cannot record them: said, and --regions gives them back.
  capsys.readouterr()
  assert convert_main(['flax-to-torch', wd, str(tmp_path / 'run.pth')]) == 0
  assert 'which a .pth file cannot record; write a .safetensors' in capsys.readouterr().err


@pytest.mark.parametrize('flags,message', [
    (['--regions', '1,2,3;2,3'], 'has 3 output channel(s) but 2 regions are given'),
    (['--regions', '1,2;x'], "--regions '1,2;x': give each region's class ids"),
    (['--regions', '3;2,3;1,2,3'], 'regions: region 0 (3,) covers no class'),
    (['--region_class_order', '1,2,3'], '--region_class_order orders --regions, which are not '
     'given'),
    (['--regions', '1,2,3;2,3;3', '--region_class_order', '1,2'], 'regions: '
     '--region_class_order (1, 2) has 2 classes for 3 regions'),
    (['--regions', '1,2,3;2,3;3', '--region_class_order', '1;2'], "--region_class_order '1;2': "
     "give each region's class"),
    (['--regions', '1,2,3;2,3;3', '--mask_values', '0,255'], '--mask_values gives 2 value(s) '
     'but there are 4 classes (the regions cover class ids 0..3)'),
])
def test_conversion_refuses_regions_that_do_not_fit(tmp_path, capsys, flags, message):
  from torch_reference import SeedUNet

  from unet_jax.convert import main as convert_main
  torch.save(SeedUNet(1, 3, base=4, depth=1).state_dict(), tmp_path / 'm.pth')
  assert convert_main(['torch-to-flax', str(tmp_path / 'm.pth'), str(tmp_path / 'c'),
                       *flags]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1
  assert not (tmp_path / 'c').exists()


# --- score_masks --regions -------------------------------------------------------------------


def _value_label_files(tmp_path, rng):
  """Predictions and labels of BraTS's values 0, 1, 2, 4 (and 9, ignored), three sizes; value
  4 absent from image 0's truth and prediction."""
  from PIL import Image
  os.makedirs(tmp_path / 'pred'), os.makedirs(tmp_path / 'labels')
  values = np.array([0, 1, 2, 4, 9], np.uint8)
  truths, preds = [], []
  for i, (h, w) in enumerate(((19, 21), (30, 17), (26, 26))):
    truth = values[rng.choice(5, (h, w), p=[0.4, 0.2, 0.2, 0.1, 0.1])]
    pred = np.where(rng.random((h, w)) < 0.7, np.where(truth == 9, 0, truth),
                    values[rng.integers(0, 4, (h, w))])
    if i == 0:
      truth[truth == 4], pred[pred == 4] = 2, 2
    Image.fromarray(truth).save(tmp_path / 'labels' / f'c{i}.png')
    Image.fromarray(pred).save(tmp_path / 'pred' / f'c{i}.png')
    truths.append(truth), preds.append(pred)
  return truths, preds


def test_score_masks_scores_regions_of_values_as_monai_does(tmp_path, capsys):
  from monai.metrics import DiceMetric
  from test_evaluate import _monai_surface

  from unet_jax.object_scores import object_counts, summed
  from unet_jax.score_masks import main as score_main
  from unet_jax.score_masks import score_folders
  truths, preds = _value_label_files(tmp_path, np.random.default_rng(13))
  value_regions = ((1, 2, 4), (2, 4), (4,))
  got = score_folders(str(tmp_path / 'pred'), str(tmp_path / 'labels'), mask_suffix='',
                      ignore_value=9, regions=value_regions, surface=True, objects=True)
  assert got['regions'] == [[1, 2, 4], [2, 4], [4]]
  counts = []
  for row, truth, pred in zip(got['per_image'], truths, preds, strict=True):
    valid = torch.tensor(truth != 9)[None, None]
    t = torch.stack([torch.isin(torch.tensor(truth), torch.tensor(r)) for r in value_regions])
    p = torch.stack([torch.isin(torch.tensor(pred), torch.tensor(r)) for r in value_regions])
    t, p = t[None] * valid, p[None] * valid
    dice = DiceMetric(include_background=True, ignore_empty=False)(p.float(), t.float())[0]
    for k in range(3):
      assert row[f'dice_class{k}'] == pytest.approx(float(dice[k]), abs=1e-6)
      want = _monai_surface(p[0, k].numpy(), t[0, k].numpy())[0]
      assert (row[f'hd95_class{k}'] is None) == np.isnan(want)
      if not np.isnan(want):
        assert row[f'hd95_class{k}'] == pytest.approx(want, abs=1e-6)
      counts.append(object_counts(p[0, k].numpy().astype(np.int32),
                                  t[0, k].numpy().astype(np.int32)))
    assert row['dice'] == pytest.approx(float(dice.mean()), abs=1e-6)
  assert got['objects_true'] == summed(counts)['objects_true'] > 0
  # The command line: a row per region, named by its values.
  assert score_main(['--predictions', str(tmp_path / 'pred'), '--labels',
                     str(tmp_path / 'labels'), '--mask_suffix', '', '--ignore_value', '9',
                     '--regions', '1,2,4;2,4;4']) == 0
  out = capsys.readouterr().out
  assert '(values 1,2,4)' in out and '(values 4)' in out
  assert json.loads(out.strip().splitlines()[-1])['dice'] == got['dice']


@pytest.mark.parametrize('flags,message', [
    (['--confusion'], '--confusion counts classes, --regions scores sets of them'),
    (['--noinclude_background'], '--noinclude_background leaves class 0 out of the means, but '
     '--regions scores the regions alone'),
    (['--class_names', 'whole,core'], '--class_names names 2 class(es) but there are 3 '
     '(--regions gives 3 region(s))'),
    (['--regions', '1;x'], "--regions '1;x': give each region's class ids"),
    (['--regions', '1,1;2'], '--regions: region 0 names a value twice'),
])
def test_score_masks_refuses_what_regions_do_not_define(tmp_path, capsys, flags, message):
  from unet_jax.score_masks import main as score_main
  _value_label_files(tmp_path, np.random.default_rng(14))
  assert score_main(['--predictions', str(tmp_path / 'pred'), '--labels',
                     str(tmp_path / 'labels'), '--mask_suffix', '', '--regions',
                     '1,2,4;2,4;4', *flags]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1


def test_a_cross_validation_of_region_folds_pools_their_regions(tmp_path):
  from unet_jax.evaluate import cross_validation, evaluate_checkpoint
  _nested_folder(tmp_path / 'data', n=16)
  folds = []
  for fold in range(2):
    folds.append(str(tmp_path / f'fold{fold}'))
    train.train_and_evaluate(_region_config(tmp_path / 'data', **{
        'data.num_folds': 2, 'data.fold': fold, 'data.holdout_percent': 10.0}), folds[-1])
  got = cross_validation(folds, per_image=True, objects=True)
  assert got['regions'] == [[1, 2, 3], [2, 3], [3]] and got['images'] == 16
  each = [evaluate_checkpoint(f, objects=True) for f in folds]
  assert got['objects_true'] == each[0]['objects_true'] + each[1]['objects_true']
  # Each region's counts pooled over both folds' held-out images, counted here.
  from unet_jax.checkpoint import load_pretrained_with_metadata
  from unet_jax.object_scores import object_counts, per_class, summed_per_class
  counts = []
  for fold, wd in enumerate(folds):
    model, variables, _ = load_pretrained_with_metadata(wd)
    config = _region_config(tmp_path / 'data', **{
        'data.num_folds': 2, 'data.fold': fold, 'data.holdout_percent': 10.0})
    source = input_pipeline.load_sources(config)[1]
    for i in range(len(source)):
      example = input_pipeline.preprocess(input_pipeline._adapt(config, source[i]), 32, None,
                                          None)
      logits = np.asarray(model.apply(variables, example['image'][None], train=False))[0]
      counts.append({k: object_counts((logits[..., k] > 0).astype(np.int32),
                                      np.isin(example['mask'], r).astype(np.int32))
                     for k, r in enumerate(BRATS)})
  want = per_class(summed_per_class(counts))
  for k in range(3):
    for name in ('object_f1', 'panoptic_quality'):
      assert got[f'{name}_class{k}'] == pytest.approx(want[f'{name}_class{k}'], abs=1e-12)
  for k in range(3):
    assert got[f'dice_class{k}'] == pytest.approx(
        np.mean([r[f'dice_class{k}'] for r in got['per_image']]), abs=1e-6)
    assert got[f'dice_class{k}'] == pytest.approx(
        (each[0][f'dice_class{k}'] + each[1][f'dice_class{k}']) / 2, abs=1e-6)

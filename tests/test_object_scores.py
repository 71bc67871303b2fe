"""Object scores: counts against every pair of regions measured by a flood fill, the formulas on
a worked case, and through score_masks."""

import json

import numpy as np
from PIL import Image

from unet_jax.object_scores import object_counts, object_scores
from unet_jax.score_masks import main


def _regions(classes):
  """(class, set of pixels) of each 4-connected region of each class but 0, by flood fill."""
  seen, found = np.zeros(classes.shape, bool), []
  for y, x in zip(*np.nonzero(classes), strict=True):
    if seen[y, x]:
      continue
    region, todo, c = set(), [(y, x)], classes[y, x]
    seen[y, x] = True
    while todo:
      cy, cx = todo.pop()
      region.add((cy, cx))
      for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
        if (0 <= ny < classes.shape[0] and 0 <= nx < classes.shape[1] and not seen[ny, nx]
            and classes[ny, nx] == c):
          seen[ny, nx] = True
          todo.append((ny, nx))
    found.append((c, region))
  return found


def _counts_by_every_pair(pred, truth):
  """Every (true, predicted) pair of one class, its IoU from the pixel sets; matched above 0.5
  (and each object matched at most once: asserted)."""
  true_objects, pred_objects = _regions(truth), _regions(pred)
  matched, iou_sum, partners = 0, 0.0, {}
  for i, (ct, t) in enumerate(true_objects):
    for j, (cp, p) in enumerate(pred_objects):
      iou = len(t & p) / len(t | p) if ct == cp else 0.0
      if iou > 0.5:
        matched += 1
        iou_sum += iou
        partners.setdefault(('t', i), []).append(j)
        partners.setdefault(('p', j), []).append(i)
  assert all(len(v) == 1 for v in partners.values())
  return {'objects_true': len(true_objects), 'objects_predicted': len(pred_objects),
          'objects_matched': matched, 'matched_iou': iou_sum}


def _blobs(rng, shape, count, classes):
  out = np.zeros(shape, np.int64)
  for _ in range(count):
    y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
    h, w = rng.integers(2, 8, 2)
    out[y:y + h, x:x + w] = rng.integers(1, classes)
  return out


def test_object_counts_match_every_pair_measured():
  rng = np.random.default_rng(0)
  seen = []
  for trial in range(12):
    truth = _blobs(rng, (30, 34), 12, 3)
    # The truth shifted by a pixel, some objects cut, some added, some relabelled.
    pred = np.roll(truth, rng.integers(-1, 2, 2), axis=(0, 1))
    pred[rng.random(pred.shape) < 0.05] = 0
    pred = np.maximum(pred, _blobs(rng, pred.shape, 3, 3))
    pred[pred == 2] = np.where(trial % 3, 2, 1)
    got = object_counts(pred, truth)
    want = _counts_by_every_pair(pred, truth)
    assert {k: got[k] for k in want if k != 'matched_iou'} == {
        k: float(v) for k, v in want.items() if k != 'matched_iou'}
    assert abs(got['matched_iou'] - want['matched_iou']) < 1e-9
    seen.append((got['objects_matched'], got['objects_true']))
  assert all(m < t for m, t in seen) and sum(m for m, _ in seen) > 20  # (some found, not all)
  # Ignored pixels are in neither map.
  valid = rng.random(truth.shape) > 0.3
  np.testing.assert_equal(object_counts(pred, truth, valid),
                          object_counts(np.where(valid, pred, 0), np.where(valid, truth, 0)))


def test_object_scores_on_a_worked_case():
  truth = np.zeros((6, 12), np.int64)
  truth[0:2, 0:2] = 1                                      # found exactly: IoU 1
  truth[0:2, 4:9] = 1                                      # found as 3 of 5 columns: IoU 0.6
  truth[4:6, 0:2] = 1                                      # missed
  pred = np.zeros_like(truth)
  pred[0:2, 0:2] = 1
  pred[0:2, 4:7] = 1
  pred[4:6, 8:10] = 1                                      # invented
  counts = object_counts(pred, truth)
  assert counts == {'objects_true': 3, 'objects_predicted': 3, 'objects_matched': 2,
                    'matched_iou': 1.6}
  scores = object_scores(counts)
  assert scores['object_precision'] == scores['object_recall'] == scores['object_f1'] == 2 / 3
  assert abs(scores['panoptic_quality'] - 1.6 / 3) < 1e-12  # (1.6 / (2 + 1/2 + 1/2))
  assert object_scores(object_counts(np.zeros((3, 3)), np.zeros((3, 3)))) == {
      'object_precision': 1.0, 'object_recall': 1.0, 'object_f1': 1.0, 'panoptic_quality': 1.0}


def test_score_masks_reports_object_scores(tmp_path, capsys):
  rng = np.random.default_rng(3)
  (tmp_path / 'pred').mkdir(), (tmp_path / 'labels').mkdir()
  total = dict.fromkeys(('objects_true', 'objects_predicted', 'objects_matched'), 0)
  iou = 0.0
  for i in range(3):
    truth = _blobs(rng, (24, 28), 8, 3)
    pred = np.roll(truth, 1, axis=1)
    pred[rng.random(pred.shape) < 0.05] = 0
    Image.fromarray((truth * 100).astype(np.uint8)).save(tmp_path / 'labels' / f'c{i}.png')
    Image.fromarray((pred * 100).astype(np.uint8)).save(tmp_path / 'pred' / f'c{i}_mask.png')
    want = _counts_by_every_pair(pred, truth)
    iou += want.pop('matched_iou')
    total = {k: total[k] + want[k] for k in total}
  assert main(['--predictions', str(tmp_path / 'pred'), '--labels', str(tmp_path / 'labels'),
               '--objects']) == 0
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert {k: metrics[k] for k in total} == total
  tp, t, p = total['objects_matched'], total['objects_true'], total['objects_predicted']
  assert abs(metrics['object_f1'] - 2 * tp / (t + p)) < 1e-12
  assert abs(metrics['panoptic_quality'] - iou / (tp + (p - tp) / 2 + (t - tp) / 2)) < 1e-12
  assert 0.2 < metrics['object_f1'] < 1


def test_each_class_is_scored_alone_and_the_classes_add_up(tmp_path, capsys):
  # Three classes of blobs: each class's counts by every pair of that class's regions alone;
  # the classes' counts add up to all; score_masks reports each class's scores.
  from unet_jax.object_scores import class_counts, per_class, summed
  rng = np.random.default_rng(5)
  (tmp_path / 'pred').mkdir(), (tmp_path / 'labels').mkdir()
  totals = {c: dict.fromkeys(('objects_true', 'objects_predicted', 'objects_matched',
                              'matched_iou'), 0.0) for c in (1, 2, 3)}
  for i in range(3):
    truth = _blobs(rng, (30, 34), 14, 4)
    pred = np.roll(truth, rng.integers(-1, 2, 2), axis=(0, 1))
    pred[rng.random(pred.shape) < 0.05] = 0
    pred[pred == 3] = np.where(i == 0, 2, 3)                 # (one image: class 3 taken for 2)
    each = class_counts(pred, truth, None, (1, 2, 3))
    total, whole = summed(each), object_counts(pred, truth)
    assert {k: total[k] for k in whole if k != 'matched_iou'} == {
        k: whole[k] for k in whole if k != 'matched_iou'}
    assert abs(total['matched_iou'] - whole['matched_iou']) < 1e-9   # (summed in another order)
    for c, counts in zip((1, 2, 3), each, strict=True):
      want = _counts_by_every_pair(np.where(pred == c, c, 0), np.where(truth == c, c, 0))
      assert counts['objects_matched'] == want['objects_matched']
      assert abs(counts['matched_iou'] - want['matched_iou']) < 1e-9
      totals[c] = {k: totals[c][k] + want[k] for k in totals[c]}
    Image.fromarray((truth * 60).astype(np.uint8)).save(tmp_path / 'labels' / f'c{i}.png')
    Image.fromarray((pred * 60).astype(np.uint8)).save(tmp_path / 'pred' / f'c{i}_mask.png')
  assert main(['--predictions', str(tmp_path / 'pred'), '--labels', str(tmp_path / 'labels'),
               '--objects']) == 0
  out = capsys.readouterr().out
  metrics = json.loads(out.strip().splitlines()[-1])
  want = per_class(totals)
  for c in (1, 2, 3):
    for name in ('object_f1', 'panoptic_quality'):
      assert abs(metrics[f'{name}_class{c}'] - want[f'{name}_class{c}']) < 1e-12
  assert 'object_f1_class0' not in metrics
  assert len({metrics[f'object_f1_class{c}'] for c in (1, 2, 3)}) == 3  # (they differ)
  assert 'object_f1' in out.splitlines()[2]                             # (a table column)

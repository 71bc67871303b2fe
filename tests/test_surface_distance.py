"""HD95, ASSD and NSD (unet_jax/surface_distance.py) against MONAI's metrics and a brute-force
reference: boundaries found by looking at each pixel's four neighbours, distances as the
minimum over every pair of boundary pixels."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from unet_jax.surface_distance import mean_surface_scores, surface_scores


def _label_maps(seed, shape=(24, 20), classes=3):
  """Two class-id maps like a truth and a prediction: smoothed noise cut into `classes` bands,
  so that each class has several blobs, holes and pixels on the image's border."""
  rng = np.random.default_rng(seed)
  maps = []
  for _ in range(2):
    field = ndimage.gaussian_filter(rng.random(shape), 2)
    maps.append(np.digitize(field, np.quantile(field, np.linspace(0, 1, classes + 1)[1:-1])))
  return maps


def _brute_force(pred, truth, valid, tolerance=1.0):
  """HD95, ASSD and NSD of two non-empty boolean masks, written without SciPy."""
  def edge_points(mask):
    m = np.pad(mask & valid, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return np.argwhere((mask & valid) & ~inner).astype(float)

  p, t = edge_points(pred), edge_points(truth)
  pairwise = np.sqrt(((p[:, None] - t[None]) ** 2).sum(-1))
  to_truth, to_pred = pairwise.min(1), pairwise.min(0)
  both = np.concatenate([to_truth, to_pred])
  return (max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)), both.mean(),
          np.sum(both <= tolerance) / len(both))


@pytest.mark.parametrize('seed', range(4))
def test_scores_match_brute_force_with_ignored_pixels(seed):
  truth, pred = _label_maps(seed)
  valid = np.random.default_rng(seed + 10).random(truth.shape) > 0.1
  tolerance = (0.0, 1.0, 1.5, 3.0)[seed]
  got = surface_scores(pred, truth, range(3), valid, nsd_tolerance=tolerance)
  for c in range(3):
    hd95, assd, nsd = _brute_force(pred == c, truth == c, valid, tolerance)
    assert got['hd95'][c] == pytest.approx(hd95, abs=1e-9)
    assert got['assd'][c] == pytest.approx(assd, abs=1e-9)
    assert got['nsd'][c] == pytest.approx(nsd, abs=1e-12)


@pytest.mark.filterwarnings('ignore:the (prediction|ground truth) of class')  # (MONAI's, empty)
def test_scores_match_monai():
  from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
  maps = [_label_maps(seed) for seed in range(6)]
  truth, pred = (torch.nn.functional.one_hot(torch.tensor(np.stack(m)), 3).permute(0, 3, 1, 2)
                 for m in zip(*maps, strict=True))
  want_hd95 = compute_hausdorff_distance(pred, truth, include_background=True, percentile=95)
  want_assd = compute_average_surface_distance(pred, truth, include_background=True,
                                               symmetric=True)
  got = [surface_scores(p, t, range(3)) for t, p in maps]
  assert np.all(np.isfinite(want_hd95.numpy())) and want_hd95.max() > 2
  np.testing.assert_allclose([g['hd95'] for g in got], want_hd95.numpy(), rtol=1e-6)
  np.testing.assert_allclose([g['assd'] for g in got], want_assd.numpy(), rtol=1e-6)
  # NSD: MONAI's compute_surface_dice, one tolerance for every class; a class missed in an
  # image scores 0 there, as MONAI's, and one in neither mask NaN.
  from monai.metrics import compute_surface_dice
  maps.append((np.zeros((24, 20), int), np.ones((24, 20), int)))  # (class 0 missed, 2 absent)
  truth, pred = (torch.nn.functional.one_hot(torch.tensor(np.stack(m)), 3).permute(0, 3, 1, 2)
                 for m in zip(*maps, strict=True))
  for tolerance in (0.0, 1.0, 2.5):
    want = compute_surface_dice(pred, truth, [tolerance] * 3, include_background=True).numpy()
    got = np.array([surface_scores(p, t, range(3), nsd_tolerance=tolerance)['nsd']
                    for t, p in maps])
    assert 0.05 < np.nanmean(got) < 0.95 or tolerance == 2.5
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[-1][0] == 0 and np.isnan(got[-1][2])


def test_empty_masks():
  """Both empty: NaN (left out of the means, as MONAI does); one empty: the diagonal."""
  truth = np.zeros((30, 40), int)
  truth[5:9, 5:9] = 1
  got = surface_scores(np.zeros_like(truth), truth, [1, 2])
  assert got['hd95'][0] == got['assd'][0] == 50.0  # missed: the diagonal of 30x40
  assert got['nsd'][0] == 0.0  # (no boundary pixel near an empty one)
  assert np.isnan(got['hd95'][1]) and np.isnan(got['assd'][1]) and np.isnan(got['nsd'][1])
  got = surface_scores(truth, np.zeros_like(truth), [1])  # invented
  assert got['hd95'][0] == got['assd'][0] == 50.0 and got['nsd'][0] == 0.0
  # Pixels outside `valid` are in neither mask: the square, ignored, is no object at all.
  got = surface_scores(truth, truth, [1], valid=truth == 0)
  assert np.isnan(got['hd95'][0]) and np.isnan(got['assd'][0])


def test_means_are_monais_reductions():
  from monai.metrics.utils import do_metric_reduction
  rng = np.random.default_rng(0)
  table = rng.random((7, 3)) * 10
  table[rng.random(table.shape) < 0.3] = np.nan
  table[:, 2] = np.nan  # a class in no image
  per_image = [{'hd95': row, 'assd': row * 2, 'nsd': row / 10} for row in table]
  got = mean_surface_scores(per_image)
  want_mean = do_metric_reduction(torch.tensor(table), 'mean')[0]
  want_batch = do_metric_reduction(torch.tensor(table), 'mean_batch')[0]
  assert got['hd95'] == pytest.approx(float(want_mean), rel=1e-6)  # (MONAI: float32)
  assert got['assd'] == pytest.approx(2 * float(want_mean), rel=1e-6)
  assert got['nsd'] == pytest.approx(float(want_mean) / 10, rel=1e-6)
  assert [got['hd95_class0'], got['hd95_class1']] == pytest.approx(want_batch[:2].tolist())
  assert got['hd95_class2'] is None  # (MONAI: 0 for a column that is all NaN)
  # Without the background: MONAI's include_background=False drops class 0's column first;
  # each class's own mean stays.
  got = mean_surface_scores(per_image, include_background=False)
  want = float(do_metric_reduction(torch.tensor(table[:, 1:]), 'mean')[0])
  assert got['hd95'] == pytest.approx(want, rel=1e-6) != float(want_mean)
  assert got['hd95_class0'] == pytest.approx(float(want_batch[0]))
  assert mean_surface_scores([{'hd95': np.array([0.5]), 'assd': np.array([np.nan]),
                               'nsd': np.array([1.0])}]) == {'hd95': 0.5, 'assd': None, 'nsd': 1.0}

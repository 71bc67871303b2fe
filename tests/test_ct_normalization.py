"""data.normalize='ct': nnU-Net's CT normalisation, against nnU-Net's fingerprint statistics and
CTNormalization written again here from its code (DatasetFingerprintExtractor,
collect_foreground_intensities; CTNormalization.run), on the files' own 16-bit values."""

import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from test_train import tiny_config

from unet_jax import input_pipeline, train
from unet_jax.checkpoint import load_pretrained_with_metadata
from unet_jax.ct_normalization import CTStatistics, foreground_statistics
from unet_jax.errors import UserError
from unet_jax.evaluate import evaluate_checkpoint
from unet_jax.export import export_checkpoint
from unet_jax.predict import main as predict_main
from unet_jax.predict import probabilities

SAMPLES = 60_000  # (nnU-Net draws 10e7 in all; as many per case here would take a while)


def nnunet_fingerprint(cases, num_samples):
  """nnU-Net's foreground_intensity_properties_per_channel of `cases`, each (images (C, H, W)
  float32 as its reader gives them, seg (H, W))."""
  per_case = int(num_samples // len(cases))
  pooled = [[] for _ in range(len(cases[0][0]))]
  for images, seg in cases:
    rs = np.random.RandomState(1234)
    foreground = seg > 0
    for i in range(len(images)):
      pixels = images[i][foreground]
      pooled[i].append(rs.choice(pixels, per_case, replace=True) if len(pixels) else [])
  properties = []
  for samples in pooled:
    values = np.concatenate(samples)
    low, _, high = np.percentile(values, (0.5, 50.0, 99.5))
    properties.append({'mean': float(np.mean(values)), 'std': float(np.std(values)),
                       'percentile_00_5': float(low), 'percentile_99_5': float(high)})
  return properties


def nnunet_ct_normalization(image, properties):
  """CTNormalization.run on one channel (H, W)."""
  image = image.astype(np.float32, copy=True)
  np.clip(image, properties['percentile_00_5'], properties['percentile_99_5'], out=image)
  image -= properties['mean']
  image /= max(properties['std'], 1e-8)
  return image


def _ct_folder(root, n=12, size=(32, 32)):
  """nnU-Net's raw 2D layout, two 16-bit channels per case (a CT's HU + 1024 and another of
  its own range), labels 0..2; the raw (C, H, W) float32 images and labels, by case."""
  os.makedirs(root / 'imagesTr'), os.makedirs(root / 'labelsTr')
  rng = np.random.default_rng(7)
  cases = {}
  for k in range(n):
    labels = np.zeros(size, np.uint8)
    labels[rng.integers(0, 12):rng.integers(18, 32), rng.integers(0, 12):] = 1
    labels[rng.integers(20, 28):, :rng.integers(4, 10)] = 2
    hu = rng.normal(-700, 200, size) + (labels == 1) * rng.normal(750, 150, size) + (
        labels == 2) * 1700
    channels = [np.clip(hu + 1024, 0, 65535).astype(np.uint16),
                rng.integers(20000, 40000, size).astype(np.uint16)]
    for c, channel in enumerate(channels):
      Image.fromarray(channel).save(root / 'imagesTr' / f'case{k}_000{c}.png')
    Image.fromarray(labels).save(root / 'labelsTr' / f'case{k}.png')
    cases[f'case{k}'] = (np.stack(channels).astype(np.float32), labels)
  with open(root / 'dataset.json', 'w') as f:
    json.dump({'channel_names': {'0': 'CT', '1': 'CT'}, 'labels': {
        'background': 0, 'organ': 1, 'bone': 2}}, f)
  return cases


def _config(tmp_path, root, **more):
  return tiny_config(**{
      'data.name': 'image_folder', 'data.root': str(root), 'data.data_dir': str(tmp_path / 'tfds'),
      'data.images_dir': 'imagesTr', 'data.masks_dir': 'labelsTr',
      'data.image_suffix': '_0000,_0001', 'data.num_folds': 3, 'data.normalize': 'ct',
      'data.ct_samples': SAMPLES, 'model.in_channels': 2, 'model.num_classes': 3,
      'image_size': 32, 'batch_size': 8, 'num_train_steps': 2, 'eval_every_steps': 2,
      'checkpoint_every_steps': 2, **more})


def test_ct_statistics_are_nnunets_fingerprint_of_every_case_on_the_files_values(tmp_path):
  # Of all the folder's cases (nnU-Net's fingerprint takes all of imagesTr): every fold alike.
  cases = _ct_folder(tmp_path / 'd')
  want = nnunet_fingerprint(list(cases.values()), SAMPLES)
  for fold in (0, 2):
    config = _config(tmp_path, tmp_path / 'd', **{'data.fold': fold})
    train_source, _, _ = input_pipeline.load_sources(config)
    assert len(train_source) == 8
    got = input_pipeline.ct_statistics(config, train_source)
    for channel, properties in enumerate(want):  # (the images in [0, 1]: the values / 65535)
      for field, value in properties.items():
        np.testing.assert_allclose(getattr(got, field)[channel] * 65535, value, rtol=2e-6)
  # With an ignored label, nnU-Net's highest: its pixels count (nnU-Net's seg > 0), class 0's
  # not; here the ignored value 0 sorts first, which makes class 0 label 1.
  config = _config(tmp_path, tmp_path / 'd', **{'data.ignore_value': 0})
  train_source, _, info = input_pipeline.load_sources(config)
  assert info.ignore_id == 0
  got_ignoring = input_pipeline.ct_statistics(config, train_source, info.ignore_id)
  nnunet_labels = [(images, np.where(labels == 1, 0, np.where(labels == 0, 3, labels)))
                   for images, labels in cases.values()]  # (background 0; ignore 3, the highest)
  for channel, properties in enumerate(nnunet_fingerprint(nnunet_labels, SAMPLES)):
    for field, value in properties.items():
      np.testing.assert_allclose(getattr(got_ignoring, field)[channel] * 65535, value, rtol=2e-6)
  # Each training example is nnU-Net's CT normalisation of the case's own values.
  record = input_pipeline._adapt(config, train_source[0])
  name = train_source[0]['file_name'].decode()[:-len('_0000.png')]
  x = input_pipeline.preprocess(record, (32, 32), None, None, normalize=got)['image']
  for channel, properties in enumerate(want):
    np.testing.assert_allclose(x[..., channel],
                               nnunet_ct_normalization(cases[name][0][channel], properties),
                               atol=2e-5)
  assert np.abs(x).max() > 1  # (not [0, 1]: the test can tell)


def test_ct_normalisation_trains_and_predict_evaluate_and_export_normalise_as_it_did(
    tmp_path, capsys):
  cases = _ct_folder(tmp_path / 'd')
  config = _config(tmp_path, tmp_path / 'd')
  wd = str(tmp_path / 'wd')
  metrics = train.train_and_evaluate(config, wd)
  out = capsys.readouterr()
  assert "data.normalize='ct': the training foreground's mean " in out.out
  assert 'dataset.json names the channels' not in out.err  # (CT: as nnU-Net normalises them)
  model, variables, meta = load_pretrained_with_metadata(wd)
  statistics = CTStatistics.from_dict(meta['ct_statistics'])
  assert meta['normalize'] == 'ct' and statistics == input_pipeline.ct_statistics(
      config, input_pipeline.load_sources(config)[0])
  assert evaluate_checkpoint(wd)['dice'] == metrics['dice']
  # (scored on data a config names, which holds no statistics: the checkpoint's)
  scored = evaluate_checkpoint(wd, config=_config(tmp_path, tmp_path / 'd'))
  assert scored['dice'] == metrics['dice']
  # predict: the network's input is nnU-Net's CT normalisation of each case's own values.
  want = nnunet_fingerprint(list(cases.values()), SAMPLES)
  assert predict_main([str(tmp_path / 'd' / 'imagesTr'), '--checkpoint', wd, '--image_suffix',
                       '_0000,_0001', '--output', str(tmp_path / 'out'), '--probabilities']) == 0
  assert 'CT-normalised by the training foreground' in capsys.readouterr().out
  for name in ('case0', 'case4'):
    x = np.stack([nnunet_ct_normalization(cases[name][0][c], want[c]) for c in range(2)], -1)
    expected = probabilities(np.asarray(model.apply(variables, x[None], train=False)))[0]
    np.testing.assert_allclose(np.load(tmp_path / 'out' / f'{name}_prob.npy'), expected,
                               atol=2e-5)
  # export: inside the artifact, which takes the images in [0, 1].
  artifact, description = export_checkpoint([wd])
  assert description['normalize'] == 'ct, inside the artifact'
  assert description['ct_statistics'] == statistics.to_dict()
  exported = jax.export.deserialize(artifact)
  scaled = np.moveaxis(cases['case4'][0], 0, -1) / np.float32(65535)
  np.testing.assert_allclose(
      probabilities(np.asarray(exported.call(scaled[None]))),
      np.load(tmp_path / 'out' / 'case4_prob.npy')[None], atol=2e-5)
  # flax-to-torch's .safetensors carries it in its header (a .pth: what a strict load takes),
  # and torch-to-flax brings it back: predict then gives the same masks.
  from safetensors import safe_open

  from unet_jax.convert import flax_to_torch, torch_to_flax
  from unet_jax.state_dict_io import read_state_dict, write_state_dict
  flax_to_torch(wd, str(tmp_path / 'ct.safetensors'))
  with safe_open(str(tmp_path / 'ct.safetensors'), 'np') as f:
    header = f.metadata()
  assert header['normalize'] == '"ct"'
  assert json.loads(header['ct_statistics']) == statistics.to_dict()
  back = torch_to_flax(str(tmp_path / 'ct.safetensors'), str(tmp_path / 'back'))
  assert load_pretrained_with_metadata(back)[2]['ct_statistics'] == statistics.to_dict()
  assert predict_main([str(tmp_path / 'd' / 'imagesTr'), '--checkpoint', back, '--image_suffix',
                       '_0000,_0001', '--output', str(tmp_path / 'out2'), '--probabilities']) == 0
  np.testing.assert_array_equal(np.load(tmp_path / 'out2' / 'case4_prob.npy'),
                                np.load(tmp_path / 'out' / 'case4_prob.npy'))
  with pytest.raises(UserError, match=re.escape(
      f"{tmp_path}/ct.safetensors: records that its images were normalised 'ct', not 'zscore'; "
      'leave out --normalize')):
    torch_to_flax(str(tmp_path / 'ct.safetensors'), str(tmp_path / 'z'), normalize='zscore')
  tensors, extras = read_state_dict(str(tmp_path / 'ct.safetensors'))
  for header, message in (({'normalize': 'percentile'}, "its header records normalize "
                           "'percentile', which this project does not know (unit, zscore, "
                           'minmax, ct); remove it from the header'),
                          ({'normalize': 'ct', 'ct_statistics': {'mean': [0.1]}}, "records "
                           "normalize 'ct' without its ct_statistics (mean, std, percentile_00_5, "
                           'percentile_99_5, a list per channel); write it with flax-to-torch '
                           'from the training run'),
                          ({'ct_statistics': dict(statistics.to_dict(), mean=[0.1])}, 'its '
                           'ct_statistics give 1 or 2 channel(s), but the model takes 2; write '
                           'it with flax-to-torch from the training run')):
    write_state_dict(str(tmp_path / 'bad.safetensors'), tensors, dict(extras, **header))
    with pytest.raises(UserError, match=re.escape(f'{tmp_path}/bad.safetensors: {message}')):
      torch_to_flax(str(tmp_path / 'bad.safetensors'), str(tmp_path / 'bad'))
    assert not (tmp_path / 'bad').exists()
  flax_to_torch(wd, str(tmp_path / 'ct.pth'))
  entries = set(torch.load(tmp_path / 'ct.pth', weights_only=True))
  assert not entries & {'normalize', 'ct_statistics'}
  assert 'down1.downsampling.1.double_conv.0.weight' in entries
  # A command's --normalize cannot be 'ct': only a run gathers the statistics.
  assert predict_main([str(tmp_path / 'd' / 'imagesTr'), '--checkpoint', wd, '--image_suffix',
                       '_0000,_0001', '--output', str(tmp_path / 'o2'), '--normalize',
                       'ct']) == 2
  assert capsys.readouterr().err.strip() == (
      "error: --normalize ct: nnU-Net's CT normalisation uses statistics of the training data, "
      "which only a checkpoint trained here with data.normalize='ct' records; predict with such "
      'a checkpoint, or give unit, zscore or minmax')
  assert not (tmp_path / 'o2').exists()


def test_a_resumed_run_normalises_by_the_statistics_its_checkpoint_recorded(
    tmp_path, monkeypatch, capsys):
  # Before, a resume gathered them again: the work twice, and other statistics mid-run if the
  # folder had changed.
  _ct_folder(tmp_path / 'd')
  wd = str(tmp_path / 'wd')
  train.train_and_evaluate(_config(tmp_path, tmp_path / 'd'), wd)
  first = load_pretrained_with_metadata(wd)[2]['ct_statistics']
  assert ("data.normalize='ct': gathering the training foreground's statistics "
          f'(data.ct_samples={SAMPLES:,} pixels per channel)') in capsys.readouterr().out

  def gathered(*args, **kwargs):
    raise AssertionError('the statistics were gathered again')

  monkeypatch.setattr(input_pipeline, 'ct_statistics', gathered)
  train.train_and_evaluate(_config(tmp_path, tmp_path / 'd', num_train_steps=4), wd)
  out = capsys.readouterr().out
  assert f'(images in [0, 1]), as {wd}/checkpoints/2 recorded them' in out
  assert 'gathering' not in out
  assert f'resumed from {wd}/checkpoints/2' in out
  _, _, meta = load_pretrained_with_metadata(wd)
  assert meta['step'] == 4 and meta['ct_statistics'] == first
  # Another normalisation is refused, a 'ct' one before it gathers anything.
  for runs, resumes, workdir in (('ct', 'zscore', wd), ('unit', 'ct', str(tmp_path / 'unit'))):
    if runs == 'unit':
      monkeypatch.undo()
      train.train_and_evaluate(_config(tmp_path, tmp_path / 'd', **{'data.normalize': 'unit'}),
                               workdir)
      monkeypatch.setattr(input_pipeline, 'ct_statistics', gathered)
    with pytest.raises(UserError, match=re.escape(
        f'{workdir}/checkpoints/{4 if runs == "ct" else 2} was saved by a run with '
        f'data.normalize={runs}, this config has data.normalize={resumes}; rerun with its '
        'settings to resume it, or choose another --workdir for a new run')):
      train.train_and_evaluate(_config(tmp_path, tmp_path / 'd', num_train_steps=6,
                                       **{'data.normalize': resumes}), workdir)


def test_ct_statistics_need_foreground():
  image, mask = np.zeros((8, 8, 1), np.float32), np.zeros((8, 8), np.uint8)
  with pytest.raises(UserError, match=re.escape(
      "data.normalize='ct' takes its statistics from the training masks' foreground (every "
      "class but 0), but they have none; label the foreground, or use data.normalize='zscore'")):
    foreground_statistics([(image, mask)] * 3, 3, 1000)
  mask[2:4, 2:4] = 1  # (one case's foreground is enough)
  got = foreground_statistics([(image + 0.5, mask)] + [(image, mask * 0)] * 2, 3, 999)
  assert got == CTStatistics((0.5,), (0.0,), (0.5,), (0.5,))


def test_an_ensemble_is_refused_where_its_members_ct_statistics_differ():
  from unet_jax import UNet
  from unet_jax.ensemble import _check_one_task
  statistics = CTStatistics((0.1,), (0.2,), (0.0,), (1.0,))
  meta = {'normalize': 'ct', 'ct_statistics': statistics.to_dict()}
  other = dict(meta, ct_statistics=dict(meta['ct_statistics'], std=(0.3,)))
  model = UNet(base_features=4, depth=1)
  _check_one_task(['a', 'b'], [(model, None, meta), (model, None, dict(meta))])
  with pytest.raises(UserError, match=re.escape(
      "a and b cannot be averaged: their data.normalize='ct' statistics differ (they trained on "
      "other data); ensemble checkpoints trained on the same data, e.g. the folds of one "
      "folder's cross-validation")):
    _check_one_task(['a', 'b'], [(model, None, meta), (model, None, other)])


def test_the_cost_benchmark_prints_its_measurement():
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, 'benchmarks/ct_statistics_cost.py', '--cases', '3',
                        '--size', '16', '--channels', '2', '--samples', '3000'], cwd=repo,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  line = json.loads(run.stdout)
  assert line['samples'] == 3000 and line['channels'] == 2 and line['peak_rss_mb'] > 0

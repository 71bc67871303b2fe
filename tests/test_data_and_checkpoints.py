"""The image-folder dataset, the data order contract, and checkpoint retention."""

import copy
import csv
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from conftest import TFDS_DIR
from PIL import Image
from test_train import REPO, _env, override, tiny_config

from configs import milesial
from unet_jax import UNet, init_variables, input_pipeline, train
from unet_jax.checkpoint import load_pretrained_with_metadata, save_pretrained
from unet_jax.datasets.image_folder import (
    FolderLayout,
    dataset_json_class_names,
    find_pairs,
    fingerprint,
    scan,
)
from unet_jax.errors import UserError
from unet_jax.evaluate import cross_validation, evaluate_checkpoint
from unet_jax.export import export_checkpoint
from unet_jax.input_pipeline import _TrainExample, preprocess, rotate
from unet_jax.predict import main as predict_main
from unet_jax.predict import predict_logits, probabilities
from unet_jax.train_checkpoints import TrainCheckpoints

COLOURS = [(0, 0, 0), (255, 0, 0), (0, 128, 255)]


def make_folder(root, n=12, size=(24, 20), rgb_masks=True):
  os.makedirs(root / 'images'), os.makedirs(root / 'masks')
  rng = np.random.default_rng(0)
  for i in range(n):
    mask = np.zeros(size[::-1], np.uint8)
    mask[rng.integers(0, 10):, rng.integers(0, 10):] = 1
    mask[:4, :4] = 2
    image = (rng.random(size[::-1] + (3,)) * 80 + mask[..., None] * 60).astype(np.uint8)
    Image.fromarray(image).save(root / 'images' / f'im{i:02d}.jpg' if i % 2 else
                                root / 'images' / f'im{i:02d}.png')
    m = np.array(COLOURS, np.uint8)[mask] if rgb_masks else mask * 100
    Image.fromarray(m).save(root / 'masks' / f'im{i:02d}.png')


def test_image_folder_trains_and_keeps_the_mask_mapping(tmp_path):
  make_folder(tmp_path / 'data')
  # (Scored as milesial's evaluate.py scores: the background, class 0, out of the means.)
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(
      tmp_path / 'data'), 'model.in_channels': 3, 'model.num_classes': 3, 'batch_size': 8,
      'num_train_steps': 2, 'eval_every_steps': 2, 'checkpoint_every_steps': 2,
      'eval_include_background': False})
  wd = str(tmp_path / 'wd')
  metrics = train.train_and_evaluate(config, wd)
  assert {'dice_class0', 'dice_class1', 'dice_class2'} <= set(metrics)
  _, _, meta = load_pretrained_with_metadata(wd)
  # Sorted by 0xRRGGBB: black, (0,128,255), red.
  assert meta['mask_values'] == [[0, 0, 0], [0, 128, 255], [255, 0, 0]]
  for name in ('dice', 'iou', 'class_accuracy'):
    per_class = [metrics[f'{name}_class{c}'] for c in range(3)]
    assert metrics[name] == (per_class[1] + per_class[2]) / 2, name
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    assert json.loads(f.readlines()[-1])['eval_dice'] == metrics['dice']
  # evaluate scores as the run did; --include_background puts class 0 back in the means.
  got = evaluate_checkpoint(wd, per_image=True)
  assert {k: v for k, v in got.items() if k in metrics} == metrics
  assert not got['include_background']
  assert np.mean([r['dice'] for r in got['per_image']]) == pytest.approx(metrics['dice'])
  out = subprocess.run([sys.executable, '-m', 'unet_jax.evaluate', '--checkpoint', wd,
                        '--include_background'], cwd=REPO, env=_env(1), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  both = json.loads(out.stdout.strip().splitlines()[-1])
  assert both['include_background'] and both['dice_class1'] == metrics['dice_class1']
  assert both['dice'] == pytest.approx(sum(metrics[f'dice_class{c}'] for c in range(3)) / 3)
  assert 'class 0 left out' not in out.stdout
  # The best step was chosen by the Dice without class 0: a resume that counts it is refused.
  with pytest.raises(UserError, match=r'was saved by a run with eval_include_background=False, '
                     'this config has eval_include_background=True; rerun with its settings'):
    config.num_train_steps, config.eval_include_background = 3, True
    train.train_and_evaluate(config, wd)


def test_image_folder_with_an_ignored_mask_value(tmp_path):
  make_folder(tmp_path / 'data')
  overrides = {'data.name': 'image_folder', 'data.root': str(tmp_path / 'data'),
               'model.in_channels': 3, 'model.num_classes': 2, 'batch_size': 8,
               'num_train_steps': 2, 'eval_every_steps': 2, 'checkpoint_every_steps': 2}
  # (0, 128, 255), 0x0080FF, is left out: two classes remain, black and red.
  config = tiny_config(**overrides, **{'data.ignore_value': 0x0080FF})
  metrics = train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert {'dice_class0', 'dice_class1'} <= set(metrics) and 'dice_class2' not in metrics
  _, _, meta = load_pretrained_with_metadata(str(tmp_path / 'wd'))
  assert meta['mask_values'] == [[0, 0, 0], [255, 0, 0]]  # predict writes these two
  # `python -m unet_jax.evaluate` scores what the run's evaluation did; every split together
  # is the image-weighted mean of the splits'.
  assert {k: v for k, v in evaluate_checkpoint(str(tmp_path / 'wd')).items()
          if k in metrics} == metrics
  parts = [evaluate_checkpoint(str(tmp_path / 'wd'), split=s) for s in ('train', 'test')]
  both = evaluate_checkpoint(str(tmp_path / 'wd'), split='all', per_image=True, surface=True)
  assert both['images'] == sum(p['images'] for p in parts) == 12
  for k in metrics:
    assert both[k] == pytest.approx(sum(p[k] * p['images'] for p in parts) / 12, rel=1e-6)
  # Per image: every file once, by name, in its split's order; the rows' means are the scores.
  rows = both.pop('per_image')
  held_out = {f'im{i:02d}.{"jpg" if i % 2 else "png"}' for i in range(0, 12, 10)}
  assert {r['file_name'] for r in rows if r['split'] == 'test'} == held_out
  assert sorted(r['file_name'] for r in rows) == sorted(os.listdir(tmp_path / 'data' / 'images'))
  assert [(r['split'], r['index']) for r in rows] == [('test', i) for i in range(2)] + [
      ('train', i) for i in range(10)]
  assert set(rows[0]) == {'split', 'index', 'file_name', 'pixel_accuracy', 'dice', 'iou',
                          'class_accuracy', 'dice_class0', 'dice_class1', 'iou_class0',
                          'iou_class1', 'class_accuracy_class0', 'class_accuracy_class1',
                          'hd95', 'assd', 'hd95_class0', 'hd95_class1', 'assd_class0',
                          'assd_class1', 'nsd', 'nsd_class0', 'nsd_class1'}
  for k in metrics:
    assert np.mean([r[k] for r in rows]) == pytest.approx(both[k], rel=1e-6), k
  for k in ('hd95', 'assd', 'hd95_class0', 'hd95_class1', 'assd_class0', 'assd_class1', 'nsd',
            'nsd_class0', 'nsd_class1'):
    # (Surface scores: the mean over the images where the class is in truth or prediction.)
    assert np.mean([r[k] for r in rows if r[k] is not None]) == pytest.approx(both[k]), k
  assert len({r['dice'] for r in rows}) > 1  # (scores of each image, not one repeated)
  with pytest.raises(UserError, match=r"has no split 'val' \(it has test, train\); choose one "
                     'with --split, or --split all$'):
    evaluate_checkpoint(str(tmp_path / 'wd'), split='val')
  # The sample PNG draws the ignored pixels (each mask's top-left 4x4 corner) in magenta.
  grid = np.asarray(Image.open(tmp_path / 'wd' / 'samples' / 'step_0000002.png'))
  truth = grid[:16, 18:34]
  assert (truth[:2, :2] == [255, 0, 255]).all() and not (truth[8:] == [255, 0, 255]).all(-1).any()
  # The classes in their masks' own colours: black and red (before, gray levels).
  assert {tuple(p) for p in truth[8:].reshape(-1, 3)} == {(0, 0, 0), (255, 0, 0)}
  with pytest.raises(UserError, match=r"data.ignore_value=255 is not a mask value of dataset "
                     r"'image_folder' \(its masks hold \[\[0, 0, 0\], \[0, 128, 255\]"):
    train.train_and_evaluate(tiny_config(**overrides, **{'data.ignore_value': 255}),
                             str(tmp_path / 'wd2'))


def _palette_mask(labels):
  """A palette ('P') image of class indices, drawn red (1) and white (2): VOC's or Carvana's."""
  im = Image.fromarray(labels.astype(np.uint8), 'P')
  im.putpalette([0, 0, 0, 255, 0, 0, 255, 255, 255] + [0] * 759)
  return im


def make_milesial_folder(root, n=12, size=(24, 20)):
  """milesial/Pytorch-UNet's data/: imgs/NAME.jpg with masks/NAME_mask.gif (Carvana's)."""
  os.makedirs(root / 'imgs'), os.makedirs(root / 'masks')
  rng = np.random.default_rng(1)
  for i in range(n):
    labels = np.zeros(size[::-1], np.uint8)
    labels[rng.integers(0, 10):, rng.integers(0, 10):] = 1
    image = (rng.random(size[::-1] + (3,)) * 80 + labels[..., None] * 90).astype(np.uint8)
    Image.fromarray(image).save(root / 'imgs' / f'car{i:02d}.jpg')
    _palette_mask(labels).save(root / 'masks' / f'car{i:02d}_mask.gif')


def test_class_map_line_lists_gray_values_and_cuts_a_long_one():
  info = input_pipeline.DataInfo('image_folder', 1, 1, 1, [0, 255])
  assert input_pipeline.class_map_line(info, ()) == 'classes by mask value: 0 -> 0, 255 -> 1'
  info = input_pipeline.DataInfo('image_folder', 1, 1, 1, list(range(0, 200, 10)))
  line = input_pipeline.class_map_line(info, [f'c{k}' for k in range(20)])
  assert line.endswith(', 140 -> 14 c14, 150 -> 15 c15, ... (20 classes)')


def test_milesial_data_folder_trains_as_it_lies(tmp_path, capsys):
  # milesial's loader takes np.asarray(Image.open(mask)): a palette mask's indices, 0 and 1
  # here, not its colours (before, palette masks were read as RGB and GIFs not at all).
  make_milesial_folder(tmp_path / 'data')
  mask_path = tmp_path / 'data' / 'masks' / 'car03_mask.gif'
  assert Image.open(mask_path).mode == 'P'
  layout = FolderLayout(images_dir='imgs', mask_suffix='_mask')
  found = scan(str(tmp_path / 'data'), layout)
  assert found.mask_values == [0, 1] and found.channels == 3 and found.lossy_mask == ''
  palette = found.palette
  assert palette == Image.open(mask_path).getpalette()
  assert (str(tmp_path / 'data' / 'imgs' / 'car03.jpg'), str(mask_path)) in found.splits['pairs']
  # configs/milesial.py: milesial's recipe on its layout, in a small model at a small size, a
  # batch for the 8 devices: 1.6 epochs of the 10 training pairs in batches of 8, 2 steps.
  config = override(milesial.get_config(), {
      'data.root': str(tmp_path / 'data'), 'data.data_dir': TFDS_DIR, 'batch_size': 8,
      'model.base_features': 4, 'model.depth': 1, 'image_shape': (16, 24), 'num_epochs': 1.6,
      'eval_every_steps': 2, 'checkpoint_every_steps': 2, 'compilation_cache_dir': ''})
  train_source, _, info = input_pipeline.load_sources(config)
  assert info.mask_values == [0, 1]
  index = [r['file_name'] for r in train_source].index(b'car03.jpg')
  np.testing.assert_array_equal(np.asarray(train_source[index]['mask'])[..., 0],
                                np.asarray(Image.open(mask_path)))
  capsys.readouterr()
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  # The run says which mask value trains as which class: palette indices, in their colours.
  assert 'classes by mask value: 0 (#000000) -> 0, 1 (#ff0000) -> 1\n' in capsys.readouterr().out
  with open(tmp_path / 'wd' / 'metrics.jsonl') as f:
    last = json.loads(f.readlines()[-1])
  # Its validation Dice leaves the background out: with 2 classes, class 1's.
  assert last['step'] == 2 and last['eval_dice'] == last['eval_dice_class1']
  # Its images are resized with PIL's bicubic filter, as milesial's are, in training,
  # evaluation (evaluate scores as the run logged) and prediction.
  example = train_source[index]
  bicubic = input_pipeline.preprocess(input_pipeline._adapt(config, example), (16, 24), None,
                                      None, 'bicubic')['image']
  np.testing.assert_array_equal(bicubic, np.asarray(Image.fromarray(example['image']).resize(
      (24, 16), Image.BICUBIC), np.float32) / 255)
  assert not np.array_equal(bicubic, input_pipeline.preprocess(
      input_pipeline._adapt(config, example), (16, 24), None, None)['image'])
  assert evaluate_checkpoint(str(tmp_path / 'wd'))['dice'] == last['eval_dice']
  model, variables, meta = load_pretrained_with_metadata(str(tmp_path / 'wd'))
  assert meta['mask_values'] == [0, 1] and meta['mask_palette'] == palette
  assert meta['resample'] == 'bicubic'
  # predict writes palette masks of those indices, drawn as the training masks were.
  assert predict_main(['--checkpoint', str(tmp_path / 'wd'), '--output', str(tmp_path / 'out'),
                       str(tmp_path / 'data' / 'imgs' / 'car03.jpg'), '--overlay',
                       '--probabilities']) == 0
  image = np.asarray(Image.open(tmp_path / 'data' / 'imgs' / 'car03.jpg'))[None]
  want = predict_logits(model, variables, image, size=(16, 24), resample='bicubic')[0]
  np.testing.assert_allclose(np.load(tmp_path / 'out' / 'car03_prob.npy'),
                             np.asarray(probabilities(want)), rtol=1e-6)
  assert np.abs(want - predict_logits(model, variables, image, size=(16, 24))[0]).max() > 1e-4
  written = Image.open(tmp_path / 'out' / 'car03_mask.png')
  assert written.mode == 'P' and written.getpalette() == palette
  assert written.size == (24, 20) and set(np.unique(np.asarray(written))) <= {0, 1}
  # The overlay tints class 1 in its palette colour, red, as the training masks draw it.
  image = np.asarray(Image.open(tmp_path / 'data' / 'imgs' / 'car03.jpg'), np.float32)
  tinted = (image * 0.55 + np.asarray([255, 0, 0], np.float32) * 0.45).astype(np.uint8)
  want = np.where(np.asarray(written)[..., None] == 1, tinted, image.astype(np.uint8))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / 'car03_overlay.png')),
                                want)


def test_images_and_masks_in_one_folder_told_apart_by_the_suffix(tmp_path):
  make_milesial_folder(tmp_path / 'd', n=3)
  for f in os.listdir(tmp_path / 'd' / 'imgs'):
    os.rename(tmp_path / 'd' / 'imgs' / f, tmp_path / 'd' / 'masks' / f)
  one = FolderLayout(images_dir='masks', masks_dir='masks', mask_suffix='_mask')
  pairs = find_pairs(str(tmp_path / 'd'), one)['test'] + find_pairs(str(tmp_path / 'd'),
                                                                     one)['train']
  assert sorted(os.path.basename(i) + ' ' + os.path.basename(m) for i, m in pairs) == [
      f'car{i:02d}.jpg car{i:02d}_mask.gif' for i in range(3)]
  with pytest.raises(UserError, match=re.escape(
      "data.images_dir and data.masks_dir are one folder ('masks'): set "
      '--config.data.mask_suffix (e.g. _mask) to tell masks from images')):
    find_pairs(str(tmp_path / 'd'), FolderLayout(images_dir='masks'))
  # The layout is part of the prepared dataset's name: another layout is prepared anew.
  assert fingerprint(str(tmp_path / 'd'), one) != fingerprint(str(tmp_path / 'd'))


@pytest.mark.parametrize('breakage,message', [
    (lambda r: os.rename(r / 'masks' / 'car01_mask.gif', r / 'masks' / 'car01.gif'),
     re.escape("masks/car01.gif: a mask not named NAME_mask.EXT (data.mask_suffix='_mask'); "
               'rename it, or set --config.data.mask_suffix')),
    (lambda r: Image.open(r / 'imgs' / 'car02.jpg').save(r / 'imgs' / 'car02.png'),
     'imgs/car02.jpg and .*imgs/car02.png: two files for \'car02\'; keep one'),
    (lambda r: os.remove(r / 'masks' / 'car00_mask.gif'),
     r'car00.jpg: has no mask \(expected masks/car00_mask.png or similar\)'),
])
def test_milesial_layout_errors_name_the_file(tmp_path, breakage, message):
  make_milesial_folder(tmp_path / 'd', n=3)
  breakage(tmp_path / 'd')
  with pytest.raises(UserError, match=message):
    find_pairs(str(tmp_path / 'd'), FolderLayout(images_dir='imgs', mask_suffix='_mask'))


def test_resuming_on_masks_with_other_values_is_refused(tmp_path):
  # Class k is the k-th sorted mask value; a resume on other values would give the weights'
  # classes other meanings without a word.
  make_folder(tmp_path / 'data', n=10)
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(tmp_path / 'data'),
                          'model.in_channels': 3, 'model.num_classes': 3, 'batch_size': 8,
                          'num_train_steps': 1, 'eval_every_steps': 1,
                          'checkpoint_every_steps': 1})
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  for f in os.listdir(tmp_path / 'data' / 'masks'):  # (0, 128, 255) -> (0, 255, 128)
    m = np.asarray(Image.open(tmp_path / 'data' / 'masks' / f)).copy()
    m[(m == (0, 128, 255)).all(-1)] = (0, 255, 128)
    Image.fromarray(m).save(tmp_path / 'data' / 'masks' / f)
  before = sorted(os.listdir(tmp_path / 'wd' / 'checkpoints'))
  config.num_train_steps = 2
  with pytest.raises(UserError, match=re.escape(
      'checkpoints/1 was trained on masks whose values [[0, 0, 0], [0, 128, 255], [255, 0, 0]] '
      "are its classes 0..2; this run's masks hold [[0, 0, 0], [0, 255, 128], [255, 0, 0]]; "
      'rerun with its data to resume it, or choose another --workdir')):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert sorted(os.listdir(tmp_path / 'wd' / 'checkpoints')) == before


def test_ignored_value_of_a_dataset_without_listed_mask_values():
  from unet_jax.input_pipeline import _ignored_label
  # oxford_iiit_pet's trimap 1, 2, 3 with mask_offset 1: the border, 3, is label id 2.
  config = tiny_config(**{'data.mask_offset': 1, 'data.ignore_value': 3})
  assert _ignored_label(config, 'oxford_iiit_pet', []) == 2
  config.data.ignore_value = -1
  assert _ignored_label(config, 'oxford_iiit_pet', []) is None
  config.data.ignore_value = 0
  with pytest.raises(UserError, match=r'data.ignore_value=0 minus data.mask_offset=1 is not a '
                     r'mask value of 0..255'):
    _ignored_label(config, 'oxford_iiit_pet', [])


def test_builders_of_unprepared_datasets_leave_no_temporary_directories(tmp_path, monkeypatch):
  # tfds looks up a builder's info on its GCS bucket when the dataset is not prepared yet, and
  # leaves an empty temporary directory behind each time; these datasets are never there.
  from unet_jax.datasets.image_folder import ImageFolder
  from unet_jax.datasets.synthetic_shapes import SyntheticShapes
  make_folder(tmp_path / 'data', n=3)
  (tmp_path / 'tmp').mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
  for builder in (SyntheticShapes(config='64px', data_dir=str(tmp_path / 'tfds')),
                  ImageFolder(root=str(tmp_path / 'data'), data_dir=str(tmp_path / 'tfds'))):
    assert not builder.is_prepared()
    assert 'image' in builder.info.features
  assert os.listdir(tmp_path / 'tmp') == []


def test_image_folder_gray_masks_and_holdout(tmp_path):
  make_folder(tmp_path / 'd', n=11, rgb_masks=False)
  found = scan(str(tmp_path / 'd'))
  assert found.mask_values == [0, 100, 200] and found.channels == 3 and found.palette == []
  # Prepared unsplit, in name order; 10% held out when read: every tenth pair, 2 of 11.
  assert [os.path.basename(i)[:4] for i, _ in found.splits['pairs']] == [
      f'im{i:02d}' for i in range(11)]
  splits = find_pairs(str(tmp_path / 'd'))
  assert [os.path.basename(i)[:4] for i, _ in splits['test']] == ['im00', 'im10']
  assert len(splits['train']) == 9


def test_holdout_percent_sets_the_share_held_out(tmp_path):
  make_folder(tmp_path / 'd', n=12, rgb_masks=False)
  root = str(tmp_path / 'd')

  def held_out(percent):
    splits = find_pairs(root, FolderLayout(holdout_percent=percent))
    assert sorted(splits['test'] + splits['train']) == sorted(find_pairs(root)['test']
                                                               + find_pairs(root)['train'])
    return [os.path.basename(image)[:4] for image, _ in splits['test']]
  # The default is every tenth pair, as before it could be set; spread evenly otherwise.
  assert held_out(10) == [os.path.basename(p)[:4] for p, _ in find_pairs(root)['test']] == [
      'im00', 'im10']
  assert held_out(25) == ['im00', 'im04', 'im08']
  assert held_out(40) == ['im00', 'im03', 'im05', 'im08', 'im10']
  # Through the config: the prepared dataset's splits, each share from one prepared copy.
  assert fingerprint(root, FolderLayout(holdout_percent=25)) == fingerprint(root)
  for percent, want in ((25.0, ['im00', 'im04', 'im08']), (10.0, ['im00', 'im10'])):
    config = tiny_config(**{'data.name': 'image_folder', 'data.root': root,
                            'data.data_dir': str(tmp_path / 'tfds'),
                            'data.holdout_percent': percent, 'model.in_channels': 3,
                            'model.num_classes': 3})
    train_source, eval_source, info = input_pipeline.load_sources(config)
    assert [r['file_name'].decode()[:4] for r in eval_source] == want
    assert info.num_train == 12 - len(want)
    assert sorted(r['file_name'].decode()[:4] for r in train_source) == sorted(
        f'im{i:02d}' for i in range(12) if f'im{i:02d}' not in want)
  assert len(os.listdir(tmp_path / 'tfds' / 'image_folder')) == 1
  # A folder with train/ and test/ has its splits: another share would be silently unused.
  os.makedirs(tmp_path / 'split' / 'train'), os.makedirs(tmp_path / 'split' / 'test')
  for split in ('train', 'test'):
    for sub in ('images', 'masks'):
      shutil.copytree(tmp_path / 'd' / sub, tmp_path / 'split' / split / sub)
  assert len(find_pairs(str(tmp_path / 'split'))['test']) == 12
  with pytest.raises(UserError, match=r'^data.holdout_percent=25 is for a folder without train/ '
                     r'and test/, but .*/split has them \(they are the splits\); leave it at 10, '
                     'or put the pairs in one folder$'):
    find_pairs(str(tmp_path / 'split'), FolderLayout(holdout_percent=25))


def _kfold_test_indices(n, n_splits):
  # scikit-learn's KFold(n_splits).split (shuffle=False), as its source computes the blocks.
  fold_sizes = np.full(n_splits, n // n_splits, dtype=int)
  fold_sizes[:n % n_splits] += 1
  current = 0
  for size in fold_sizes:
    yield list(range(current, current + size))
    current += size


def test_num_folds_holds_out_one_block_per_fold(tmp_path):
  make_folder(tmp_path / 'd', n=12, rgb_masks=False)
  root = str(tmp_path / 'd')
  everything = sorted(p for split in find_pairs(root).values() for p in split)
  seen = []
  for num_folds in (2, 5, 12):
    for fold, want in enumerate(_kfold_test_indices(12, num_folds)):
      splits = find_pairs(root, FolderLayout(num_folds=num_folds, fold=fold))
      assert splits['test'] == [everything[i] for i in want], (num_folds, fold)
      assert splits['train'] == [p for i, p in enumerate(everything) if i not in want]
      seen += [(num_folds, p) for p in splits['test']]
  for num_folds in (2, 5, 12):  # every pair held out by exactly one fold
    assert sorted(p for k, p in seen if k == num_folds) == everything
  # 12 pairs in 5 folds: blocks of 3, 3, 2, 2, 2.
  fold3 = find_pairs(root, FolderLayout(num_folds=5, fold=3))['test']
  assert [os.path.basename(image)[:4] for image, _ in fold3] == ['im08', 'im09']
  # Through the config: each fold's split of one prepared copy (before, a copy per fold, each
  # as large as the folder's files).
  for fold, want in enumerate(_kfold_test_indices(12, 4)):
    config = tiny_config(**{'data.name': 'image_folder', 'data.root': root,
                            'data.data_dir': str(tmp_path / 'tfds'), 'data.num_folds': 4,
                            'data.fold': fold, 'model.in_channels': 3, 'model.num_classes': 3})
    train_source, eval_source, info = input_pipeline.load_sources(config)
    assert [r['file_name'].decode()[:4] for r in eval_source] == [f'im{i:02d}' for i in want]
    assert [r['file_name'].decode()[:4] for r in train_source] == [
        f'im{i:02d}' for i in range(12) if i not in want]
    assert info.num_train == 9 and info.num_eval == 3
  assert len(os.listdir(tmp_path / 'tfds' / 'image_folder')) == 1
  assert len({fingerprint(root, FolderLayout(num_folds=5, fold=k)) for k in range(5)}) == 1
  with pytest.raises(UserError, match=r'^data.num_folds=13 is more than the 12 pairs in '
                     r'.*/d; use at most 12 folds$'):
    find_pairs(root, FolderLayout(num_folds=13))
  os.makedirs(tmp_path / 'split' / 'train'), os.makedirs(tmp_path / 'split' / 'test')
  for split in ('train', 'test'):
    for sub in ('images', 'masks'):
      shutil.copytree(tmp_path / 'd' / sub, tmp_path / 'split' / split / sub)
  with pytest.raises(UserError, match=r'^data.num_folds=5 is for a folder without train/ and '
                     r'test/, but .*/split has them \(they are the splits\); leave it at 0, or '
                     'put the pairs in one folder$'):
    find_pairs(str(tmp_path / 'split'), FolderLayout(num_folds=5, fold=2))
  # Also once that folder is prepared (its copy serves any share or fold; these would be unused).
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(tmp_path / 'split'),
                          'data.data_dir': str(tmp_path / 'tfds'), 'model.in_channels': 3,
                          'model.num_classes': 3})
  _, eval_source, _ = input_pipeline.load_sources(config)
  assert [r['file_name'].decode()[:4] for r in eval_source] == [f'im{i:02d}' for i in range(12)]
  for field, value, line in (('num_folds', 5, 'data.num_folds=5 is for a folder without train/'),
                             ('holdout_percent', 25.0, 'data.holdout_percent=25 is for a folder '
                              'without train/')):
    config.data[field] = value
    with pytest.raises(UserError, match='^' + re.escape(line)):
      input_pipeline.load_sources(config)
    config.data[field] = getattr(FolderLayout, field)
  # More folds than pairs, refused before anything is prepared.
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': root,
                          'data.data_dir': str(tmp_path / 'fresh'), 'data.num_folds': 13,
                          'model.in_channels': 3, 'model.num_classes': 3})
  with pytest.raises(UserError, match='^data.num_folds=13 is more than the 12 pairs in'):
    input_pipeline.load_sources(config)
  assert not os.path.exists(tmp_path / 'fresh' / 'image_folder')


def test_fold_seed_cuts_scikit_learns_shuffled_folds_as_nnunet_does(tmp_path):
  from sklearn.model_selection import KFold

  from unet_jax.datasets.image_folder import _in_fold
  # nnU-Net's folds: KFold(5, shuffle=True, random_state=12345) over the sorted case names.
  for n, num_folds, seed in ((12, 5, 12345), (101, 5, 12345), (12, 3, 0), (7, 7, 2**32 - 1)):
    for fold, (_, test) in enumerate(KFold(num_folds, shuffle=True, random_state=seed).split(
        np.arange(n))):
      got = _in_fold(n, num_folds, fold, seed)
      assert [i for i in range(n) if got[i]] == test.tolist(), (n, num_folds, seed, fold)
  make_folder(tmp_path / 'd', n=12, rgb_masks=False)
  root = str(tmp_path / 'd')
  names = [f'im{i:02d}' for i in range(12)]
  splits = list(KFold(5, shuffle=True, random_state=12345).split(names))
  assert [t.tolist() for _, t in splits] != list(_kfold_test_indices(12, 5))  # (shuffled)
  for fold, (train_indices, test_indices) in enumerate(splits):
    config = tiny_config(**{'data.name': 'image_folder', 'data.root': root,
                            'data.data_dir': str(tmp_path / 'tfds'), 'data.num_folds': 5,
                            'data.fold': fold, 'data.fold_seed': 12345,
                            'model.in_channels': 3, 'model.num_classes': 3})
    train_source, eval_source, _ = input_pipeline.load_sources(config)
    assert [r['file_name'].decode()[:4] for r in eval_source] == [
        names[i] for i in test_indices]
    assert [r['file_name'].decode()[:4] for r in train_source] == [
        names[i] for i in train_indices]
  assert len(os.listdir(tmp_path / 'tfds' / 'image_folder')) == 1


def test_nnunet_raw_layout_pairs_by_image_suffix(tmp_path):
  # nnU-Net's raw 2D data: imagesTr/NAME_0000.png (its first channel file) with labelsTr/NAME.png.
  make_folder(tmp_path / 'd', n=4, rgb_masks=False)
  root = tmp_path / 'd'
  os.rename(root / 'images', root / 'imagesTr'), os.rename(root / 'masks', root / 'labelsTr')
  for f in os.listdir(root / 'imagesTr'):
    stem, ext = os.path.splitext(f)
    os.rename(root / 'imagesTr' / f, root / 'imagesTr' / f'{stem}_0000{ext}')
  layout = FolderLayout(images_dir='imagesTr', masks_dir='labelsTr', image_suffix='_0000')
  pairs = find_pairs(str(root), layout)
  assert sorted((os.path.basename(i), os.path.basename(m)) for i, m in
                pairs['train'] + pairs['test']) == [
      ('im00_0000.png', 'im00.png'), ('im01_0000.jpg', 'im01.png'),
      ('im02_0000.png', 'im02.png'), ('im03_0000.jpg', 'im03.png')]
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(root),
                          'data.data_dir': str(tmp_path / 'tfds'), 'data.images_dir': 'imagesTr',
                          'data.masks_dir': 'labelsTr', 'data.image_suffix': '_0000',
                          'model.in_channels': 3, 'model.num_classes': 3})
  _, eval_source, info = input_pipeline.load_sources(config)
  assert [r['file_name'].decode() for r in eval_source] == ['im00_0000.png']
  assert info.num_train == 3 and info.mask_values == [0, 100, 200]
  # A second channel's file (nnU-Net's NAME_0001) is not an image of this layout.
  shutil.copy(root / 'imagesTr' / 'im00_0000.png', root / 'imagesTr' / 'im00_0001.png')
  with pytest.raises(UserError, match=re.escape(
      "imagesTr/im00_0001.png: an image not named NAME_0000.EXT (data.image_suffix='_0000'); "
      'rename it, or set --config.data.image_suffix')):
    find_pairs(str(root), layout)
  os.remove(root / 'imagesTr' / 'im00_0001.png'), os.remove(root / 'imagesTr' / 'im02_0000.png')
  with pytest.raises(UserError, match=re.escape(
      'labelsTr/im02.png: has no image (expected imagesTr/im02_0000.png or similar)')):
    find_pairs(str(root), layout)
  # Images and masks in one folder, told apart by the image suffix alone.
  os.remove(root / 'labelsTr' / 'im02.png')
  for f in os.listdir(root / 'labelsTr'):
    shutil.move(root / 'labelsTr' / f, root / 'imagesTr' / f)
  one = FolderLayout(images_dir='imagesTr', masks_dir='imagesTr', image_suffix='_0000')
  pairs = find_pairs(str(root), one)
  assert sorted((os.path.basename(i), os.path.basename(m)) for i, m in
                pairs['train'] + pairs['test']) == [
      ('im00_0000.png', 'im00.png'), ('im01_0000.jpg', 'im01.png'), ('im03_0000.jpg', 'im03.png'),
      ], pairs
  assert fingerprint(str(root), one) != fingerprint(
      str(root), FolderLayout(images_dir='imagesTr', masks_dir='imagesTr', mask_suffix='_0000'))


def _channel_cases(root, n=10, size=(20, 24)):
  """nnU-Net's raw layout with two gray channel files per case: imagesTr/NAME_0000.png and
  NAME_0001.png (case 1's second one 16-bit, with levels between 8-bit ones), labelsTr/NAME.png;
  the stacks, by NAME (case 1's on 16 bits, its 8-bit channel's values times 257)."""
  os.makedirs(root / 'imagesTr'), os.makedirs(root / 'labelsTr')
  rng = np.random.default_rng(5)
  stacks = {}
  for i in range(n):
    labels = np.zeros(size, np.uint8)
    labels[rng.integers(0, 10):, rng.integers(0, 10):] = 1
    first = (rng.random(size) * 80 + labels * 90).astype(np.uint8)
    second = (rng.random(size) * 200).astype(np.uint8)
    Image.fromarray(first).save(root / 'imagesTr' / f'case{i}_0000.png')
    if i == 1:  # (16-bit, kept at 16 bits; the 8-bit channel beside it put on their scale)
      deep = second.astype(np.uint16) * 257 + rng.integers(0, 257, size).astype(np.uint16)
      Image.fromarray(deep).save(root / 'imagesTr' / 'case1_0001.png')
      stacks['case1'] = np.stack([first.astype(np.uint16) * 257, deep], axis=-1)
    else:
      Image.fromarray(second).save(root / 'imagesTr' / f'case{i}_0001.png')
      stacks[f'case{i}'] = np.stack([first, second], axis=-1)
    Image.fromarray(labels).save(root / 'labelsTr' / f'case{i}.png')
  return stacks


def test_one_gray_file_per_channel_makes_a_case_s_channels(tmp_path, capsys):
  # nnU-Net names a case's channels NAME_0000, NAME_0001, ...: data.image_suffix lists them.
  root = tmp_path / 'd'
  stacks = _channel_cases(root)
  with open(root / 'dataset.json', 'w') as f:  # (its names ask nnU-Net to z-score them)
    json.dump({'channel_names': {'0': 'T2', '1': 'ADC'}, 'labels': {'background': 0, 'x': 1}}, f)
  layout = FolderLayout(images_dir='imagesTr', masks_dir='labelsTr', image_suffix='_0000,_0001')
  pairs = find_pairs(str(root), layout)
  assert pairs['test'] == [((str(root / 'imagesTr' / 'case0_0000.png'),
                             str(root / 'imagesTr' / 'case0_0001.png')),
                            str(root / 'labelsTr' / 'case0.png'))]
  fields = {'data.name': 'image_folder', 'data.root': str(root),
            'data.data_dir': str(tmp_path / 'tfds'), 'data.images_dir': 'imagesTr',
            'data.masks_dir': 'labelsTr', 'data.image_suffix': '_0000,_0001',
            'model.in_channels': 2, 'num_train_steps': 2, 'eval_every_steps': 2,
            'checkpoint_every_steps': 2, 'batch_size': 8, 'augment.rotate_degrees': 30.0,
            'augment.contrast': 0.3}
  train_source, eval_source, info = input_pipeline.load_sources(tiny_config(**fields))
  assert info.channels == 2 and info.mask_values == [0, 1] and info.num_train == 9
  for record in (*train_source, *eval_source):
    name = record['file_name'].decode()
    assert name.endswith('_0000.png')
    want = stacks[name[:-len('_0000.png')]]
    assert record['image'].dtype == want.dtype
    np.testing.assert_array_equal(record['image'], want)
  # Trained (the turns and contrast of two channels) and scored as one image per case.
  wd = str(tmp_path / 'wd')
  metrics = train.train_and_evaluate(tiny_config(**fields), wd)
  assert (f"warning: {root}/dataset.json names the channels T2, ADC, which nnU-Net normalises "
          "them as this project's data.normalize='zscore' does; set "
          "--config.data.normalize=zscore to match it; this run has data.normalize='unit'"
          ) in capsys.readouterr().err
  assert evaluate_checkpoint(wd)['dice'] == metrics['dice']
  assert load_pretrained_with_metadata(wd)[0].in_channels == 2
  # Refused, each in one line naming the file and what to do.
  with pytest.raises(UserError, match=re.escape(
      "dataset 'image_folder' has 2-channel images but model.in_channels=1; set "
      '--config.model.in_channels=2')):
    train.train_and_evaluate(tiny_config(**(fields | {'model.in_channels': 1})),
                             str(tmp_path / 'wd1'))
  for suffixes in ('_0000,', '_0000,_0000', '0,10'):
    with pytest.raises(UserError, match=re.escape(
        f"data.image_suffix={suffixes!r}: give one suffix per channel file, each non-empty, "
        "distinct and not the end of another, e.g. '_0000,_0001'")):
      find_pairs(str(root), FolderLayout(images_dir='imagesTr', masks_dir='labelsTr',
                                         image_suffix=suffixes))
  with pytest.raises(UserError, match=re.escape(
      "imagesTr/case0_0001.png: an image not named NAME_0000.EXT (data.image_suffix='_0000'); "
      'rename it, or set --config.data.image_suffix; if it is a channel of a case '
      "(nnU-Net's NAME_0000, NAME_0001, ...), list each channel's suffix: "
      '--config.data.image_suffix=_0000,_0001')):
    find_pairs(str(root), FolderLayout(images_dir='imagesTr', masks_dir='labelsTr',
                                       image_suffix='_0000'))
  shutil.copy(root / 'imagesTr' / 'case2_0000.png', root / 'imagesTr' / 'case2_0002.png')
  with pytest.raises(UserError, match=re.escape(
      "imagesTr/case2_0002.png: an image not named NAME{_0000,_0001}.EXT (data.image_suffix="
      "'_0000,_0001'); rename it, or set --config.data.image_suffix")):
    find_pairs(str(root), layout)
  os.remove(root / 'imagesTr' / 'case2_0002.png')
  os.remove(root / 'imagesTr' / 'case3_0001.png')
  with pytest.raises(UserError, match=re.escape(
      "imagesTr/case3_0000.png: case 'case3' has no case3_0001.EXT (--config.data.image_suffix="
      "_0000,_0001: one file per channel); add it, or leave the case's files out")):
    find_pairs(str(root), layout)
  Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / 'imagesTr' / 'case3_0001.png')
  with pytest.raises(UserError, match=re.escape(
      'imagesTr/case3_0001.png: a colour image, but data.image_suffix lists one file per channel '
      '(each a gray image); save each channel as a gray image, or give one suffix')):
    scan(str(root), layout)
  Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / 'imagesTr' / 'case3_0001.png')
  with pytest.raises(UserError, match=re.escape(
      f"imagesTr/case3_0001.png: is 20x20 but {root}/imagesTr/case3_0000.png is 24x20; the "
      'channel files of a case must be one size')):
    scan(str(root), layout)


@pytest.mark.parametrize('names,normalize,how', [
    (['T2', 'ADC'], 'zscore', ''),
    (['R', 'G', 'B'], 'zscore', ''),
    (['rgb_to_0_1'], 'unit', ''),
    (['RGB_to_0_1'], 'zscore', "normalises them as this project's data.normalize='unit' does; "
     'set --config.data.normalize=unit to match it'),
    (['noNorm'], 'zscore', 'normalises those channels in ways this project does not (only all '
     'channels scaled to [0, 1], rgb_to_0_1, all stretched to [0, 1], rescale_to_0_1, all by CT '
     'statistics, CT, or all z-scored, zscore or any other name)'),
    (['CT'], 'zscore', "normalises them as this project's data.normalize='ct' does; set "
     '--config.data.normalize=ct to match it'),
    (['ct'], 'ct', ''),
    (['CT', 'T2'], 'ct', 'normalises those channels in ways this project does not'),
    (['rescale_to_0_1', 'Rescale_to_0_1'], 'minmax', ''),
    (['rescale_to_0_1'], 'unit', "normalises them as this project's data.normalize='minmax' "
     'does; set --config.data.normalize=minmax to match it'),
    (['rgb_to_0_1', 'T2'], 'unit', 'normalises those channels in ways this project does not'),
])
def test_dataset_json_channel_names_warn_of_another_normalisation(tmp_path, names, normalize,
                                                                   how):
  # nnU-Net picks each channel's normalisation by its name in dataset.json (casefolded).
  from unet_jax.datasets.image_folder import dataset_json_normalization_warning
  assert dataset_json_normalization_warning(str(tmp_path), normalize) == ''  # (no file)
  with open(tmp_path / 'dataset.json', 'w') as f:
    json.dump({'channel_names': {str(k): n for k, n in enumerate(names)}}, f)
  warning = dataset_json_normalization_warning(str(tmp_path), normalize)
  if not how:
    assert warning == ''
  else:
    assert warning.startswith(f"warning: {tmp_path}/dataset.json names the channels "
                              f"{', '.join(names)}, which nnU-Net {how}"), warning
    assert warning.endswith(f"; this run has data.normalize='{normalize}'")


def test_images_of_two_channels_are_resized_turned_and_jittered_channel_by_channel():
  # PIL's two-channel mode (LA) would resample the first channel weighted by the second, as by
  # alpha: each channel goes through as a gray image, as one file per channel reads them.
  from unet_jax.image_io import resize
  from unet_jax.input_pipeline import _jitter
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 24, 2), np.uint8)
  image[..., 1] = np.where(rng.random((20, 24)) < 0.5, 0, image[..., 1])  # (an "alpha" of 0s)
  mask = rng.integers(0, 3, (20, 24), np.uint8)
  gray = [Image.fromarray(image[..., c], 'L') for c in range(2)]
  want = np.stack([np.asarray(g.resize((13, 11), Image.BILINEAR)) for g in gray], axis=-1)
  np.testing.assert_array_equal(resize(image, 11, 13, Image.BILINEAR), want)
  turned, turned_mask = rotate(image, mask, 30.0)
  want = np.stack([np.asarray(g.rotate(30.0, resample=Image.BILINEAR, fillcolor=0))
                   for g in gray], axis=-1)
  np.testing.assert_array_equal(turned, want)
  np.testing.assert_array_equal(turned_mask, np.asarray(Image.fromarray(mask).rotate(
      30.0, resample=Image.NEAREST, fillcolor=0)))
  # ColorJitter's contrast blends towards the mean of the gray of RGB; here of every channel.
  scaled = image / np.float32(255)
  factor = np.float32(np.random.default_rng(1).uniform(0.7, 1.3))
  want = np.clip(factor * scaled + (1 - factor) * scaled.mean(dtype=np.float32), 0, 1)
  np.testing.assert_array_equal(_jitter(scaled, np.random.default_rng(1), 0.0, 0.3), want)


def test_nnunet_config_trains_a_fold_of_nnunets_raw_data_as_it_lies(tmp_path, monkeypatch):
  from sklearn.model_selection import KFold

  from configs import nnunet
  # nnU-Net's raw 2D data: labels 0..K-1 as PNG, RGB images as NAME_0000.png.
  root = tmp_path / 'Dataset001_Shapes'
  os.makedirs(root / 'imagesTr'), os.makedirs(root / 'labelsTr')
  rng = np.random.default_rng(2)
  names = [f'case_{i:03d}' for i in range(10)]
  for name in names:
    labels = np.zeros((20, 24), np.uint8)
    labels[rng.integers(0, 10):, rng.integers(0, 10):] = 1
    image = (rng.random((20, 24, 3)) * 80 + labels[..., None] * 90).astype(np.uint8)
    Image.fromarray(image).save(root / 'imagesTr' / f'{name}_0000.png')
    Image.fromarray(labels).save(root / 'labelsTr' / f'{name}.png')
  with open(root / 'dataset.json', 'w') as f:  # (nnU-Net's: its labels' names)
    json.dump({'channel_names': {'0': 'R', '1': 'G', '2': 'B'}, 'labels': {
        'background': 0, 'shape': 1}, 'numTraining': 10, 'file_ending': '.png'}, f)
  config = override(nnunet.get_config(), {
      'data.root': str(root), 'data.data_dir': str(tmp_path / 'tfds'), 'data.fold': 2,
      'batch_size': 8, 'model.base_features': 4, 'model.depth': 3, 'image_size': 16,
      'num_train_steps': 2, 'log_every_steps': 1, 'eval_every_steps': 2,
      'checkpoint_every_steps': 2, 'compilation_cache_dir': '',
      'poly_every_steps': 1})  # (its rate held for 250 steps is tested in test_optimizers)
  _, eval_source, info = input_pipeline.load_sources(config)
  held_out = list(KFold(5, shuffle=True, random_state=12345).split(names))[2][1]
  assert [r['file_name'].decode() for r in eval_source] == [
      f'{names[i]}_0000.png' for i in held_out]
  assert info.mask_values == [0, 1] and info.num_train == 8
  assert info.class_names == ('background', 'shape')
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  with open(tmp_path / 'wd' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  # Its held-out Dice leaves the background out; the rate follows its poly schedule.
  assert rows[-1]['step'] == 2 and rows[-1]['eval_dice'] == rows[-1]['eval_dice_class1']
  assert [r['learning_rate'] for r in rows] == pytest.approx(
      [1e-2 * (1 - t / 2) ** 0.9 for t in (0, 1)], rel=1e-6)
  scored = evaluate_checkpoint(str(tmp_path / 'wd'))
  assert scored['dice'] == rows[-1]['eval_dice']
  assert scored['class_names'] == ['background', 'shape']  # (its report's table names them)
  # The names travel with the weights: an export's description says them, for its server.
  assert load_pretrained_with_metadata(str(tmp_path / 'wd'))[2]['class_names'] == [
      'background', 'shape']
  assert export_checkpoint(str(tmp_path / 'wd'))[1]['class_names'] == ['background', 'shape']
  # Its images normalised per channel (nnU-Net's z-score): predict and export as it trained.
  model, variables, meta = load_pretrained_with_metadata(str(tmp_path / 'wd'))
  assert meta['normalize'] == 'zscore' and model.deep_supervision  # (its deep supervision)
  case = np.asarray(Image.open(root / 'imagesTr' / 'case_003_0000.png'))
  as_trained = input_pipeline.preprocess({'image': case, 'mask': np.zeros(case.shape[:2])},
                                         (16, 16), None, None, normalize='zscore')['image']
  np.testing.assert_allclose(as_trained.mean(axis=(0, 1)), 0, atol=1e-5)
  np.testing.assert_allclose(as_trained.std(axis=(0, 1)), 1, atol=1e-4)
  want = np.asarray(model.apply(variables, as_trained[None], train=False))
  resized = input_pipeline.preprocess({'image': case, 'mask': np.zeros(case.shape[:2])},
                                      (16, 16), None, None)['image']
  unit = np.asarray(model.apply(variables, resized[None], train=False))
  assert np.abs(want - unit).max() > 1e-2  # (the normalisation matters to this model)
  np.testing.assert_allclose(predict_logits(model, variables, resized[None], normalize='zscore'),
                             want, atol=1e-5)
  # (at the run's size, the logits resized back to the case's 20x24)
  got = predict_logits(model, variables, case[None], size=16, normalize='zscore')
  assert predict_main([str(root / 'imagesTr' / 'case_003_0000.png'), '--checkpoint',
                       str(tmp_path / 'wd'), '--output', str(tmp_path / 'pred'),
                       '--probabilities']) == 0
  np.testing.assert_allclose(np.load(tmp_path / 'pred' / 'case_003_0000_prob.npy'),
                             probabilities(got)[0], atol=1e-5)
  data, _ = export_checkpoint(str(tmp_path / 'wd'))
  served = jax.export.deserialize(data).call(resized[None])  # (images in [0, 1], as for any run)
  np.testing.assert_allclose(np.asarray(served), want, atol=1e-5)
  # Scored on data a config names, the checkpoint's normalisation holds, whatever it says.
  unit = copy.deepcopy(config)
  unit.data.normalize = 'unit'
  seen, preprocess_ = [], input_pipeline.preprocess
  monkeypatch.setattr(input_pipeline, 'preprocess', lambda *args, **kwargs: seen.append(
      kwargs.get('normalize')) or preprocess_(*args, **kwargs))
  again = evaluate_checkpoint(str(tmp_path / 'wd'), unit)
  assert again['pixel_accuracy'] == scored['pixel_accuracy'] and set(seen) == {'zscore'}


@pytest.mark.parametrize('labels,values,names', [
    ({'background': 0, 'liver': 1, 'tumour': 2}, [0, 1, 2], ('background', 'liver', 'tumour')),
    ({'background': 0, 'liver': 1, 'tumour': 2}, [0, 2], ('background', 'tumour')),  # (1 absent)
    ({'background': 0, 'liver': 1, 'ignore': 2}, [0, 1], ('background', 'liver')),
    ({'background': 0, 'liver': 1}, [0, 1, 2], ()),  # (a class without a name)
    ({'background': 0, 'whole': [1, 2], 'core': 2}, [0, 1, 2], ()),  # (regions name no value)
    ({'background': 0, 'cat': 1}, [[0, 0, 0], [255, 0, 0]], ()),  # (RGB masks: no labels)
    ('not a dict', [0, 1], ()),
])
def test_nnunet_dataset_json_names_the_classes(tmp_path, labels, values, names):
  with open(tmp_path / 'dataset.json', 'w') as f:
    json.dump({'labels': labels}, f)
  assert dataset_json_class_names(str(tmp_path), values) == names
  (tmp_path / 'dataset.json').write_text('{not json')
  assert dataset_json_class_names(str(tmp_path), values) == ()
  os.remove(tmp_path / 'dataset.json')
  assert dataset_json_class_names(str(tmp_path), values) == ()


def test_a_fold_run_is_scored_on_its_fold_and_keeps_it(tmp_path, capsys):
  make_folder(tmp_path / 'd', n=12)
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(tmp_path / 'd'),
                          'data.num_folds': 3, 'data.fold': 1, 'model.in_channels': 3,
                          'model.num_classes': 3, 'batch_size': 8, 'num_train_steps': 2,
                          'eval_every_steps': 2, 'checkpoint_every_steps': 2,
                          'data.class_names': ('sky', 'road', 'car')})
  wd = str(tmp_path / 'wd')
  capsys.readouterr()
  metrics = train.train_and_evaluate(config, wd)
  # The run ends with its last evaluation's scores, a row per class, named as the config says.
  out = capsys.readouterr().out.splitlines()
  # It says which colour trains as which class (sorted by 0xRRGGBB), and the names given.
  assert 'classes by mask value: #000000 -> 0 sky, #0080ff -> 1 road, #ff0000 -> 2 car' in out
  end = out.index(next(line for line in out if line.startswith('eval at step 2: dice ')))
  assert out[end + 1].split() == ['class', 'dice', 'iou', 'class_accuracy']
  for c, name in enumerate(('sky', 'road', 'car')):
    assert out[end + 2 + c].split() == [str(c), name, *(
        f'{metrics[f"{k}_class{c}"]:.4f}' for k in ('dice', 'iou', 'class_accuracy'))]
  assert out[end + 5].startswith('checkpoint: ')
  got = evaluate_checkpoint(wd, per_image=True)
  assert {k: v for k, v in got.items() if k in metrics} == metrics
  assert sorted(r['file_name'][:4] for r in got['per_image']) == ['im04', 'im05', 'im06', 'im07']
  # Resuming on another split would train on the pairs it has been scored on.
  for change, saved, ours in ((dict(fold=2), 'data.fold=1', 'data.fold=2'),
                              (dict(num_folds=0, fold=0), 'data.num_folds=3, data.fold=1',
                               'data.num_folds=0, data.fold=0'),
                              (dict(fold_seed=7), 'data.fold_seed=-1', 'data.fold_seed=7')):
    resumed = copy.deepcopy(config)
    resumed.num_train_steps = 3
    resumed.data.update(change)
    with pytest.raises(UserError, match=re.escape(
        f'was saved by a run with {saved}, this config has {ours}; rerun with its settings')):
      train.train_and_evaluate(resumed, wd)
  # Another fold's run: their ensemble is not scored on either's held-out block, each of which
  # the other trained on, unless the data is named.
  other = copy.deepcopy(config)
  other.data.fold = 2
  train.train_and_evaluate(other, str(tmp_path / 'wd2'))
  with pytest.raises(UserError, match=re.escape(
      f"{wd} and {tmp_path / 'wd2'} were trained on other data (data.fold=1 and 2): each may "
      "have trained on the other's held-out images; name the data to score them on with "
      '--config')):
    evaluate_checkpoint([wd, str(tmp_path / 'wd2')])
  whole = copy.deepcopy(config)
  whole.data.num_folds = whole.data.fold = 0
  both = evaluate_checkpoint([wd, str(tmp_path / 'wd2')], whole, split='all')
  assert both['images'] == 12 and both['step'] == [2, 2]
  # Their export names the classes as both runs did.
  assert export_checkpoint([wd, str(tmp_path / 'wd2')])[1]['class_names'] == ['sky', 'road', 'car']
  # Cross-validation: each fold on its own held-out block, the images pooled.
  scored = [evaluate_checkpoint(w) for w in (wd, str(tmp_path / 'wd2'))]
  csv_path = tmp_path / 'cv.csv'
  out = subprocess.run([sys.executable, '-m', 'unet_jax.evaluate', '--checkpoint', wd,
                        '--checkpoint', str(tmp_path / 'wd2'), '--cross_validation',
                        '--per_image', str(csv_path)],
                       cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == f'{wd} (step 2): 4 images, dice {scored[0]["dice"]:.4f}'
  assert lines[2].startswith("cross-validation of 2 folds on 'image_folder': 8 images, each "
                             'scored by the fold that held it out, at 16x16')
  pooled = json.loads(lines[-2])
  assert pooled['images'] == 8 and [f['dice'] for f in pooled['folds']] == [
      s['dice'] for s in scored]
  # Each class's scores in a table, its rows named as the runs' config names the classes.
  assert lines[4].split() == ['class', 'dice', 'iou', 'class_accuracy']
  for c, name in enumerate(('sky', 'road', 'car')):
    assert lines[5 + c].split() == [str(c), name, *(
        f'{pooled[f"{k}_class{c}"]:.4f}' for k in ('dice', 'iou', 'class_accuracy'))]
  assert pooled['class_names'] == ['sky', 'road', 'car']
  for name in ('dice', 'iou', 'pixel_accuracy', 'dice_class2'):  # (4 images each)
    assert pooled[name] == pytest.approx((scored[0][name] + scored[1][name]) / 2, abs=1e-6)
  with open(csv_path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert sorted(r['file_name'][:4] for r in rows) == [f'im{i:02d}' for i in range(4, 12)]
  assert {r['checkpoint'] for r in rows} == {wd, str(tmp_path / 'wd2')}
  # The folds' confusion matrices, summed: each row the true class's pixels in those images.
  pooled = cross_validation([wd, str(tmp_path / 'wd2')], confusion=True, surface=True,
                            nsd_tolerance=2.0, objects=True)
  folds = [evaluate_checkpoint(w, per_image=True, surface=True, nsd_tolerance=2.0,
                               objects=True) for w in (wd, str(tmp_path / 'wd2'))]
  # The object scores of the folds' counts pooled (not a mean of the images' ratios).
  from unet_jax.object_scores import object_scores
  counts = {k: float(sum(f[k] for f in folds)) for k in
            ('objects_true', 'objects_predicted', 'objects_matched')}
  assert {k: pooled[k] for k in counts} == counts and counts['objects_true'] > 8
  assert pooled['object_recall'] == object_scores({**counts, 'matched_iou': 0.0})[
      'object_recall']
  assert pooled['nsd_tolerance'] == 2.0 and pooled['nsd'] == pytest.approx(np.mean(
      [r['nsd'] for f in folds for r in f['per_image'] if r['nsd'] is not None]), abs=1e-6)
  truth = np.zeros(3, np.int64)
  for fold in (1, 2):
    fold_config = copy.deepcopy(config)
    fold_config.data.fold = fold
    for record in input_pipeline.load_sources(fold_config)[1]:
      example = preprocess(input_pipeline._adapt(fold_config, record), 16, None, None)
      truth += np.bincount(example['mask'].ravel(), minlength=3)
  np.testing.assert_array_equal(np.sum(pooled['confusion'], axis=1), truth)
  assert np.sum(pooled['confusion']) == 8 * 16 * 16
  with pytest.raises(UserError, match=re.escape(f'is scored twice, by {wd} and {wd}: give each '
                                                "fold's workdir once")):
    cross_validation([wd, wd])
  # Folds of another cut (shuffled, or into another number) would overlap or leave pairs out.
  from unet_jax.evaluate import _check_one_cut
  metas = [load_pretrained_with_metadata(w)[2] for w in (wd, str(tmp_path / 'wd2'))]
  _check_one_cut([wd, 'wd2'], metas)
  metas[1]['run_config']['data']['fold_seed'] = 12345
  with pytest.raises(UserError, match=re.escape(
      f'{wd} and wd2 hold out the folds of other cuts (data.fold_seed=-1 and 12345), which '
      'overlap or leave pairs out; cross-validate the folds of one k-fold run')):
    _check_one_cut([wd, 'wd2'], metas)


def test_a_prepared_folder_is_not_read_again(tmp_path, monkeypatch, capsys, caplog):
  make_folder(tmp_path / 'd', n=6)
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(tmp_path / 'd'),
                          'data.data_dir': str(tmp_path / 'tfds'), 'model.in_channels': 3,
                          'model.num_classes': 3})
  capsys.readouterr()
  train_source, _, info = input_pipeline.load_sources(config)
  # Preparing says what, where and how long, in two lines; not tfds's download wording (nothing
  # is downloaded) nor its warnings about a custom config or an unprepared folder.
  out, err = capsys.readouterr()
  assert 'Download' not in out and 'download' not in out, out
  lines = err.splitlines()  # (not a terminal: no progress bars either)
  assert re.fullmatch(rf'preparing the image folder {tmp_path}/d in {tmp_path}/tfds/image_folder/'
                      r'f\w+/[\d.]+', lines[0]), lines
  assert re.fullmatch(r'prepared in \d+\.\d s; later runs read it from there', lines[1]), lines
  notices = [r.getMessage() for r in caplog.records if 'custom data configuration' in
             r.getMessage() or 'has no dataset_info.json' in r.getMessage()]
  assert notices == [] and len(lines) == 2
  # Once prepared, loading it again says nothing.
  input_pipeline.load_sources(config)
  assert capsys.readouterr() == ('', '') and caplog.records == []
  from unet_jax.datasets import image_folder

  decode = image_folder._read

  def read(path, *args, data=None, **kwargs):
    if data is None:  # (a file, not a prepared record's bytes)
      raise AssertionError(f'read {path}')
    return decode(path, *args, data=data, **kwargs)
  # Started again on the same files: what preparing recorded, without reading any file (before,
  # every start read every image and mask again: about 9 s per 100 photos of 1918x1280 here).
  monkeypatch.setattr(image_folder, '_read', read)
  again_source, _, again = input_pipeline.load_sources(config)
  assert again == info and info.channels == 3 and len(info.mask_values) == 3
  np.testing.assert_array_equal(again_source[4]['image'], train_source[4]['image'])
  # As grain's worker processes (data.worker_count > 0) receive it: pickled, builder and all
  # (before, unpickling the builder failed: "missing ... argument: 'root'").
  unpickled = pickle.loads(pickle.dumps(again_source))
  for i in range(len(train_source)):
    record = unpickled[i]
    # Each record is its files as read: the image's pixels, the mask's class ids.
    name = record['file_name'].decode()
    np.testing.assert_array_equal(record['image'], decode(str(tmp_path / 'd' / 'images' / name)))
    colours = np.asarray(decode(str(tmp_path / 'd' / 'masks' / f'{name[:-4]}.png')))
    np.testing.assert_array_equal(
        np.asarray(info.mask_values)[record['mask'][..., 0]], colours)
  # A changed file changes the folder's fingerprint: it is read (and prepared) again.
  os.utime(tmp_path / 'd' / 'masks' / 'im01.png', ns=(1, 1))
  with pytest.raises(AssertionError, match='read .*im00'):
    input_pipeline.load_sources(config)


def test_image_folder_reads_16_bit_images_at_16_bits(tmp_path):
  # A CT, MRI or microscopy image keeps its 65536 levels (on 8 bits, 1000 and 1100 read alike).
  from unet_jax.datasets.image_folder import _read
  values = np.random.default_rng(4).integers(0, 65536, (20, 24)).astype(np.uint16)
  values[0, :2] = 1000, 1100
  Image.fromarray(values).save(tmp_path / 'im16.png')
  assert Image.open(tmp_path / 'im16.png').mode == 'I;16'
  read = _read(str(tmp_path / 'im16.png'))
  assert read.dtype == np.uint16
  np.testing.assert_array_equal(read, values)
  # 32-bit integer gray (PIL's I, e.g. a TIFF) within 16 bits reads as its values; outside
  # them it is refused: a signed CT slice's negative HU would otherwise all clip to 0.
  Image.fromarray(values.astype(np.int32)).save(tmp_path / 'im32.tif')
  assert Image.open(tmp_path / 'im32.tif').mode == 'I'
  np.testing.assert_array_equal(_read(str(tmp_path / 'im32.tif')), values)
  for name, wide in (('hu.tif', values.astype(np.int16) // 16 - 1024),
                     ('wide.tif', values.astype(np.int32) * 2)):
    Image.fromarray(wide).save(tmp_path / name)
    with pytest.raises(UserError, match=re.escape(
        f'{name}: values {wide.min()}..{wide.max()} do not fit 16 bits (0..65535); save it '
        "shifted into them, e.g. a CT's Hounsfield units + 1024 as a 16-bit image")):
      _read(str(tmp_path / name))
  # Training's example: the values over 65535 (as 8-bit ones over 255).
  mask = np.zeros((20, 24), np.uint8)
  for normalize, scaled in (('unit', values / np.float32(65535)),
                            ('minmax', (values - np.float32(values.min())) / np.float32(
                                values.max() - values.min()))):
    x = preprocess({'image': read[..., None], 'mask': mask}, (20, 24), None, None,
                   normalize=normalize)['image']
    np.testing.assert_allclose(x[..., 0], scaled, rtol=0, atol=1e-7)
  eight = (np.random.default_rng(5).random((20, 24)) * 255).astype(np.uint8)
  labels = (eight % 3).astype(np.uint16)  # a 16-bit mask keeps its values
  Image.fromarray(labels).save(tmp_path / 'm16.png')
  np.testing.assert_array_equal(_read(str(tmp_path / 'm16.png'), mask=True), labels)
  Image.fromarray(labels * 1000).save(tmp_path / 'wide.png')
  with pytest.raises(UserError, match=r'wide.png: mask values 0..2000 do not fit 8 bits'):
    _read(str(tmp_path / 'wide.png'), mask=True)


def test_16_bit_images_are_resized_and_turned_as_their_8_bit_versions_are_on_16_bits():
  # Between its 8-bit levels a 16-bit image keeps what it has: resized and turned, it is its
  # 8-bit version's result times 257 (within the 8-bit result's rounding and the finer levels),
  # and each pixel is its float resampling, rounded.
  from unet_jax.image_io import resize
  rng = np.random.default_rng(6)
  eight = rng.integers(0, 255, (20, 24, 1), np.uint8)
  deep = eight.astype(np.uint16) * 257 + rng.integers(0, 257, eight.shape).astype(np.uint16)
  mask = rng.integers(0, 3, (20, 24), np.uint8)
  for resample in (Image.BILINEAR, Image.BICUBIC):
    got = resize(deep, 11, 13, resample)
    assert got.dtype == np.uint16 and got.shape == (11, 13, 1)
    coarse = resize(eight, 11, 13, resample).astype(np.int64) * 257
    assert np.abs(got.astype(np.int64) - coarse).max() <= 257 // 2 + 256
    fine = np.asarray(Image.fromarray(deep[..., 0].astype(np.float32)).resize((13, 11), resample))
    np.testing.assert_array_equal(got[..., 0], np.clip(np.rint(fine), 0, 65535))
  for scale in (1.0, 1.3):
    got, got_mask = rotate(deep, mask, 30.0, scale=scale)
    coarse, coarse_mask = rotate(eight, mask, 30.0, scale=scale)
    assert got.dtype == np.uint16 and got.shape == deep.shape
    np.testing.assert_array_equal(got_mask, coarse_mask)
    # (PIL's 8-bit affine transform truncates: within one 8-bit level, not half)
    assert np.abs(got.astype(np.int64) - coarse.astype(np.int64) * 257).max() <= 257 + 256
    assert len(np.unique(got % 257)) > 200  # (not merely the 8-bit levels, scaled)


@pytest.mark.parametrize('breakage,message', [
    (lambda r: os.remove(r / 'masks' / 'im03.png'), 'im03.jpg: has no mask'),
    (lambda r: os.remove(r / 'images' / 'im04.png'), 'im04.png: has no image'),
    (lambda r: Image.fromarray(np.zeros((5, 5), np.uint8)).save(r / 'masks' / 'im05.png'),
     'im05.png: mask is 5x5 but its image is 24x20'),
    (lambda r: (r / 'images' / 'im06.png').write_bytes(b'not an image'),
     'im06.png: cannot read it as an image'),
    (lambda r: _turn_by_exif(r, 'im03', 6, turn_mask=True), re.escape(
        'im03.png: mask is 20x24 but its image is 24x20; its EXIF orientation (6) turns it to '
        '20x24, as a photo viewer shows it and the mask was drawn, but training reads the pixels '
        "as stored: save the images upright (PIL's ImageOps.exif_transpose) and train again")),
])
def test_image_folder_errors_name_the_file(tmp_path, breakage, message):
  make_folder(tmp_path / 'd')
  breakage(tmp_path / 'd')
  with pytest.raises(UserError, match=message):
    scan(str(tmp_path / 'd'))


def _turn_by_exif(root, stem, orientation, turn_mask):
  """Gives root/images/STEM.jpg the EXIF orientation tag (its pixels as they were); with
  `turn_mask`, its mask drawn on the image as a viewer turns it (a quarter turn)."""
  image = Image.open(root / 'images' / f'{stem}.jpg')
  exif = Image.Exif()
  exif[0x0112] = orientation
  image.save(root / 'images' / f'{stem}.jpg', exif=exif)
  if turn_mask:
    mask = Image.open(root / 'masks' / f'{stem}.png')
    mask.transpose(Image.Transpose.ROTATE_270).save(root / 'masks' / f'{stem}.png')


def test_images_with_an_exif_orientation_train_as_stored_with_a_warning(tmp_path, capsys):
  # Masks that fit the stored pixels: read as stored (as PIL and milesial's loader), and said.
  from unet_jax.datasets.image_folder import _read
  make_folder(tmp_path / 'd')
  for stem in ('im05', 'im07'):
    _turn_by_exif(tmp_path / 'd', stem, 6, turn_mask=False)
  before = _read(str(tmp_path / 'd' / 'images' / 'im05.jpg'))
  scanned = scan(str(tmp_path / 'd'))
  assert sum(map(len, scanned.splits.values())) == 12
  err = capsys.readouterr().err
  assert err.splitlines() == [
      f"warning: 2 image(s) carry an EXIF orientation, e.g. {tmp_path / 'd' / 'images'}"
      '/im05.jpg (6); training reads the pixels as stored, as their masks lie; if the masks '
      'were drawn on the images as a photo viewer turns them, save the images upright '
      "(PIL's ImageOps.exif_transpose) and prepare again"]
  assert before.shape == (20, 24, 3)  # (as stored: not turned to 24x20)
  make_folder(tmp_path / 'plain')
  scan(str(tmp_path / 'plain'))
  assert capsys.readouterr().err == ''


def test_dataset_smaller_than_one_batch(tmp_path):
  make_folder(tmp_path / 'data', n=4)
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(
      tmp_path / 'data'), 'model.in_channels': 3, 'model.num_classes': 3, 'batch_size': 8})
  with pytest.raises(UserError, match='has 3 training examples, fewer than one batch'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))


def test_jpeg_masks_with_more_values_than_classes_are_named(tmp_path):
  # JPEG blends the labels 0 and 200 into new values at every edge; the line says so instead
  # of only asking for that many classes.
  make_folder(tmp_path / 'data', rgb_masks=False)
  for f in sorted(os.listdir(tmp_path / 'data' / 'masks')):
    m = Image.open(tmp_path / 'data' / 'masks' / f).point(lambda v: 200 if v else 0)
    m.save(tmp_path / 'data' / 'masks' / f.replace('.png', '.jpg'), quality=90)
    os.remove(tmp_path / 'data' / 'masks' / f)
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(
      tmp_path / 'data'), 'model.in_channels': 3, 'model.num_classes': 1, 'batch_size': 8})
  with pytest.raises(UserError, match=r"dataset 'image_folder' masks hold \d+ values \[0, 1, .* "
                     r'but model.num_classes=1: .*/masks/im00.jpg is a JPEG mask, and JPEG '
                     r'compression blends labels into new values at every edge; save the masks '
                     r'losslessly \(PNG\), or if these are your classes; set '
                     r'--config.model.num_classes=\d+$'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  # evaluate, scoring a one-class model on them, says the same.
  model = UNet(3, 1, base_features=4, depth=1)
  save_pretrained(str(tmp_path / 'net'), model, init_variables(model, jax.random.key(0)))
  with pytest.raises(UserError, match=r"masks hold \d+ values .* but the checkpoint's model has "
                     r'1 output class\(es\): .*/masks/im00.jpg is a JPEG mask, .*\(PNG\)$'):
    evaluate_checkpoint(str(tmp_path / 'net'), config=config)


def test_more_mask_values_than_classes(tmp_path):
  make_folder(tmp_path / 'data')
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(
      tmp_path / 'data'), 'model.in_channels': 3, 'model.num_classes': 1, 'batch_size': 8})
  with pytest.raises(UserError, match=r'masks hold 3 values .* but model.num_classes=1; set '
                     r'--config.model.num_classes=3'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))


def test_empty_folder(tmp_path):
  os.makedirs(tmp_path / 'd' / 'images'), os.makedirs(tmp_path / 'd' / 'masks')
  with pytest.raises(UserError, match='no PNG/JPEG/TIFF/BMP/GIF images found'):
    find_pairs(str(tmp_path / 'd'))


def test_each_process_reads_its_slice_of_the_same_global_batches():
  """2 processes' slices, concatenated, are the 1-process batch, augmentation included."""
  config = tiny_config(batch_size=8)
  source = [{'image': np.full((16, 16, 1), i, np.uint8), 'mask': np.zeros((16, 16, 1), np.uint8)}
            for i in range(20)]
  one = _TrainExample(source, config, 0, 1)
  two = [_TrainExample(source, config, p, 2) for p in range(2)]
  for batch in range(5):                         # crosses an epoch boundary (20 examples)
    whole = [one.map(batch * 8 + j)['image'] for j in range(8)]
    parts = [two[p].map(batch * 4 + j)['image'] for p in range(2) for j in range(4)]
    for a, b in zip(whole, parts, strict=True):
      np.testing.assert_array_equal(a, b)
  epoch0 = sorted(int(one.map(j)['image'].max() * 255 + 0.5) for j in range(20))
  assert len(set(epoch0)) > 10  # a permutation, not one example repeated


def test_sampling_with_replacement_draws_each_example_on_its_own_as_nnunet():
  config = tiny_config(batch_size=8, **{'data.sampling': 'replacement'})
  source = [{'image': np.full((16, 16, 1), i, np.uint8), 'mask': np.zeros((16, 16, 1), np.uint8)}
            for i in range(20)]

  def drawn(stream, positions):
    return [int(stream.map(j)['image'].max() * 255 + 0.5) for j in positions]

  one = _TrainExample(source, config, 0, 1)
  # Each position's example is a uniform draw of its own (seed, position): over the first 20
  # positions some examples come twice and some not at all, where a pass holds each once.
  first = drawn(one, range(20))
  assert first == [int(np.random.default_rng([config.seed, 2, g]).integers(20))
                   for g in range(20)]
  assert len(set(first)) < 20
  assert sorted(drawn(_TrainExample(source, tiny_config(batch_size=8), 0, 1), range(20))) == [
      *range(20)]
  # The same stream in 2 processes' slices, and after a resume's offset.
  two = [_TrainExample(source, config, p, 2) for p in range(2)]
  for batch in range(3):
    assert drawn(one, range(batch * 8, batch * 8 + 8)) == [
        x for p in range(2) for x in drawn(two[p], range(batch * 4, batch * 4 + 4))]
  assert drawn(_TrainExample(source, config, 0, 1, offset=16), range(8)) == drawn(one,
                                                                                  range(16, 24))
  # Over many positions, every example about equally often.
  counts = np.bincount(drawn(one, range(2000)), minlength=20)
  assert counts.min() > 60 and counts.max() < 140


def test_crop_foreground_centres_the_last_third_of_each_batch_as_nnunet():
  # nnU-Net's DataLoader oversamples the patches at positions round(batch * (1 - 0.33)) and
  # after: 5, 6 and 7 of a batch of 8. A 2x2 object in a corner of each 32x32 example: the
  # patches centred on the foreground hold it, the others rarely.
  source = []
  for i in range(20):
    mask = np.zeros((32, 32, 1), np.uint8)
    mask[1:3, 29:31] = 1
    source.append({'image': np.full((32, 32, 1), i, np.uint8), 'mask': mask})
  config = tiny_config(batch_size=8, image_size=32, crop_size=8, crop_foreground=0.33,
                       **{'augment.min_scale': 1.0})

  def batches(config, devices=1):
    stream = _TrainExample(source, config, 0, 1, devices=devices)
    return [[(int(x['image'].max() * 255 + 0.5), bool(x['mask'].any()))
             for x in map(stream.map, range(b * 8, b * 8 + 8))] for b in range(5)]

  plain = batches(config)
  for batch in plain:
    assert [held for _, held in batch[5:]] == [True] * 3
  assert sum(held for batch in plain for _, held in batch[:5]) < 5
  # The same patches whatever the devices and microbatches take them in.
  accumulated = batches(override(copy.deepcopy(config), {'grad_accum_steps': 2}), devices=2)
  assert [b for b in accumulated] != plain  # (another order of the slots)
  assert [sorted(b) for b in accumulated] == [sorted(b) for b in plain]
  # crop_foreground_random: each patch draws (nnU-Net's probabilistic variant).
  drawn = batches(override(copy.deepcopy(config), {'crop_foreground_random': True}))
  assert [[held for _, held in b] for b in drawn] != [[held for _, held in b] for b in plain]


def test_checkpoints_keep_latest_and_best(tmp_path):
  ckpts = TrainCheckpoints(str(tmp_path), keep=1)
  state = {'w': jax.numpy.zeros(3)}

  records = []
  seen = logging.Handler()
  seen.emit = records.append
  logging.getLogger('absl').addHandler(seen)
  try:
    for step, dice in [(1, 0.5), (2, 0.9), (3, 0.3), (4, None)]:
      ckpts.save(step, state, {'m': 1}, None if dice is None else {'eval_dice': dice})
    ckpts.wait()
  finally:
    logging.getLogger('absl').removeHandler(seen)
  # Step 4, saved without a score, as most steps of a run are: no warning from Orbax about it.
  assert not [r for r in records if 'metrics' in r.getMessage()], records
  assert sorted(int(d) for d in os.listdir(ckpts.directory) if d.isdigit()) == [2, 4]
  assert ckpts.best_step() == 2
  ckpts.close()
  # A resumed run (a new manager on the same folder) still knows which one is best: the Dice
  # is saved with each step (before, it lived only in the first run's memory, and step 2 was
  # deleted by the resumed run's first save).
  ckpts = TrainCheckpoints(str(tmp_path), keep=1)
  assert ckpts.best_step() == 2
  ckpts.save(5, state, {'m': 1}, {'eval_dice': 0.4})
  ckpts.wait()
  assert sorted(int(d) for d in os.listdir(ckpts.directory) if d.isdigit()) == [2, 5]
  ckpts.close()
  # No step scored (no evaluation fell on a checkpoint): `checkpoints/best` says so.
  unscored = TrainCheckpoints(str(tmp_path / 'unscored'), keep=1)
  unscored.save(1, state, {'m': 1})
  unscored.close()
  with pytest.raises(UserError, match='none of its checkpoints has an eval Dice saved with it '
                     r'.*; name a step instead: checkpoints/STEP$'):
    load_pretrained_with_metadata(str(tmp_path / 'unscored' / 'checkpoints' / 'best'))


def _augmented(seed, image, mask, crop=0, crop_foreground=0.0, fill=0, **augment):
  """preprocess at the source's own size (no resize; no crop but `crop`) with these augment
  settings (`fill`: the ignored label)."""
  import ml_collections
  aug = ml_collections.ConfigDict(dict(min_scale=1.0, flip_horizontal=False,
                                       flip_vertical=False, **augment))
  return preprocess({'image': image, 'mask': mask}, mask.shape, np.random.default_rng(seed),
                    aug, fill_label=fill, crop=crop, crop_foreground=crop_foreground)


def test_quarter_turns_turn_image_and_mask_together():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 1), np.uint8)
  mask = (rng.random((16, 16)) > 0.5).astype(np.uint8)
  seen = set()
  for seed in range(24):
    out = _augmented(seed, image, mask, rotate90=True)
    k = [k for k in range(4) if np.array_equal(out['mask'], np.rot90(mask, k))]
    assert len(k) == 1
    np.testing.assert_array_equal(out['image'], np.rot90(image, k[0]) / np.float32(255))
    seen.add(k[0])
  assert seen == {0, 1, 2, 3}
  # Off (the default), nothing turns, and the other draws are those of a stream without it.
  for seed in range(4):
    np.testing.assert_array_equal(_augmented(seed, image, mask, rotate90=False)['image'],
                                  _augmented(seed, image, mask)['image'])


def _numpy_rotation(array, degrees, order, scale=1.0):
  """`array` (H, W[, C]) turned `degrees` counter-clockwise about its centre and enlarged
  `scale` times about it, sampled at each output pixel's centre (order 0: nearest, 1:
  bilinear); NaN where the source falls outside (bilinear: where any of its four neighbours
  does)."""
  h, w = array.shape[:2]
  t = np.radians(degrees)
  y, x = np.mgrid[0:h, 0:w] + 0.5
  dx, dy = (x - w / 2) / scale, (y - h / 2) / scale
  # Counter-clockwise on screen (y down): the output's right takes the source's bottom.
  sx, sy = w / 2 + np.cos(t) * dx - np.sin(t) * dy, h / 2 + np.sin(t) * dx + np.cos(t) * dy
  a = array.reshape(h, w, -1).astype(np.float64)
  if order == 0:
    ix, iy = np.floor(sx).astype(int), np.floor(sy).astype(int)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = a[np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)]
  else:
    fx, fy = sx - 0.5, sy - 0.5
    x0, y0 = np.floor(fx).astype(int), np.floor(fy).astype(int)
    inside = (x0 >= 0) & (x0 + 1 < w) & (y0 >= 0) & (y0 + 1 < h)
    x0, y0 = np.clip(x0, 0, w - 2), np.clip(y0, 0, h - 2)
    wx, wy = (fx - x0)[..., None], (fy - y0)[..., None]
    out = ((1 - wy) * ((1 - wx) * a[y0, x0] + wx * a[y0, x0 + 1])
           + wy * ((1 - wx) * a[y0 + 1, x0] + wx * a[y0 + 1, x0 + 1]))
  out[~inside] = np.nan
  return out.reshape(array.shape)


def test_rotation_turns_image_and_mask_together():
  rng = np.random.default_rng(3)
  for channels, (h, w) in ((1, (24, 24)), (3, (20, 28))):
    image = rng.integers(0, 256, (h, w, channels), np.uint8)
    mask = rng.integers(0, 3, (h, w)).astype(np.uint8)
    for degrees in (17.0, -33.5, 90.0, 180.0):
      got_image, got_mask = rotate(image, mask, degrees, fill_label=7)
      want = _numpy_rotation(mask, degrees, 0)
      inside = ~np.isnan(want)
      # (a pixel centre on a cell edge may round either way)
      assert np.mean(got_mask[inside] == want[inside]) > 0.98, degrees
      if (~inside).any():  # corners: the fill label
        assert np.mean(got_mask[~inside] == 7) > 0.9, degrees
      want = _numpy_rotation(image, degrees, 1)
      inside = ~np.isnan(want)
      assert np.abs(got_image[inside] - want[inside]).max() <= 1, degrees
      assert not got_image[np.isnan(_numpy_rotation(image, degrees, 0))].any()  # black
    square = image[:16, :16]
    np.testing.assert_array_equal(rotate(square, mask[:16, :16], 90.0)[0], np.rot90(square))
  # In the stream: an angle from [-20, 20], drawn after the other geometric draws.
  image, mask = rng.integers(0, 256, (16, 16, 1), np.uint8), rng.integers(0, 2, (16, 16))
  mask = mask.astype(np.uint8)
  angles = []
  for seed in range(12):
    draws = np.random.default_rng(seed)
    draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)  # (the crop's)
    angles.append(draws.uniform(-20, 20))
    out = _augmented(seed, image, mask, rotate_degrees=20.0)
    want_image, want_mask = rotate(image, mask, angles[-1])
    np.testing.assert_array_equal(out['mask'], want_mask)
    np.testing.assert_array_equal(out['image'], want_image / np.float32(255))
  assert min(angles) < -10 and max(angles) > 10
  # Off (the default), nothing turns, and the other draws are those of a stream without it.
  for seed in range(4):
    np.testing.assert_array_equal(_augmented(seed, image, mask, rotate_degrees=0.0)['image'],
                                  _augmented(seed, image, mask)['image'])


def test_scaling_enlarges_or_shrinks_image_and_mask_together_with_the_rotation():
  rng = np.random.default_rng(4)
  for channels, (h, w) in ((1, (24, 24)), (3, (20, 28))):
    image = rng.integers(0, 256, (h, w, channels), np.uint8)
    mask = rng.integers(0, 3, (h, w)).astype(np.uint8)
    for degrees, scale in ((0.0, 1.3), (0.0, 0.7), (25.0, 1.4), (-140.0, 0.75)):
      got_image, got_mask = rotate(image, mask, degrees, fill_label=7, scale=scale)
      want = _numpy_rotation(mask, degrees, 0, scale)
      inside = ~np.isnan(want)
      assert np.mean(got_mask[inside] == want[inside]) > 0.97, (degrees, scale)
      if (~inside).any():  # shrunk or turned: the border brought in is the fill label
        assert np.mean(got_mask[~inside] == 7) > 0.9, (degrees, scale)
      # (shrunk: a border comes in; enlarged, not turned: none)
      assert (~inside).any() == (scale < 1) or degrees, (degrees, scale)
      want = _numpy_rotation(image, degrees, 1, scale)
      inside = ~np.isnan(want)
      assert np.abs(got_image[inside] - want[inside]).max() <= 1 + 1e-9, (degrees, scale)
      assert not got_image[np.isnan(_numpy_rotation(image, degrees, 0, scale))].any()
  # In the stream: the angle, then the factor (torchvision's RandomAffine order), each
  # applied to its share of the examples, its parameter drawn either way.
  image, mask = rng.integers(0, 256, (16, 16, 1), np.uint8), rng.integers(0, 2, (16, 16))
  mask = mask.astype(np.uint8)
  applied = {'rotate': 0, 'scale': 0}
  for seed in range(40):
    draws = np.random.default_rng(seed)
    draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)  # (the crop's)
    turn = draws.random() < 0.5
    angle = draws.uniform(-30, 30)
    grow = draws.random() < 0.3
    factor = draws.uniform(0.7, 1.4)
    applied['rotate'] += turn
    applied['scale'] += grow
    out = _augmented(seed, image, mask, rotate_degrees=30.0, rotate_prob=0.5, scale=(0.7, 1.4),
                     scale_prob=0.3)
    if turn or grow:
      want_image, want_mask = rotate(image, mask, angle if turn else 0.0,
                                     scale=factor if grow else 1.0)
    else:
      want_image, want_mask = image, mask
    np.testing.assert_array_equal(out['mask'], want_mask)
    np.testing.assert_array_equal(out['image'], want_image / np.float32(255))
  assert 10 < applied['rotate'] < 30 and 4 < applied['scale'] < 20, applied
  # Off (the default), the stream is that of a run without it.
  for seed in range(4):
    np.testing.assert_array_equal(_augmented(seed, image, mask, scale=())['image'],
                                  _augmented(seed, image, mask)['image'])


def test_rotated_in_corners_are_ignored_where_the_data_has_an_ignored_label(tmp_path):
  make_folder(tmp_path / 'd', n=8)
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(tmp_path / 'd'),
                          'data.data_dir': str(tmp_path / 'tfds'), 'model.in_channels': 3,
                          'model.num_classes': 2, 'data.ignore_value': 0x0080FF,
                          'augment.rotate_degrees': 45.0, 'augment.min_scale': 1.0,
                          'image_size': 16, 'batch_size': 8, 'num_train_steps': 1})
  source, _, info = input_pipeline.load_sources(config)
  assert info.ignore_id == 1
  batch = next(iter(input_pipeline.train_dataset(source, config, devices=1,
                                                 ignore_id=info.ignore_id)))
  plain = next(iter(input_pipeline.train_dataset(source, config, devices=1)))  # (fill: 0)
  # The same draws: the same images, the masks told apart only where the turn brought in
  # pixels from outside, labelled ignored (1, the ignored colour's label) instead of class 0.
  np.testing.assert_array_equal(batch['image'], plain['image'])
  differ = batch['mask'] != plain['mask']
  assert differ.mean() > 0.02
  assert np.all(batch['mask'][differ] == 1) and np.all(plain['mask'][differ] == 0)
  # (dark: black, blended by the resizes with the pixels next to it)
  assert batch['image'][differ].mean() < 0.5 * batch['image'][~differ].mean()


@pytest.mark.parametrize('normalize', ['zscore', 'minmax', 'ct'])
def test_rotated_in_corners_are_0_after_normalising_as_nnunet_pads_them(normalize):
  # nnU-Net turns and scales the normalised image and pads it with 0, so the corners count in
  # no statistic and are 0. Before, they were black pixels normalised with the rest.
  import ml_collections

  from unet_jax.ct_normalization import CTStatistics, ct_normalized
  how = (CTStatistics((0.4, 0.5), (0.2, 0.1), (0.1, 0.2), (0.9, 0.8)) if normalize == 'ct'
         else normalize)
  rng = np.random.default_rng(9)
  image = rng.integers(0, 256, (24, 32, 2), np.uint8)
  mask = rng.integers(0, 2, (24, 32)).astype(np.uint8)
  aug = ml_collections.ConfigDict(dict(min_scale=1.0, flip_horizontal=False,
                                       flip_vertical=False, rotate_degrees=40.0,
                                       scale=(0.7, 0.9)))
  def run(seed, normalize):
    return preprocess({'image': image, 'mask': mask}, (20, 28), np.random.default_rng(seed),
                      aug, fill_label=7, normalize=normalize)

  for seed in range(3):
    unit, got = run(seed, 'unit'), run(seed, how)
    corners = unit['mask'] == 7  # (the same draws: where the turn brought in the outside)
    assert corners.mean() > 0.05
    np.testing.assert_array_equal(got['mask'], unit['mask'])
    u, inner = unit['image'], unit['image'][~corners]
    if normalize == 'zscore':
      want = (u - inner.mean(axis=0)) / inner.std(axis=0)
    elif normalize == 'minmax':
      want = (u - inner.min(axis=0)) / (inner.max(axis=0) - inner.min(axis=0))
    else:
      want = ct_normalized(u, how)
    want[corners] = 0
    np.testing.assert_allclose(got['image'], want, atol=1e-5)
    assert np.all(got['image'][corners] == 0)


def test_crop_size_trains_on_patches_and_evaluates_whole_examples(tmp_path):
  # The patch: a crop of the resized example at the drawn offset, image and mask together.
  rng = np.random.default_rng(9)
  image, mask = rng.integers(0, 256, (24, 20, 3), np.uint8), rng.integers(0, 3, (24, 20))
  mask = mask.astype(np.uint8)
  offsets = set()
  for seed in range(10):
    out = _augmented(seed, image, mask, crop=8)
    whole = _augmented(seed, image, mask)  # (the same draws before the crop's)
    draws = np.random.default_rng(seed)
    draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)  # (the scale-crop's)
    y0, x0 = draws.integers(0, 24 - 8 + 1), draws.integers(0, 20 - 8 + 1)
    assert out['image'].shape == (8, 8, 3) and out['mask'].shape == (8, 8)
    np.testing.assert_array_equal(out['image'], whole['image'][y0:y0 + 8, x0:x0 + 8])
    np.testing.assert_array_equal(out['mask'], whole['mask'][y0:y0 + 8, x0:x0 + 8])
    offsets.add((int(y0), int(x0)))
  assert len(offsets) > 5
  # A run: 8x8 training batches, evaluated (and scored by `evaluate`) on the whole 16x16.
  config = tiny_config(crop_size=8, num_train_steps=2, eval_every_steps=2,
                       checkpoint_every_steps=2)
  source = input_pipeline.load_sources(config)[0]
  batch = next(iter(input_pipeline.train_dataset(source, config, devices=1)))
  assert batch['image'].shape == (16, 8, 8, 1) and batch['mask'].shape == (16, 8, 8)
  wd = str(tmp_path / 'wd')
  metrics = train.train_and_evaluate(config, wd)
  got = evaluate_checkpoint(wd)
  assert got['image_size'] == 16 and {k: v for k, v in got.items() if k in metrics} == metrics


def test_crop_foreground_centres_patches_on_rare_classes():
  image = np.zeros((64, 64, 1), np.uint8)
  mask = np.zeros((64, 64), np.uint8)
  mask[45:55, 3:13] = 1   # two objects of two classes, far apart, one of 4 pixels
  mask[5:7, 40:42] = 2
  mask[25:35, 25:35] = 9  # (ignored: not foreground)

  def classes_seen(share, seeds=range(40)):
    return [set(np.unique(_augmented(seed, image, mask, crop=8, crop_foreground=share,
                                     fill=9)['mask'])) - {0, 9} for seed in seeds]
  every = classes_seen(1.0)
  assert all(every)  # each patch holds a foreground class, centred on it
  assert sum(1 in c for c in every) > 10 and sum(2 in c for c in every) > 10  # (a class first)
  assert sum(bool(c) for c in classes_seen(0.0)) < 10  # (anywhere: mostly background)
  half = sum(bool(c) for c in classes_seen(0.5))
  assert 10 < half < 35
  # Only the ignored label besides 0: the patch falls where it would anywhere.
  only_ignored = np.where(mask == 9, 9, 0).astype(np.uint8)
  for seed in range(5):
    np.testing.assert_array_equal(
        _augmented(seed, image, only_ignored, crop=8, crop_foreground=1.0, fill=9)['mask'],
        _augmented(seed, image, only_ignored, crop=8, fill=9)['mask'])


def test_gamma_as_monai_and_noise_with_a_drawn_deviation():
  import torch
  from monai.transforms import AdjustContrast
  rng = np.random.default_rng(12)
  for channels in (1, 3):
    image = rng.integers(30, 220, (16, 16, channels), np.uint8)
    mask = rng.integers(0, 2, (16, 16)).astype(np.uint8)
    base = image / np.float32(255)
    gammas = []
    for seed in range(6):
      draws = np.random.default_rng(seed)
      draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)  # (the crop's)
      gammas.append(draws.uniform(0.7, 1.5))
      out = _augmented(seed, image, mask, gamma=(0.7, 1.5))
      want = AdjustContrast(gammas[-1])(torch.tensor(base).permute(2, 0, 1)).permute(1, 2, 0)
      np.testing.assert_allclose(out['image'], want.numpy(), atol=1e-6)
      np.testing.assert_array_equal(out['mask'], mask)
    assert min(gammas) < 0.9 and max(gammas) > 1.3
    for seed in range(6):
      draws = np.random.default_rng(seed)
      draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)
      std = np.float32(draws.uniform(0, 0.1))
      out = _augmented(seed, image, mask, noise=0.1)
      noise = out['image'] - base
      np.testing.assert_allclose(noise, std * draws.standard_normal(base.shape, np.float32),
                                 atol=1e-7)
      assert abs(noise.std() - std) < 0.3 * std and std <= 0.1
  # Off (the defaults), the stream is as it was.
  for seed in range(3):
    np.testing.assert_array_equal(_augmented(seed, image, mask, gamma=(), noise=0.0)['image'],
                                  _augmented(seed, image, mask)['image'])


def test_each_intensity_augmentation_applies_to_its_share_of_examples():
  # nnU-Net's p_per_sample (its recipe: brightness and contrast 0.15, gamma 0.3, noise 0.1):
  # a draw below the share applies it; its own parameters are drawn either way, so the draws
  # after it (here the gamma's) do not depend on whether it applied.
  import torch
  from monai.transforms import AdjustContrast
  rng = np.random.default_rng(3)
  image = rng.integers(40, 200, (12, 12, 3), np.uint8)
  mask = (rng.random((12, 12)) > 0.5).astype(np.uint8)
  base = image / np.float32(255)
  gray = (0.299 * base[..., 0] + 0.587 * base[..., 1] + 0.114 * base[..., 2]).mean()

  def monai_gamma(x, g):
    return AdjustContrast(g)(torch.tensor(x).permute(2, 0, 1)).permute(1, 2, 0).numpy()

  for name, setting in (('brightness', 0.4), ('contrast', 0.4), ('noise', 0.1)):
    applied = 0
    for seed in range(60):
      out = _augmented(seed, image, mask, **{name: setting, f'{name}_prob': 0.3,
                                             'gamma': (0.7, 1.5)})
      draws = np.random.default_rng(seed)
      draws.uniform(1.0, 1.0), draws.integers(0, 1), draws.integers(0, 1)  # (the crop's)
      if name == 'noise':  # (the last: gamma first, and nothing drawn after a closed gate)
        want = monai_gamma(base, draws.uniform(0.7, 1.5))
        gate = draws.random() < 0.3
        if gate:
          want = want + np.float32(draws.uniform(0, 0.1)) * draws.standard_normal(
              base.shape, np.float32)
      else:
        gate = draws.random() < 0.3
        factor = np.float32(draws.uniform(0.6, 1.4))
        x = base
        if gate and name == 'brightness':
          x = np.clip(base * factor, 0, 1)
        if gate and name == 'contrast':
          x = np.clip(factor * base + (1 - factor) * gray, 0, 1)
        want = monai_gamma(x, draws.uniform(0.7, 1.5))
      np.testing.assert_allclose(out['image'], want, atol=2e-5, err_msg=f'{name} {seed}')
      applied += gate
    assert 8 <= applied <= 30, (name, applied)  # (about 18 of 60)
  # The gamma's own share; at 1 (the default) nothing more is drawn: streams as they were.
  kept = [np.array_equal(_augmented(seed, image, mask, gamma=(0.7, 1.5), gamma_prob=0.3)['image'],
                         base) for seed in range(60)]
  assert 30 <= sum(kept) <= 52
  for seed in range(3):
    np.testing.assert_array_equal(
        _augmented(seed, image, mask, gamma=(0.7, 1.5), noise=0.1, gamma_prob=1.0,
                   noise_prob=1.0)['image'],
        _augmented(seed, image, mask, gamma=(0.7, 1.5), noise=0.1)['image'])


def test_brightness_and_contrast_as_torchvision_color_jitter():
  rng = np.random.default_rng(1)
  for channels in (1, 3):
    image = rng.integers(40, 200, (16, 16, channels), np.uint8)
    mask = (rng.random((16, 16)) > 0.5).astype(np.uint8)
    base = image / np.float32(255)
    factors = []
    for seed in range(8):
      # brightness alone: image x factor, factor in [0.6, 1.4] (clipped at 1)
      out = _augmented(seed, image, mask, brightness=0.4)
      factor = float(out['image'].max() / base.max()) if out['image'].max() < 1 else None
      if factor is not None:
        assert 0.6 <= factor <= 1.4
        np.testing.assert_allclose(out['image'], np.clip(base * factor, 0, 1), atol=1e-6)
        factors.append(factor)
      np.testing.assert_array_equal(out['mask'], mask)
      # contrast alone: torchvision's blend with the mean of the grayscale image
      out = _augmented(seed, image, mask, contrast=0.4)
      gray = base[..., 0] if channels == 1 else (
          0.299 * base[..., 0] + 0.587 * base[..., 1] + 0.114 * base[..., 2])
      mean = gray.mean()
      c = float((out['image'][0, 0, 0] - mean) / (base[0, 0, 0] - mean))
      assert 0.6 - 1e-4 <= c <= 1.4 + 1e-4
      np.testing.assert_allclose(out['image'], np.clip(c * base + (1 - c) * mean, 0, 1),
                                 atol=1e-5)
    assert len(set(np.round(factors, 4))) > 3  # drawn, not fixed

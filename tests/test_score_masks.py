"""score_masks: mask files against label files, by evaluate's metrics, at their own size."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train import tiny_config
from torch_reference import SeedUNet

from unet_jax.convert import torch_to_flax
from unet_jax.evaluate import evaluate_checkpoint
from unet_jax.predict import main as predict_main
from unet_jax.score_masks import main, score_folders

COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [9, 9, 9]], np.uint8)
VOID = 0x090909  # the last colour: ignored


def _rgb_masks(tmp_path, rng):
  """Predictions and labels of 3 classes (RGB) and an ignored colour, images of three sizes;
  class 2 absent from image 0 in both (scores 1), predicted but absent from the truth in 1."""
  os.makedirs(tmp_path / 'pred'), os.makedirs(tmp_path / 'labels')
  truths, preds = [], []
  for i, (h, w) in enumerate(((9, 11), (20, 7), (16, 16))):
    truth = rng.integers(0, 4, (h, w))
    pred = np.where(rng.random((h, w)) < 0.7, truth.clip(0, 2), rng.integers(0, 3, (h, w)))
    if i == 0:
      truth[truth == 2], pred[pred == 2] = 1, 1
    if i == 1:
      truth[truth == 2] = 0
    Image.fromarray(COLOURS[truth]).save(tmp_path / 'labels' / f'im{i}.png')
    Image.fromarray(COLOURS[pred]).save(tmp_path / 'pred' / f'im{i}_mask.png')
    truths.append(truth), preds.append(pred)
  return truths, preds


def test_scores_are_monais_per_image_at_each_size(tmp_path, capsys):
  from monai.metrics import DiceMetric, MeanIoU
  truths, preds = _rgb_masks(tmp_path, np.random.default_rng(0))
  # Classes by sorted colour (0xRRGGBB): black 0, (0,128,255) 1, red 2; VOID ignored.
  ours = {0: 0, 2: 1, 1: 2}
  for include in (True, False):
    got = score_folders(str(tmp_path / 'pred'), str(tmp_path / 'labels'),
                        include_background=include, ignore_value=VOID)
    assert got['images'] == 3 and got['class_values'] == [0, 0x0080FF, 0xFF0000]
    dice, iou = [], []
    for row, truth, pred in zip(got['per_image'], truths, preds, strict=True):
      valid = torch.tensor(truth != 3)[None, None]
      t = F.one_hot(torch.tensor(np.vectorize(lambda v: ours.get(v, 0))(truth)), 3)
      p = F.one_hot(torch.tensor(np.vectorize(ours.get)(pred)), 3)
      t, p = (x.permute(2, 0, 1)[None] * valid for x in (t, p))  # (ignored pixels: in neither)
      d = DiceMetric(include_background=True, ignore_empty=False)(p, t)[0]
      j = MeanIoU(include_background=True, ignore_empty=False)(p, t)[0]
      for c in range(3):
        assert row[f'dice_class{c}'] == pytest.approx(float(d[c]), rel=1e-6)
        assert row[f'iou_class{c}'] == pytest.approx(float(j[c]), rel=1e-6)
      scored = slice(0, 3) if include else slice(1, 3)
      assert row['dice'] == pytest.approx(float(d[scored].mean()), rel=1e-6)
      dice.append(float(d[scored].mean())), iou.append(float(j[scored].mean()))
      right = ((torch.tensor(np.vectorize(ours.get)(pred)) == torch.tensor(
          np.vectorize(lambda v: ours.get(v, -1))(truth))) & valid[0, 0]).sum()
      assert row['pixel_accuracy'] == pytest.approx(float(right / valid.sum()), rel=1e-6)
    assert got['dice'] == pytest.approx(np.mean(dice), rel=1e-6)
    assert got['iou'] == pytest.approx(np.mean(iou), rel=1e-6)
  # Colour 2, (0, 128, 255), is class 1: absent from image 0's masks (1), only predicted in 1's.
  assert got['per_image'][0]['dice_class1'] == 1.0 and got['per_image'][1]['dice_class1'] == 0.0
  assert got['rgb_masks'] is True
  # The command line names the classes by colour, in its first line and its table's rows.
  capsys.readouterr()
  assert main(['--predictions', str(tmp_path / 'pred'), '--labels', str(tmp_path / 'labels'),
               '--ignore_value', str(VOID)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].endswith('3 masks at their own size, classes [#000000, #0080ff, #ff0000]')
  assert out[2].split() == ['class', 'dice', 'iou', 'class_accuracy']
  for c, colour in enumerate(('#000000', '#0080ff', '#ff0000')):
    dice = f'{got[f"dice_class{c}"]:.4f}'
    assert out[3 + c].split()[:4] == [str(c), '(value', f'{colour})', dice]


def test_predicts_masks_score_as_evaluate_scores_the_checkpoint(tmp_path, capsys):
  # Images at the model's size: predict's masks are evaluation's predictions, so scoring the
  # files gives what evaluate gives for the checkpoint on the same pairs.
  rng = np.random.default_rng(1)
  for sub in ('images', 'masks'):
    os.makedirs(tmp_path / 'data' / sub)
  for i in range(10):
    mask = np.zeros((16, 16), np.uint8)
    mask[rng.integers(0, 8):, rng.integers(0, 8):] = 255
    image = (rng.random((16, 16)) * 120 + (mask > 0) * 100).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / 'data' / 'images' / f'im{i:02d}.png')
    Image.fromarray(mask).save(tmp_path / 'data' / 'masks' / f'im{i:02d}.png')
  state = SeedUNet(1, 1, base=4, depth=2).eval().state_dict()
  torch.save(state, tmp_path / 'm.pth')
  torch_to_flax(str(tmp_path / 'm.pth'), str(tmp_path / 'ckpt'))
  config = tiny_config(**{'data.name': 'image_folder', 'data.root': str(tmp_path / 'data'),
                          'data.data_dir': str(tmp_path / 'tfds'), 'data.holdout_percent': 50.0,
                          'model.num_classes': 1, 'model.depth': 2, 'image_size': 16})
  want = evaluate_checkpoint(str(tmp_path / 'ckpt'), config, per_image=True, surface=True,
                             confusion=True, nsd_tolerance=2.0, objects=True)
  held_out = sorted(r['file_name'] for r in want['per_image'])
  assert len(held_out) == 5
  os.makedirs(tmp_path / 'held_out')
  for name in held_out:
    os.link(tmp_path / 'data' / 'masks' / name, tmp_path / 'held_out' / name)
  images = [str(tmp_path / 'data' / 'images' / name) for name in held_out]
  assert predict_main([*images, '--checkpoint', str(tmp_path / 'ckpt'), '--output',
                       str(tmp_path / 'pred')]) == 0
  # (A binary model scores its foreground: the masks' class 1, without class 0.)
  got = score_folders(str(tmp_path / 'pred'), str(tmp_path / 'held_out'),
                      include_background=False, surface=True, confusion=True,
                      nsd_tolerance=2.0, objects=True)
  for name in ('dice', 'iou', 'pixel_accuracy', 'class_accuracy', 'hd95', 'assd', 'nsd',
               'nsd_tolerance', 'object_precision', 'object_recall', 'object_f1',
               'panoptic_quality', 'objects_true', 'objects_predicted', 'objects_matched'):
    assert got[name] == pytest.approx(want[name], rel=1e-6), name
  assert want['objects_true'] >= 5 and 'object_totals' not in want
  # (one object per image on either side here; their matching: test_object_scores)
  assert got['confusion'] == want['confusion']
  assert 0 < want['hd95'] < 16 * 2**0.5 and np.sum(got['confusion']) == 5 * 16 * 16
  rows = {r['file_name']: r for r in want['per_image']}
  for row in got['per_image']:
    assert row['dice'] == pytest.approx(rows[row['file_name']]['dice'], rel=1e-6)
    assert row['objects_predicted'] == rows[row['file_name']]['objects_predicted']
  assert want['dice'] not in (0.0, 1.0)  # (a model that is not trivially right or wrong)
  # The command line: the same, its rows in a CSV.
  capsys.readouterr()
  assert main(['--predictions', str(tmp_path / 'pred'), '--labels', str(tmp_path / 'held_out'),
               '--noinclude_background', '--per_image', str(tmp_path / 's.csv'),
               '--confusion', '--class_names', 'background,lesion']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == (f'{tmp_path}/pred against {tmp_path}/held_out: 5 masks at their own size, '
                    'classes [0, 255], class 0 left out of the means')
  means = out[1].split()
  assert dict(zip(means[::2], means[1::2], strict=True)) == {
      k: f'{got[k]:.4f}' for k in ('dice', 'iou', 'class_accuracy', 'pixel_accuracy')}
  # Each class's scores, a row per class with its name.
  assert out[2].split() == ['class', 'dice', 'iou', 'class_accuracy']
  for c, name in enumerate(('background', 'lesion')):
    assert out[3 + c].split() == [str(c), name, *(
        f'{got[f"{k}_class{c}"]:.4f}' for k in ('dice', 'iou', 'class_accuracy'))]
  assert out[5].startswith('confusion (pixels; rows: true class') and len(out) == 11
  assert json.loads(out[-2])['class_names'] == ['background', 'lesion']
  assert json.loads(out[-2])['rgb_masks'] is False
  # Unnamed, each class's row names its gray value; with --surface, NSD's tolerance is said
  # once, in the first line, not among the scores.
  assert main(['--predictions', str(tmp_path / 'pred'), '--labels', str(tmp_path / 'held_out'),
               '--noinclude_background', '--surface', '--nsd_tolerance', '2']) == 0
  out = capsys.readouterr().out.splitlines()
  assert [line.split()[:3] for line in out[3:5]] == [
      ['0', '(value', '0)'], ['1', '(value', '255)']]
  assert out[0].endswith('class 0 left out of the means, nsd within 2 pixel(s)')
  assert out[1].split()[::2] == ['dice', 'iou', 'class_accuracy', 'pixel_accuracy', 'hd95',
                                 'assd', 'nsd']
  assert json.loads(out[-1])['nsd_tolerance'] == 2.0
  with open(tmp_path / 's.csv', newline='') as f:
    assert [r['file_name'] for r in csv.DictReader(f)] == held_out


@pytest.mark.parametrize('setup,argv,message', [
    (lambda d: os.remove(d / 'pred' / 'im1_mask.png'), [],
     '{d}/labels/im1.png: no prediction for it in {d}/pred (expected im1_mask.png); predict it, '
     'or set --mask_suffix'),
    (lambda d: None, ['--mask_suffix', ''],
     '{d}/labels/im0.png: no prediction for it in {d}/pred (expected im0.png)'),
    (lambda d: Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(d / 'pred' / 'im2_mask.png'),
     [], '{d}/pred/im2_mask.png: is 5x5 but its label {d}/labels/im2.png is 16x16; predict at '
     "the labels' size"),
    (lambda d: None, ['--label_suffix', '_gt'],
     '{d}/labels/im0.png: a label not named NAME_gt.EXT (--label_suffix _gt); rename it, or set '
     '--label_suffix'),
    (lambda d: (d / 'labels' / 'im1.png').write_bytes(b'not an image'), [],
     '{d}/labels/im1.png: cannot read it as an image'),
    # Two files of one name: which is meant is not known (before: the first a folder listing
    # gave, or both labels scored).
    (lambda d: shutil.copy(d / 'pred' / 'im1_mask.png', d / 'pred' / 'im1_mask.tif'), [],
     "{d}/pred/im1_mask.png and {d}/pred/im1_mask.tif: two files for 'im1'; keep one"),
    (lambda d: shutil.copy(d / 'labels' / 'im2.png', d / 'labels' / 'im2.bmp'), [],
     "{d}/labels/im2.bmp and {d}/labels/im2.png: two files for 'im2'; keep one"),
    (lambda d: None, ['--class_names', 'a,b,c'],
     "--class_names names 3 class(es) but there are 4 (the masks' values ["),
    (lambda d: None, ['--class_names', 'a,b,,c'],
     "--class_names=['a', 'b', '', 'c'] must be one non-empty name per class"),
    (lambda d: None, ['--class_names', 'a,b,a,c'],
     "--class_names names 'a' more than once; give each class its own name"),
    (lambda d: None, ['--per_image', '/no/such/folder/s.csv'],
     '--per_image /no/such/folder/s.csv: no such folder /no/such/folder'),
    (lambda d: None, ['--surface', '--nsd_tolerance', '-1'], 'nsd_tolerance=-1 must be at '
     "least 0: the distance in pixels within which a boundary pixel counts as on the other "
     "mask's boundary"),
])
def test_refusals_are_one_line(tmp_path, capsys, setup, argv, message):
  _rgb_masks(tmp_path, np.random.default_rng(2))
  setup(tmp_path)
  code = main(['--predictions', str(tmp_path / 'pred'), '--labels', str(tmp_path / 'labels'),
               *argv])
  captured = capsys.readouterr()
  assert code == 2 and captured.out == ''
  err = captured.err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(
      'error: ' + message.format(d=tmp_path)), err


def test_installed_commands(tmp_path):
  # `pip install` puts unet-jax-score-masks, unet-jax-predict and unet-jax-evaluate beside the
  # interpreter.
  bin_dir = os.path.dirname(sys.executable)
  out = subprocess.run([os.path.join(bin_dir, 'unet-jax-score-masks'), '--predictions',
                        str(tmp_path / 'none'), '--labels', str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.strip() == (
      f'error: --predictions {tmp_path}/none: no such folder'), out.stderr
  out = subprocess.run([os.path.join(bin_dir, 'unet-jax-predict'), str(tmp_path / 'none.png'),
                        '--checkpoint', str(tmp_path), '--output', str(tmp_path / 'out')],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.strip() == (
      f'error: {tmp_path}/none.png: no such file or folder'), out.stderr
  evaluate = os.path.join(bin_dir, 'unet-jax-evaluate')
  out = subprocess.run([evaluate, '--checkpoint', str(tmp_path / 'none')],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.strip() == (
      f'error: {tmp_path}/none: no such checkpoint directory'), out.stderr
  # absl's help shows __main__'s docstring and flags: under the generated script, evaluate's.
  out = subprocess.run([evaluate, '--help'], capture_output=True, text=True, timeout=120)
  assert out.stdout.startswith('Scores a checkpoint on a dataset split'), out.stdout[:200]
  assert '--checkpoint: training workdir' in out.stdout and '--[no]surface' in out.stdout

"""Prediction: the array API, tiling equal to a whole-image pass, the CLI and its refusals."""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err, move_off_init, nchw, nhwc
from PIL import Image
from torch_reference import SeedUNet

import unet_jax
from unet_jax import UNet, init_variables, input_pipeline
from unet_jax.convert import torch_to_flax
from unet_jax.predict import _class_colours, _overlay, main, predict_logits, probabilities


def _moved_model():
  model = UNet(base_features=4, depth=2)
  variables = init_variables(model, jax.random.key(1))
  x = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 1), np.float32))
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  return model, {**variables, **updates}


def test_tiled_prediction_equals_whole_image():
  model, variables = _moved_model()
  image = np.random.default_rng(1).random((2, 160, 192, 1), np.float32)
  whole = predict_logits(model, variables, image)
  tiled = predict_logits(model, variables, image, tile=96, overlap=64)
  assert np.abs(tiled - whole).max() <= 1e-4 * np.abs(whole).max()
  np.testing.assert_array_equal(unet_jax.predict(model, variables, image, tile=96, overlap=64),
                                unet_jax.predict(model, variables, image))
  # Without enough overlap the seams show: the comparison above can fail.
  seams = predict_logits(model, variables, image, tile=96, overlap=0)
  assert np.abs(seams - whole).max() > 1e-3 * np.abs(whole).max()
  # Tiles that are not square, and an overlap per axis: the same whole-image logits, unless
  # one axis's overlap is too small.
  tiled = predict_logits(model, variables, image, tile=(96, 128), overlap=(64, 80))
  assert np.abs(tiled - whole).max() <= 1e-4 * np.abs(whole).max()
  seams = predict_logits(model, variables, image, tile=(96, 128), overlap=(64, 0))
  assert np.abs(seams - whole).max() > 1e-3 * np.abs(whole).max()


def test_cli_tiles_of_any_shape_and_their_refusals(tmp_path, converted, capsys):
  _write(tmp_path / 'x.png', (np.random.default_rng(6).random((40, 72)) * 255).astype(np.uint8))
  argv = [str(tmp_path / 'x.png'), '--checkpoint', str(converted), '--probabilities',
          '--output']
  assert main([*argv, str(tmp_path / 'out'), '--tile', '32x48', '--overlap', '16x24']) == 0
  model, variables = unet_jax.load_pretrained(str(converted))
  image = np.asarray(Image.open(tmp_path / 'x.png'))[None, ..., None]
  want = predict_logits(model, variables, image, tile=(32, 48), overlap=(16, 24))[0]
  np.testing.assert_allclose(np.load(tmp_path / 'out' / 'x_prob.npy'), 1 / (1 + np.exp(-want)),
                             rtol=1e-6)
  square = predict_logits(model, variables, image, tile=32, overlap=16)[0]
  assert np.abs(square - want).max() > 1e-4 * np.abs(want).max()  # (the width was honoured)
  # Refused before any file is written (before, only once an image larger than a tile came).
  for flags, message in (
      (['--tile', '30x32'], 'tile=30x32: each side must be a positive multiple of 2**depth=4'),
      (['--tile', '32x48', '--overlap', '16x48'],
       "overlap=16x48 must be at least 0 and below the tile's side (32x48)")):
    assert main([*argv, str(tmp_path / 'bad'), *flags]) == 2
    assert capsys.readouterr().err.strip() == f'error: {message}'
    assert not (tmp_path / 'bad').exists()


def test_predict_api_shapes_and_uint8():
  model, variables = _moved_model()
  img = (np.random.default_rng(2).random((37, 45, 1)) * 255).astype(np.uint8)
  out = unet_jax.predict(model, variables, img)
  assert out.shape == (37, 45) and out.dtype.kind == 'i'
  with pytest.raises(unet_jax.errors.UserError, match=r'images must be \(N, H, W, 1\)'):
    unet_jax.predict(model, variables, np.zeros((2, 32, 32, 3), np.float32))


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
def test_predict_at_a_size_sees_what_training_saw_and_resizes_back_as_milesial(dtype):
  model, variables = _moved_model()
  peak = np.iinfo(dtype).max  # (16-bit gray: resized at 16 bits, over 65535)
  image = (np.random.default_rng(4).random((40, 24, 1)) * peak).astype(dtype)
  got = predict_logits(model, variables, image[None], size=16)
  assert got.shape == (1, 40, 24, 1)
  # The network's input is training's preprocessing of the image at image_size=16 ...
  x = input_pipeline.preprocess({'image': image, 'mask': np.zeros((40, 24), np.uint8)}, 16,
                                None, None)['image']
  logits = np.array(model.apply(variables, x[None], train=False))  # (writable, for torch)
  # ... and the logits go back to 40x24 as milesial's predict.py takes them (F.interpolate).
  want = nhwc(torch.nn.functional.interpolate(nchw(logits), size=(40, 24), mode='bilinear'))
  assert max_rel_err(got, want) <= 1e-5
  assert max_rel_err(predict_logits(model, variables, image[None]), want) > 1e-2  # not native
  np.testing.assert_array_equal(unet_jax.predict(model, variables, image, size=16),
                                (got[0, ..., 0] > 0).astype(np.int32))


def torch_flip_tta(ref, x):
  """The mean over flips of a torch model's logits, each flipped back (NCHW)."""
  with torch.no_grad():
    return sum(torch.flip(ref(torch.flip(x, dims)), dims) if dims else ref(x)
               for dims in ((), (2,), (3,), (2, 3))) / 4


def test_flip_tta_is_the_mean_of_torch_logits_over_flips(tmp_path):
  ref = move_off_init(SeedUNet(1, 2, base=4, depth=2), 1, 2, hw=(32, 48)).eval()
  torch.save(ref.state_dict(), tmp_path / 'm.pth')
  model, variables = unet_jax.load_pretrained(torch_to_flax(str(tmp_path / 'm.pth'),
                                                            str(tmp_path / 'ckpt')))
  image = np.random.default_rng(5).random((2, 32, 48, 1), np.float32)
  got = predict_logits(model, variables, image, tta=True)
  want = nhwc(torch_flip_tta(ref, nchw(image)))
  assert max_rel_err(got, want) <= 1e-5
  plain = predict_logits(model, variables, image)
  assert max_rel_err(plain, want) > 1e-3  # (the network alone is not flip-equivariant)
  # Its masks, and a flipped image's, are the flipped masks.
  masks = unet_jax.predict(model, variables, image, tta=True)
  np.testing.assert_array_equal(masks, np.argmax(want, axis=-1))
  # (and the probabilities predict --probabilities writes: torch's softmax of them)
  np.testing.assert_allclose(probabilities(got), torch.softmax(torch.tensor(want), -1).numpy(),
                             atol=1e-6)
  np.testing.assert_array_equal(unet_jax.predict(model, variables, image[:, ::-1], tta=True),
                                masks[:, ::-1])


@pytest.fixture
def converted(tmp_path):
  ref = SeedUNet(1, 1, base=4, depth=2).eval()
  state = ref.state_dict()
  state['mask_values'] = [0, 200]
  torch.save(state, tmp_path / 'm.pth')
  torch_to_flax(str(tmp_path / 'm.pth'), str(tmp_path / 'ckpt'))
  return tmp_path / 'ckpt'


def _write(path, array):
  Image.fromarray(array).save(path)


def test_cli_writes_masks_at_input_size(tmp_path, converted, capsys):
  os.makedirs(tmp_path / 'in')
  rng = np.random.default_rng(0)
  _write(tmp_path / 'in' / 'a.png', (rng.random((37, 45)) * 255).astype(np.uint8))
  _write(tmp_path / 'in' / 'b.tif', (rng.random((64, 20)) * 255).astype(np.uint8))
  _write(tmp_path / 'c.jpg', (rng.random((30, 33)) * 255).astype(np.uint8))
  _write(tmp_path / 'in' / 'd.png', (rng.random((37, 45)) * 255).astype(np.uint8))  # same as a
  code = main([str(tmp_path / 'in'), str(tmp_path / 'c.jpg'), '--checkpoint', str(converted),
               '--output', str(tmp_path / 'out'), '--overlay'])
  assert code == 0, capsys.readouterr().err
  # Batched or not, each mask is the one the model gives for that image alone.
  model, variables = unet_jax.load_pretrained(str(converted))
  image_d = np.asarray(Image.open(tmp_path / 'in' / 'd.png'))[..., None]
  alone = unet_jax.predict(model, variables, image_d)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / 'd_mask.png')),
                                np.where(alone == 1, 200, 0))
  for stem, size in (('a', (45, 37)), ('b', (20, 64)), ('c', (33, 30)), ('d', (45, 37))):
    mask = Image.open(tmp_path / 'out' / f'{stem}_mask.png')
    assert mask.size == size
    assert set(np.unique(np.asarray(mask))) <= {0, 200}  # training mask values, not class ids
    assert Image.open(tmp_path / 'out' / f'{stem}_overlay.png').size == size


def test_cli_holds_one_batch_of_images_at_a_time(tmp_path, converted, capsys, monkeypatch):
  # 11 images of one size and 1 of another: batches of 8 and 3, and 1, each read when its
  # turn comes (before, every image and all their logits were held at once: 3.3 GB for 40
  # photos of 1918x1280, growing with the input).
  module = sys.modules['unet_jax.predict']
  rng = np.random.default_rng(8)
  os.makedirs(tmp_path / 'in')
  for i in range(11):
    _write(tmp_path / 'in' / f'a{i:02d}.png', (rng.random((20, 28)) * 255).astype(np.uint8))
  _write(tmp_path / 'in' / 'b.png', (rng.random((24, 24)) * 255).astype(np.uint8))
  seen, read = [], []
  predict_logits_, read_image = module.predict_logits, module._read_image

  def recording(model, variables, images, **kwargs):
    seen.append((len(images), len(read)))
    return predict_logits_(model, variables, images, **kwargs)

  def reading(path, channels):
    read.append(path)
    return read_image(path, channels)
  monkeypatch.setattr(module, 'predict_logits', recording)
  monkeypatch.setattr(module, '_read_image', reading)
  assert main([str(tmp_path / 'in'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out'), '--overlay']) == 0, capsys.readouterr().err
  # Each file read once to check it, then once in its batch, just before the batch runs.
  assert seen == [(8, 12 + 8), (3, 12 + 11), (1, 12 + 12)]
  # Into a file or pipe (not a terminal), no progress bar, only the closing line.
  out, err = capsys.readouterr()
  assert err == '' and out.startswith(f'wrote 12 mask(s) to {tmp_path}/out ('), (out, err)
  # --batch_size sets the batches (and how many images are held at once).
  seen.clear(), read.clear()
  assert main([str(tmp_path / 'in'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out5'), '--batch_size', '5']) == 0, capsys.readouterr().err
  assert seen == [(5, 12 + 5), (5, 12 + 10), (1, 12 + 11), (1, 12 + 12)]
  for name in ('a00', 'a10', 'b'):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out5' / f'{name}_mask.png')),
                                  np.asarray(Image.open(tmp_path / 'out' / f'{name}_mask.png')))
  capsys.readouterr()
  assert main([str(tmp_path / 'in'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out0'), '--batch_size', '0']) == 2
  assert capsys.readouterr().err == 'error: --batch_size=0 must be at least 1\n'
  assert not (tmp_path / 'out0').exists()
  model, variables = unet_jax.load_pretrained(str(converted))
  for name in ('a00', 'a10', 'b'):
    image = np.asarray(Image.open(tmp_path / 'in' / f'{name}.png'))[..., None]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / f'{name}_mask.png')),
                                  np.where(unet_jax.predict(model, variables, image) == 1, 200, 0))
    assert Image.open(tmp_path / 'out' / f'{name}_overlay.png').size == image.shape[1::-1]


def test_overlay_draws_classes_in_the_training_masks_colours():
  palette = [0, 0, 0, 9, 9, 9, 255, 0, 0, 0, 0, 255] + [0] * 756
  # Palette masks: each class's value is an index into the palette (class 1 is index 2).
  np.testing.assert_array_equal(_class_colours(3, [0, 2, 3], palette),
                                [[0, 0, 0], [255, 0, 0], [0, 0, 255]])
  # A palette that stops early: the entries after it are black.
  np.testing.assert_array_equal(_class_colours(2, [1, 5], palette[:6]), [[9, 9, 9], [0, 0, 0]])
  # RGB masks: each class's own colour.
  np.testing.assert_array_equal(_class_colours(2, [[0, 0, 0], [0, 128, 255]]),
                                [[0, 0, 0], [0, 128, 255]])
  # Gray masks (or none saved): black, then a cycle of distinct colours for any count.
  colours = _class_colours(7, [0, 100, 200])
  assert colours.shape == (7, 3) and (colours[0] == 0).all()
  assert len({tuple(c) for c in colours[1:5]}) == 4 and (colours[5] == colours[1]).all()
  image = np.full((2, 2, 1), 100, np.uint8)
  drawn = _overlay(image, np.asarray([[0, 1], [2, 0]]), _class_colours(3, [0, 2, 3], palette))
  np.testing.assert_array_equal(drawn[0, 0], [100, 100, 100])
  np.testing.assert_array_equal(drawn[0, 1], np.asarray([100 * 0.55 + 255 * 0.45, 55, 55],
                                                        np.float32).astype(np.uint8))
  np.testing.assert_array_equal(drawn[1, 0, 2], np.uint8(100 * 0.55 + 255 * 0.45))


def test_cli_reads_16_bit_gray_at_16_bits(tmp_path, capsys):
  # A 16-bit image (either byte order) is the network's input over 65535, its levels between
  # 8-bit ones kept; an 8-bit image of the same size, in the same batch, over 255. (PIL's own
  # conversion clipped 16-bit values at 255: the image came in almost white.)
  ref = move_off_init(SeedUNet(1, 3, base=4, depth=2), 1, 3, seed=2).eval()
  state = ref.state_dict()
  state['mask_values'] = [0, 100, 200]
  torch.save(state, tmp_path / 'm.pth')
  converted = torch_to_flax(str(tmp_path / 'm.pth'), str(tmp_path / 'ckpt'))
  os.makedirs(tmp_path / 'in')
  rng = np.random.default_rng(3)
  deep = rng.integers(0, 65536, (40, 36)).astype(np.uint16)
  eight = rng.integers(0, 256, (40, 36)).astype(np.uint8)
  _write(tmp_path / 'in' / 'a16.png', deep)
  assert Image.open(tmp_path / 'in' / 'a16.png').mode == 'I;16'
  Image.frombuffer('I;16B', (36, 40), deep.astype('>u2').tobytes(), 'raw', 'I;16B', 0, 1).save(
      tmp_path / 'in' / 'b16.tif')
  assert Image.open(tmp_path / 'in' / 'b16.tif').mode == 'I;16B'
  _write(tmp_path / 'in' / 'c8.png', eight)
  code = main([str(tmp_path / 'in'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out'), '--probabilities', '--overlay'])
  assert code == 0, capsys.readouterr().err
  for name, image in (('a16', deep / np.float32(65535)), ('b16', deep / np.float32(65535)),
                      ('c8', eight / np.float32(255))):
    with torch.no_grad():
      want = torch.softmax(ref(torch.from_numpy(image)[None, None]), 1)[0].permute(1, 2, 0)
    np.testing.assert_allclose(np.load(tmp_path / 'out' / f'{name}_prob.npy'), want.numpy(),
                               atol=2e-6)
  # (its overlay drawn on 8 bits: where no class is tinted, the image's v / 257)
  drawn = np.asarray(Image.open(tmp_path / 'out' / 'a16_overlay.png'))
  plain = np.asarray(Image.open(tmp_path / 'out' / 'a16_mask.png')) == 0
  np.testing.assert_array_equal(drawn[plain], np.repeat(
      np.round(deep / 257).astype(np.uint8)[plain][:, None], 3, -1))


@pytest.mark.parametrize('mode', ['L', 'LA', '1', 'I;16', 'I;16B', 'I', 'P', 'RGB', 'RGBA', 'CMYK',
                                  'YCbCr'])
def test_predict_reads_an_image_file_as_training_reads_it(tmp_path, mode):
  # Each PIL mode a file may come in: the model's input is the image training would have given
  # it, a gray one as itself (a gray folder's model) or repeated to RGB (a folder of gray and
  # colour images); a colour one only for an RGB model.
  from unet_jax.datasets.image_folder import _read
  from unet_jax.predict import _read_image
  rng = np.random.default_rng(1)
  rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8))
  if mode in ('I;16', 'I;16B', 'I'):
    values = rng.integers(0, 65536, (12, 10)).astype('>u2' if mode == 'I;16B' else np.int32)
    image = Image.frombuffer(mode if mode != 'I' else 'I', (10, 12), values.tobytes(), 'raw',
                             {'I;16B': 'I;16B', 'I': 'I'}.get(mode, 'I;16'), 0, 1)
  elif mode == 'P':
    image = rgb.quantize(16)
  else:
    image = rgb.convert(mode)
  path = str(tmp_path / ('x.tif' if mode in ('I;16B', 'CMYK', 'YCbCr', 'I') else 'x.png'))
  image.save(path)
  assert Image.open(path).mode == mode
  trained = _read(path)
  assert trained.ndim == (3 if mode in ('P', 'RGB', 'RGBA', 'CMYK', 'YCbCr') else 2)
  if trained.ndim == 2:
    np.testing.assert_array_equal(_read_image(path, 1), trained[..., None])
    np.testing.assert_array_equal(_read_image(path, 3), np.repeat(trained[..., None], 3, -1))
  else:
    np.testing.assert_array_equal(_read_image(path, 3), trained)
    with pytest.raises(unet_jax.errors.UserError,
                       match=f'is a colour \\({mode}\\) image but the model takes 1'):
      _read_image(path, 1)


@pytest.mark.parametrize('setup,message', [
    (lambda d: (d / 'x.png').write_bytes(b'garbage'), 'x.png: not an image PIL can read'),
    (lambda d: _write(d / 'x.png', np.zeros((32, 32, 3), np.uint8)),
     'x.png: is a colour (RGB) image but the model takes 1 channel'),
    (lambda d: os.makedirs(d / 'empty'), 'empty: no PNG/JPEG/TIFF/BMP/GIF images in this folder'),
    (lambda d: None, 'x.png: no such file or folder'),
    (lambda d: os.mkfifo(d / 'x.png'), 'x.png: is neither a file nor a folder (a pipe, socket or '
                                       'device); give image files or folders'),
    (lambda d: _write(d / 'x.png', np.zeros((3, 40), np.uint8)),
     'x.png: 40x3 is smaller than the model\'s minimum 4x4'),
    (lambda d: Image.fromarray(np.zeros((32, 32), np.float32)).save(d / 'x.tif'),
     'x.tif: a 32-bit float image, whose value range is unknown'),
    (lambda d: Image.fromarray(np.arange(-1024, 0, dtype=np.int16).reshape(32, 32)).save(
        d / 'x.tif'), 'x.tif: values -1024..-1 do not fit 16 bits (0..65535); save it shifted '
     "into them, e.g. a CT's Hounsfield units + 1024 as a 16-bit image"),
])
def test_cli_refusals(tmp_path, converted, capsys, setup, message):
  os.makedirs(tmp_path / 'in')
  setup(tmp_path / 'in')
  target = tmp_path / 'in' / ('empty' if 'empty' in message else message.split(':')[0])
  code = main([str(target), '--checkpoint', str(converted), '--output', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and message in err, err
  assert not (tmp_path / 'out').exists()


def test_cli_refuses_two_inputs_with_one_mask_name(tmp_path, converted, capsys):
  for folder in ('a', 'b'):
    os.makedirs(tmp_path / folder)
    _write(tmp_path / folder / 'x.png', np.zeros((32, 32), np.uint8))
  code = main([str(tmp_path / 'a'), str(tmp_path / 'b' / 'x.png'), '--checkpoint',
               str(converted), '--output', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert err == (f'error: {tmp_path}/a/x.png and {tmp_path}/b/x.png would both be written as '
                 'x_mask.png; rename one, or predict them into separate --output folders')
  assert not (tmp_path / 'out').exists()
  # The same file named twice (itself and through its folder) is one input, not a clash.
  code = main([str(tmp_path / 'a'), str(tmp_path / 'a' / 'x.png'), '--checkpoint',
               str(converted), '--output', str(tmp_path / 'out')])
  assert code == 0 and os.listdir(tmp_path / 'out') == ['x_mask.png']
  assert 'wrote 1 mask(s)' in capsys.readouterr().out


def test_cli_names_masks_as_nnunet_names_its_predictions(tmp_path, converted, capsys):
  # nnU-Net's imagesTs/NAME_0000.png -> NAME.png, the mask the default names NAME_0000_mask.png.
  os.makedirs(tmp_path / 'imagesTs')
  rng = np.random.default_rng(3)
  for name in ('case_001', 'case_002'):
    _write(tmp_path / 'imagesTs' / f'{name}_0000.png', (rng.random((24, 28)) * 255).astype(
        np.uint8))
  argv = [str(tmp_path / 'imagesTs'), '--checkpoint', str(converted), '--output']
  assert main([*argv, str(tmp_path / 'default')]) == 0
  assert main([*argv, str(tmp_path / 'out'), '--image_suffix', '_0000', '--mask_suffix', '',
               '--overlay', '--probabilities']) == 0
  assert sorted(os.listdir(tmp_path / 'out')) == [
      'case_001.png', 'case_001_overlay.png', 'case_001_prob.npy',
      'case_002.png', 'case_002_overlay.png', 'case_002_prob.npy']
  for name in ('case_001', 'case_002'):
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / 'out' / f'{name}.png')),
        np.asarray(Image.open(tmp_path / 'default' / f'{name}_0000_mask.png')))
  capsys.readouterr()
  for extra, output, message in (
      (['--image_suffix', '_0001'], 'x', f'{tmp_path}/imagesTs/case_001_0000.png: not named '
       "NAME_0001.EXT (--image_suffix _0001); rename it, or leave it out; if it is a channel of "
       "a case (nnU-Net's NAME_0000, NAME_0001, ...), list each channel's suffix: "
       '--image_suffix=_0000,_0001'),
      (['--mask_suffix', ''], 'imagesTs', f'{tmp_path}/imagesTs/case_001_0000.png: its mask would '
       f'be written over the input {tmp_path}/imagesTs/case_001_0000.png; choose another '
       '--output or --mask_suffix'),
      (['--image_suffix', '_0000', '--mask_suffix', '_0000'], 'imagesTs',
       f'{tmp_path}/imagesTs/case_001_0000.png: its mask would be written over the input '
       f'{tmp_path}/imagesTs/case_001_0000.png; choose another --output or --mask_suffix'),
      (['--mask_suffix', '_overlay', '--overlay'], 'y', '--mask_suffix _overlay would write the '
       'masks and the overlays (--overlay) to the same files; choose another suffix')):
    before = {f: os.path.getmtime(tmp_path / 'imagesTs' / f)
              for f in os.listdir(tmp_path / 'imagesTs')}
    code = main([*argv, str(tmp_path / output), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f'error: {message}', err
    assert {f: os.path.getmtime(tmp_path / 'imagesTs' / f)
            for f in os.listdir(tmp_path / 'imagesTs')} == before
    assert output == 'imagesTs' or not (tmp_path / output).exists()
  # So would an overlay (before, x's overlay was written over the input x_overlay.png).
  os.makedirs(tmp_path / 'mixed')
  for name in ('x', 'x_overlay'):
    _write(tmp_path / 'mixed' / f'{name}.png', (rng.random((24, 28)) * 255).astype(np.uint8))
  before = {f: os.path.getmtime(tmp_path / 'mixed' / f) for f in os.listdir(tmp_path / 'mixed')}
  assert main([str(tmp_path / 'mixed'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'mixed'), '--overlay']) == 2
  assert capsys.readouterr().err == (
      f'error: {tmp_path}/mixed/x.png: its overlay would be written over the input '
      f'{tmp_path}/mixed/x_overlay.png; choose another --output\n')
  assert {f: os.path.getmtime(tmp_path / 'mixed' / f)
          for f in os.listdir(tmp_path / 'mixed')} == before


def test_cli_size_below_the_model_minimum_is_refused(tmp_path, converted, capsys):
  _write(tmp_path / 'x.png', np.zeros((3, 40), np.uint8))  # fine once resized to 8x8
  argv = [str(tmp_path / 'x.png'), '--checkpoint', str(converted), '--output']
  assert main([*argv, str(tmp_path / 'ok'), '--size', '8']) == 0
  assert np.asarray(Image.open(tmp_path / 'ok' / 'x_mask.png')).shape == (3, 40)
  assert main([*argv, str(tmp_path / 'out'), '--size', '2']) == 2
  err = capsys.readouterr().err.strip()
  assert err == "error: --size=2 is below the model's minimum 4 (or 0: each image at its own size)"
  assert not (tmp_path / 'out').exists()
  # HEIGHTxWIDTH: the network sees 8x16 (what predict(size=(8, 16)) gives), masks come back.
  assert main([*argv, str(tmp_path / 'hw'), '--size', '8x16', '--probabilities']) == 0
  assert 'the network saw each image at 8x16' in capsys.readouterr().out
  model, variables = unet_jax.load_pretrained(str(converted))
  image = np.asarray(Image.open(tmp_path / 'x.png'))[..., None]
  want = predict_logits(model, variables, image[None], size=(8, 16))[0]
  np.testing.assert_allclose(np.load(tmp_path / 'hw' / 'x_prob.npy'), 1 / (1 + np.exp(-want)),
                             rtol=1e-6)
  assert not np.allclose(want, predict_logits(model, variables, image[None], size=8)[0])
  with pytest.raises(SystemExit) as stop:
    main([*argv, str(tmp_path / 'bad'), '--size', '8x'])
  assert stop.value.code == 2
  assert "'8x': give a size S or HEIGHTxWIDTH, e.g. 64 or 320x480" in capsys.readouterr().err
  assert not (tmp_path / 'bad').exists()


def test_cli_refuses_a_non_checkpoint(tmp_path, capsys):
  _write(tmp_path / 'x.png', np.zeros((32, 32), np.uint8))
  os.makedirs(tmp_path / 'notckpt')
  code = main([str(tmp_path / 'x.png'), '--checkpoint', str(tmp_path / 'notckpt'), '--output',
               str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and 'not a unet_jax checkpoint' in err and len(err.splitlines()) == 1
  assert not (tmp_path / 'out').exists()


def test_cli_refuses_an_output_that_is_a_file(tmp_path, converted, capsys):
  _write(tmp_path / 'x.png', np.zeros((32, 32), np.uint8))
  code = main([str(tmp_path / 'x.png'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'x.png')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert err.endswith('x.png: exists and is not a folder; choose another --output'), err


def _probabilities_and_thresholds(model, variables, image):
  """sigmoid of the logits, and two thresholds halfway between neighbouring probabilities
  about a quarter from each end (no pixel sits on them)."""
  prob = torch.sigmoid(torch.tensor(predict_logits(model, variables, image[None])))[0, ..., 0]
  values = np.unique(prob.numpy())
  return prob, [float(values[k] + values[k + 1]) / 2 for k in (len(values) // 4,
                                                                3 * len(values) // 4)]


def test_threshold_is_milesials_mask_threshold(tmp_path, converted, capsys):
  # milesial's predict.py: mask = sigmoid(output) > out_threshold, on the same logits.
  model, variables = _moved_model()
  image = (np.random.default_rng(6).random((32, 48, 1)) * 255).astype(np.uint8)
  prob, (low, high) = _probabilities_and_thresholds(model, variables, image)
  for t in (low, 0.5, high):
    want = (prob > t).numpy()
    assert t == 0.5 or 0.1 < want.mean() < 0.9, t
    np.testing.assert_array_equal(unet_jax.predict(model, variables, image, threshold=t), want)
  assert not np.array_equal(unet_jax.predict(model, variables, image, threshold=high),
                            unet_jax.predict(model, variables, image))
  # The command line writes those masks (in the checkpoint's mask values); a threshold out of
  # range writes nothing.
  model, variables = unet_jax.load_pretrained(str(converted))
  prob, (_, high) = _probabilities_and_thresholds(model, variables, image)
  os.makedirs(tmp_path / 'in')
  _write(tmp_path / 'in' / 'a.png', image[..., 0])
  assert main([str(tmp_path / 'in'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out'), '--threshold', repr(high), '--probabilities']) == 0
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / 'a_mask.png')),
                                np.where(prob.numpy() > high, 200, 0))
  # --probabilities: the sigmoid the threshold was applied to, (H, W, 1) float32
  saved = np.load(tmp_path / 'out' / 'a_prob.npy', allow_pickle=False)
  assert saved.shape == (32, 48, 1) and saved.dtype == np.float32
  np.testing.assert_allclose(saved[..., 0], prob.numpy(), rtol=1e-6)
  capsys.readouterr()
  assert main([str(tmp_path / 'in'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out2'), '--threshold', '1.5']) == 2
  assert capsys.readouterr().err == ('error: threshold=1.5 must be in (0, 1): the probability '
                                     'above which a pixel is foreground\n')
  assert not (tmp_path / 'out2').exists()
  two = UNet(num_classes=2, base_features=4, depth=2)
  with pytest.raises(unet_jax.errors.UserError, match=r'threshold=0.7 is for binary models \(1 '
                     r'output channel\); this one has 2 classes and takes the argmax'):
    unet_jax.predict(two, init_variables(two, jax.random.key(0)), image, threshold=0.7)


def test_cli_reads_one_gray_file_per_channel_as_nnunet_names_them(tmp_path, converted, capsys):
  # imagesTs/NAME_0000.png and NAME_0001.png are the two channels of NAME, for a 2-channel model.
  ref = move_off_init(SeedUNet(2, 3, base=4, depth=2), 2, 3, seed=4).eval()
  state = ref.state_dict()
  state['mask_values'] = [0, 100, 200]
  torch.save(state, tmp_path / 'two.pth')
  two = torch_to_flax(str(tmp_path / 'two.pth'), str(tmp_path / 'two'))
  os.makedirs(tmp_path / 'imagesTs')
  rng = np.random.default_rng(4)
  stacks = {}
  for name, (h, w) in (('case_001', (24, 28)), ('case_002', (32, 20))):
    stacks[name] = (rng.random((h, w, 2)) * 255).astype(np.uint8)
    for c in range(2):
      _write(tmp_path / 'imagesTs' / f'{name}_000{c}.png', stacks[name][..., c])
  argv = [str(tmp_path / 'imagesTs'), '--checkpoint', str(two), '--image_suffix', '_0000,_0001',
          '--mask_suffix', '']
  assert main([*argv, '--output', str(tmp_path / 'out'), '--probabilities', '--overlay']) == 0
  assert 'wrote 2 mask(s)' in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / 'out')) == [
      f'{n}{end}' for n in stacks for end in ('.png', '_overlay.png', '_prob.npy')]
  for name, stack in stacks.items():
    with torch.no_grad():
      x = torch.from_numpy(stack / np.float32(255)).permute(2, 0, 1)[None]
      want = torch.softmax(ref(x), 1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.load(tmp_path / 'out' / f'{name}_prob.npy'), want, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / f'{name}.png')),
                                  np.asarray([0, 100, 200])[want.argmax(-1)])
  # Refused in one line, nothing written (nor over an input).
  capsys.readouterr()
  folder = f'{tmp_path}/imagesTs'
  for args, output, message in (
      ([str(tmp_path / 'imagesTs'), '--checkpoint', str(two)], 'x', "the model takes 2 "
       'channels; one file gives 1 (gray) or 3 (RGB): give one gray file per channel, named by '
       "--image_suffix (e.g. _0000,_0001 for nnU-Net's NAME_0000.png, NAME_0001.png)"),
      ([str(tmp_path / 'imagesTs'), '--checkpoint', str(two), '--image_suffix', '_0000'], 'x',
       f'{folder}/case_001_0001.png: not named NAME_0000.EXT (--image_suffix _0000); rename it, '
       "or leave it out; if it is a channel of a case (nnU-Net's NAME_0000, NAME_0001, ...), "
       "list each channel's suffix: --image_suffix=_0000,_0001"),
      ([str(tmp_path / 'imagesTs'), '--checkpoint', str(converted), '--image_suffix',
        '_0000,_0001'], 'x', '--image_suffix _0000,_0001 names 2 channel files per case, but '
       'the model takes 1 channels'),
      ([*argv[:4], '_0000,_0001,_0002'], 'x', f"{folder}/case_001_0000.png: case 'case_001' has "
       'no case_001_0002.EXT (--image_suffix=_0000,_0001,_0002: one file per channel); add it, '
       "or leave the case's files out"),
      ([*argv[:6], '_0001'], 'imagesTs', f'{folder}/case_001_0000.png: its mask would be written '
       f'over the input {folder}/case_001_0001.png; choose another --output or --mask_suffix')):
    code = main([*args, '--output', str(tmp_path / output)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f'error: {message}', err
    assert output == 'imagesTs' or not (tmp_path / output).exists()
  assert len(os.listdir(tmp_path / 'imagesTs')) == 4
  for bad, message in (
      (np.zeros((24, 28, 3), np.uint8), 'a colour (RGB) image, but --image_suffix names one file '
       'per channel (each a gray image); save each channel as a gray image'),
      (np.zeros((24, 20), np.uint8), f'is 20x24 but {folder}/case_001_0000.png is 28x24; the '
       'channel files of a case must be one size')):
    _write(tmp_path / 'imagesTs' / 'case_001_0001.png', bad)
    assert main([*argv, '--output', str(tmp_path / 'y')]) == 2
    assert capsys.readouterr().err.strip() == f'error: {folder}/case_001_0001.png: {message}'
    assert not (tmp_path / 'y').exists()


def _converted_net(tmp_path, name, num_classes, base, depth, seed, mask_values):
  ref = move_off_init(SeedUNet(1, num_classes, base=base, depth=depth), 1, num_classes,
                      seed=seed).eval()
  state = ref.state_dict()
  state['mask_values'] = mask_values
  torch.save(state, tmp_path / f'{name}.pth')
  return ref, torch_to_flax(str(tmp_path / f'{name}.pth'), str(tmp_path / name))


def test_cli_ensemble_is_the_mean_of_torch_probabilities(tmp_path, capsys):
  # nnU-Net's ensemble of folds: the mean of the members' softmax (sigmoid) outputs, then the
  # argmax (threshold); the members may differ in width and depth.
  rng = np.random.default_rng(7)
  image = (rng.random((32, 48)) * 255).astype(np.uint8)
  os.makedirs(tmp_path / 'in')
  _write(tmp_path / 'in' / 'a.png', image)
  x = torch.tensor(image, dtype=torch.float32)[None, None] / 255
  for classes, values, act in ((3, [0, 100, 200], lambda t: torch.softmax(t, 1)),
                               (1, [0, 200], torch.sigmoid)):
    nets = [_converted_net(tmp_path, f'n{classes}_{k}', classes, base, depth, k, values)
            for k, (base, depth) in enumerate(((4, 2), (4, 1), (8, 2)))]
    out = tmp_path / f'out{classes}'
    args = [str(tmp_path / 'in'), '--output', str(out), '--probabilities']
    assert main(args + [a for _, path in nets for a in ('--checkpoint', path)]) == 0
    assert 'the mean probabilities of 3 checkpoints' in capsys.readouterr().out
    with torch.no_grad():
      want = torch.stack([act(ref(x)) for ref, _ in nets]).mean(0)[0].permute(1, 2, 0).numpy()
    got = np.load(out / 'a_prob.npy')
    np.testing.assert_allclose(got, want, atol=2e-6)
    classes_want = want.argmax(-1) if classes > 1 else (want[..., 0] > 0.5).astype(int)
    mask = np.asarray(Image.open(out / 'a_mask.png'))
    np.testing.assert_array_equal(mask, np.asarray(values)[classes_want])
  # Per-member sizes: each member's probabilities at its own size, averaged.
  members = [unet_jax.load_pretrained(path) for _, path in nets[:2]]
  from unet_jax.predict import ensemble_probabilities
  got = ensemble_probabilities(members, image[None, ..., None], sizes=[16, None])
  want = (probabilities(predict_logits(*members[0], image[None, ..., None], size=16))
          + probabilities(predict_logits(*members[1], image[None, ..., None]))) / 2
  np.testing.assert_allclose(got, want, atol=1e-7)


def test_cli_ensemble_refuses_checkpoints_of_other_tasks(tmp_path, capsys):
  _write(tmp_path / 'a.png', np.zeros((32, 32), np.uint8))
  _, two = _converted_net(tmp_path, 'two', 2, 4, 1, 0, [0, 255])
  _, three = _converted_net(tmp_path, 'three', 3, 4, 1, 0, [0, 100, 200])
  _, other = _converted_net(tmp_path, 'other', 3, 4, 1, 1, [0, 50, 200])
  zscored = str(tmp_path / 'zscored')  # (three, as if trained with data.normalize='zscore')
  shutil.copytree(three, zscored)
  about = json.loads((tmp_path / 'zscored' / 'unet_jax.json').read_text())
  about['metadata']['normalize'] = 'zscore'
  (tmp_path / 'zscored' / 'unet_jax.json').write_text(json.dumps(about))
  for a, b, message in (
      (two, three, f'error: {two} and {three} cannot be averaged: {two} has num_classes=2, '
       f'{three} num_classes=3; ensemble checkpoints trained for the same images and classes\n'),
      (three, other, f'error: {three} and {other} cannot be averaged: they were trained on masks '
       'whose values ([0, 100, 200] and [0, 50, 200]) make other classes; ensemble checkpoints '
       'trained on the same masks\n'),
      (three, zscored, f'error: {three} and {zscored} cannot be averaged: they were trained on '
       "images normalised otherwise (data.normalize='unit' and 'zscore'); ensemble checkpoints "
       'trained with the same data.normalize\n')):
    capsys.readouterr()
    assert main([str(tmp_path / 'a.png'), '--checkpoint', a, '--checkpoint', b, '--output',
                 str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err == message
    assert not (tmp_path / 'out').exists()
  # A converted member that records nothing, told by --normalize: it joins a z-scored run's
  # (the same weights: the ensemble's probabilities are the run's alone).
  os.makedirs(tmp_path / 'in')
  _write(tmp_path / 'in' / 'b.png', np.random.default_rng(0).integers(0, 256, (32, 32), np.uint8))
  capsys.readouterr()
  for checkpoints, flags, out in (([three, zscored], ['--normalize', 'zscore'], 'both'),
                                  ([zscored], [], 'one')):
    assert main([str(tmp_path / 'in'), '--output', str(tmp_path / out), '--probabilities',
                 *flags, *[a for c in checkpoints for a in ('--checkpoint', c)]]) == 0
  assert "z-scored, the mean probabilities of 2 checkpoints" in capsys.readouterr().out
  np.testing.assert_allclose(np.load(tmp_path / 'both' / 'b_prob.npy'),
                             np.load(tmp_path / 'one' / 'b_prob.npy'), atol=1e-7)


def _regions_by_flood_fill(classes, diagonal):
  """Each class but 0: its connected regions (lists of pixels), in reading order of their first
  pixel, by a breadth-first flood fill written for the test; 8 neighbours with `diagonal`,
  else 4."""
  h, w = classes.shape
  steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
           if (dy or dx) and (diagonal or not (dy and dx))]
  seen = np.zeros((h, w), bool)
  regions = {}
  for y in range(h):
    for x in range(w):
      c = classes[y, x]
      if c == 0 or seen[y, x]:
        continue
      region, queue = [], [(y, x)]
      seen[y, x] = True
      while queue:
        cy, cx = queue.pop()
        region.append((cy, cx))
        for dy, dx in steps:
          ny, nx = cy + dy, cx + dx
          if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and classes[ny, nx] == c:
            seen[ny, nx] = True
            queue.append((ny, nx))
      regions.setdefault(c, []).append(region)
  return regions


def _largest_components_by_flood_fill(classes):
  """Each class but 0 kept in its largest 8-connected region (the first among equals)."""
  out = classes.copy()
  for found in _regions_by_flood_fill(classes, diagonal=True).values():
    keep = max(range(len(found)), key=lambda k: (len(found[k]), -k))  # (first of equals)
    for k, region in enumerate(found):
      if k != keep:
        for y, x in region:
          out[y, x] = 0
  return out


def _small_regions_removed_by_flood_fill(classes, min_size):
  """Each 4-connected region of a class but 0 with fewer than `min_size` pixels set to 0."""
  out = classes.copy()
  for found in _regions_by_flood_fill(classes, diagonal=False).values():
    for region in found:
      if len(region) < min_size:
        for y, x in region:
          out[y, x] = 0
  return out


def test_largest_component_as_a_flood_fill_finds_it():
  from unet_jax.predict import keep_largest_component
  rng = np.random.default_rng(11)
  masks = rng.choice(4, size=(3, 17, 23), p=[0.55, 0.2, 0.15, 0.1]).astype(np.int32)
  masks[2, :, :] = 0
  masks[2, 2:4, 2:4] = masks[2, 8:10, 8:10] = 1  # (two regions of equal size: the first stays)
  got = keep_largest_component(masks)
  for m, g in zip(masks, got, strict=True):
    np.testing.assert_array_equal(g, _largest_components_by_flood_fill(m))
  assert (got != masks).any() and got[2, 2, 2] == 1 and got[2, 8, 8] == 0


def test_small_regions_as_a_flood_fill_finds_them():
  from unet_jax.post_processing import PostProcessing, keep_largest_component, remove_small_regions
  rng = np.random.default_rng(12)
  masks = rng.choice(4, size=(2, 3, 17, 23), p=[0.4, 0.3, 0.2, 0.1]).astype(np.int32)
  for min_size in (0, 1, 2, 3, 5, 1000):
    got = remove_small_regions(masks, min_size)
    for index in np.ndindex(2, 3):
      np.testing.assert_array_equal(
          got[index], _small_regions_removed_by_flood_fill(masks[index], min_size))
    assert (got == masks).all() if min_size <= 1 else (got != masks).any()
  assert not remove_small_regions(masks, 1000).any()
  # 4 neighbours: two pixels touching at a corner are two regions of one pixel (8 neighbours,
  # as keep_largest_component counts, make them one).
  corner = np.zeros((5, 5), np.int32)
  corner[1, 1] = corner[2, 2] = 1
  assert not remove_small_regions(corner, 2).any()
  np.testing.assert_array_equal(keep_largest_component(corner), corner)
  # Both: small regions go first. The other order differs where the largest 8-connected
  # region is specks that touch at corners.
  both = PostProcessing(largest_component=True, min_region_size=4)(masks)
  np.testing.assert_array_equal(both, keep_largest_component(remove_small_regions(masks, 4)))
  specks = np.zeros((1, 10, 10), np.int32)
  specks[0, range(7), range(7)] = 1  # (a diagonal: one region of 7 with 8 neighbours)
  specks[0, 8:, :3] = 1  # (2x3: one region of 6 either way)
  kept = PostProcessing(largest_component=True, min_region_size=2)(specks)
  np.testing.assert_array_equal(kept[0, 8:, :3], 1)
  assert kept.sum() == 6 and not remove_small_regions(keep_largest_component(specks), 2).any()
  assert not PostProcessing() and PostProcessing()(masks) is masks


def _instances_by_flood_fill(classes):
  """Every 4-connected region of every class but 0, numbered 1, 2, ... by its first pixel in
  reading order."""
  found = [r for regions in _regions_by_flood_fill(classes, diagonal=False).values()
           for r in regions]
  out = np.zeros(classes.shape, np.int64)
  for k, region in enumerate(sorted(found, key=lambda r: min(r)), start=1):
    for y, x in region:
      out[y, x] = k
  return out


def test_instance_labels_as_a_flood_fill_numbers_them():
  from unet_jax.post_processing import instance_labels
  rng = np.random.default_rng(13)
  masks = rng.choice(4, size=(2, 3, 17, 23), p=[0.5, 0.3, 0.1, 0.1]).astype(np.int32)
  masks[1, 2] = 0                                          # nothing
  masks[1, 1] = 2                                          # one region, no background
  got = instance_labels(masks)
  for index in np.ndindex(2, 3):
    np.testing.assert_array_equal(got[index], _instances_by_flood_fill(masks[index]))
  assert got[0, 0].max() > 20 and got[1, 1].max() == 1 and not got[1, 2].any()
  corner = np.zeros((4, 4), np.int32)
  corner[1, 1] = corner[2, 2] = 1                         # (touching at a corner: two objects)
  assert instance_labels(corner).max() == 2


def test_post_processing_in_predict_and_its_command_line(tmp_path, capsys):
  from unet_jax.post_processing import keep_largest_component, remove_small_regions
  # The plain masks of this model hold many regions, of many sizes.
  rng = np.random.default_rng(11)
  image = (rng.random((40, 44)) * 255).astype(np.uint8)
  _write(tmp_path / 'a.png', image)
  ref = move_off_init(SeedUNet(1, 1, base=4, depth=2), 1, 1, seed=1).eval()
  with torch.no_grad():  # (a fifth of the pixels foreground, in many blobs; logits spread
    # well beyond float rounding)
    ref.out_conv.conv.weight *= 1000
    ref.out_conv.conv.bias *= 1000
    ref.out_conv.conv.bias -= torch.quantile(
        ref(nchw(image[None, ..., None] / np.float32(255))), 0.8)
  state = ref.state_dict()
  state['mask_values'] = [0, 200]
  torch.save(state, tmp_path / 'm.pth')
  converted = torch_to_flax(str(tmp_path / 'm.pth'), str(tmp_path / 'ckpt'))
  model, variables = unet_jax.load_pretrained(converted)
  plain = unet_jax.predict(model, variables, image[..., None])
  want = unet_jax.predict(model, variables, image[..., None], largest_component=True)
  np.testing.assert_array_equal(want, keep_largest_component(plain))
  assert 0.1 < plain.mean() < 0.3 and (want != plain).any()
  assert main([str(tmp_path / 'a.png'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out'), '--largest_component']) == 0, capsys.readouterr().err
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / 'a_mask.png')),
                                np.where(want == 1, 200, 0))
  # Regions under 6 pixels removed, alone and with the largest region kept.
  small_gone = unet_jax.predict(model, variables, image[..., None], min_region_size=6)
  np.testing.assert_array_equal(small_gone, remove_small_regions(plain, 6))
  assert (small_gone != plain).any() and (small_gone != want).any()
  assert main([str(tmp_path / 'a.png'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out'), '--min_region_size', '6']) == 0, capsys.readouterr().err
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / 'a_mask.png')),
                                np.where(small_gone == 1, 200, 0))
  # --instances: each object of the written mask numbered, in a 16-bit PNG.
  assert main([str(tmp_path / 'a.png'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out'), '--instances']) == 0, capsys.readouterr().err
  ids = Image.open(tmp_path / 'out' / 'a_instances.png')
  assert ids.mode.startswith('I') and ids.size == (44, 40)
  np.testing.assert_array_equal(np.asarray(ids), _instances_by_flood_fill(plain[..., :, :]))
  assert np.asarray(ids).max() > 5
  capsys.readouterr()
  assert main([str(tmp_path / 'a.png'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out3'), '--instances', '--mask_suffix', '_instances']) == 2
  assert capsys.readouterr().err == ('error: --mask_suffix _instances would write the masks '
                                     'and the instance images (--instances) to the same files; '
                                     'choose another suffix\n')
  assert not (tmp_path / 'out3').exists()
  np.testing.assert_array_equal(
      unet_jax.predict(model, variables, image[..., None], largest_component=True,
                       min_region_size=1000), np.zeros_like(plain))
  capsys.readouterr()
  assert main([str(tmp_path / 'a.png'), '--checkpoint', str(converted), '--output',
               str(tmp_path / 'out2'), '--min_region_size', '-1']) == 2
  assert capsys.readouterr().err == ('error: min_region_size=-1 must be at least 0 (0: keep '
                                     'regions of any size)\n')
  assert not (tmp_path / 'out2').exists()

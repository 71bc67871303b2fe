"""Conversion both ways: exact round trips, the key table, and every refusal by its message."""

import os
import pickle
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import move_off_init
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch_reference import MilesialUNet, SeedUNet

from unet_jax import load_pretrained
from unet_jax import predict as unet_jax_predict
from unet_jax.checkpoint import abstract_variables, model_from_config
from unet_jax.convert import flax_to_torch, main, torch_to_flax
from unet_jax.torch_keys import key_table


def small_seed():
  return move_off_init(SeedUNet(1, 1, base=4, depth=3), 1, 1, steps=2)


def assert_same_state_dict(a, b, ordered=True):
  # .safetensors files keep no key order; torch.save keeps the module order.
  assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
  for key in a:
    if isinstance(a[key], torch.Tensor):
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
      assert torch.equal(a[key], b[key]), key
    else:
      assert a[key] == b[key], key


@pytest.mark.parametrize('config', [
    dict(depth=4, upsample='transpose', conv_bias=False),
    dict(depth=3, upsample='bilinear', conv_bias=True),
    dict(depth=5, upsample='transpose', conv_bias=True),
])
@pytest.mark.parametrize('layout', ['seed', 'milesial'])
def test_key_table_covers_exactly_the_model_variables(config, layout):
  model = model_from_config(dict(in_channels=2, num_classes=3, base_features=4, **config))
  expected = {'/'.join((c,) + tuple(k.key for k in path))
              for c in ('params', 'batch_stats')
              for path, _ in jax.tree_util.tree_leaves_with_path(abstract_variables(model)[c])}
  rows = key_table(layout=layout, **config)
  assert {r.flax_name for r in rows if r.kind != 'counter'} == expected
  assert len({r.torch_key for r in rows}) == len(rows)


def test_seed_full_size_state_dict_has_118_entries_and_round_trips(tmp_path):
  ref = SeedUNet()
  torch.save(ref.state_dict(), tmp_path / 'seed.pth')
  torch_to_flax(str(tmp_path / 'seed.pth'), str(tmp_path / 'flax'))
  flax_to_torch(str(tmp_path / 'flax'), str(tmp_path / 'back.pth'))
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert len(back) == 118
  assert_same_state_dict(ref.state_dict(), back)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_written_files_have_the_umasks_permissions(tmp_path, suffix):
  # Written under a temporary name (mkstemp: 0600, mkdtemp: 0700) and renamed; the result has
  # what open() and mkdir() give under the umask, so a group can read a converted checkpoint.
  torch.save(small_seed().state_dict(), tmp_path / 'a.pth')
  old = os.umask(0o027)
  try:
    torch_to_flax(str(tmp_path / 'a.pth'), str(tmp_path / 'flax'))
    flax_to_torch(str(tmp_path / 'flax'), str(tmp_path / f'b{suffix}'))
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'flax').st_mode) == 0o750
  assert stat.S_IMODE(os.stat(tmp_path / f'b{suffix}').st_mode) == 0o640


@pytest.mark.parametrize('src_suffix,dest_suffix', [('.pth', '.pth'), ('.safetensors',
                                                     '.safetensors'), ('.pth', '.safetensors')])
def test_round_trip_is_bit_identical(tmp_path, src_suffix, dest_suffix):
  ref = small_seed()
  src, dest = tmp_path / f'a{src_suffix}', tmp_path / f'b{dest_suffix}'
  if src_suffix == '.pth':
    torch.save(ref.state_dict(), src)
  else:
    save_safetensors(ref.state_dict(), str(src))
  torch_to_flax(str(src), str(tmp_path / 'flax'))
  flax_to_torch(str(tmp_path / 'flax'), str(dest))
  back = (torch.load(dest, weights_only=True) if dest_suffix == '.pth'
          else load_safetensors(str(dest)))
  assert_same_state_dict(ref.state_dict(), dict(back), ordered=dest_suffix == '.pth')
  # The seed's own class loads it strictly and computes exactly what the original does.
  fresh = SeedUNet(1, 1, base=4, depth=3)
  fresh.load_state_dict(back, strict=True)
  x = torch.randn(2, 1, 16, 24)
  assert torch.equal(fresh.eval()(x), ref.eval()(x))


def test_milesial_checkpoint_round_trips_with_its_names_and_mask_values(tmp_path):
  ref = move_off_init(MilesialUNet(3, 2, bilinear=True, base=4, depth=3, bias=True), 3, 2)
  state = ref.state_dict()
  state['mask_values'] = [[0, 0, 0], [255, 255, 255]]
  torch.save(state, tmp_path / 'carvana.pth')
  torch_to_flax(str(tmp_path / 'carvana.pth'), str(tmp_path / 'flax'))
  model, _ = load_pretrained(str(tmp_path / 'flax'))
  assert (model.in_channels, model.num_classes, model.base_features, model.depth,
          model.upsample, model.conv_bias) == (3, 2, 4, 3, 'bilinear', True)
  flax_to_torch(str(tmp_path / 'flax'), str(tmp_path / 'back.pth'))
  assert_same_state_dict(state, torch.load(tmp_path / 'back.pth', weights_only=True))
  flax_to_torch(str(tmp_path / 'flax'), str(tmp_path / 'back.safetensors'))
  torch_to_flax(str(tmp_path / 'back.safetensors'), str(tmp_path / 'flax2'))
  flax_to_torch(str(tmp_path / 'flax2'), str(tmp_path / 'back2.pth'))
  assert_same_state_dict(state, torch.load(tmp_path / 'back2.pth', weights_only=True))


def test_milesial_transpose_exports_to_seed_layout(tmp_path):
  ref = move_off_init(MilesialUNet(1, 1, base=4, depth=3), 1, 1)
  torch.save(ref.state_dict(), tmp_path / 'm.pth')
  torch_to_flax(str(tmp_path / 'm.pth'), str(tmp_path / 'flax'))
  flax_to_torch(str(tmp_path / 'flax'), str(tmp_path / 'seed.pth'), layout='seed')
  seed = SeedUNet(1, 1, base=4, depth=3)
  seed.load_state_dict(torch.load(tmp_path / 'seed.pth', weights_only=True), strict=True)
  x = torch.randn(2, 1, 32, 16)
  assert torch.equal(seed.eval()(x), ref.eval()(x))


@pytest.mark.parametrize('wrap', [
    lambda s: {'state_dict': s, 'epoch': 3},
    lambda s: {'model': s, 'optimizer': {'lr': 0.1}},
    lambda s: {f'module.{k}': v for k, v in s.items()},
    lambda s: {'model_state_dict': {f'module._orig_mod.{k}': v for k, v in s.items()}},
])
def test_wrapped_and_prefixed_state_dicts(tmp_path, wrap):
  ref = small_seed()
  torch.save(wrap(ref.state_dict()), tmp_path / 'w.pt')
  torch_to_flax(str(tmp_path / 'w.pt'), str(tmp_path / 'flax'))
  flax_to_torch(str(tmp_path / 'flax'), str(tmp_path / 'back.bin'))
  assert_same_state_dict(ref.state_dict(), torch.load(tmp_path / 'back.bin', weights_only=True))


def test_unet_inside_a_lightning_module_checkpoint(tmp_path, capsys):
  # A LightningModule holding the UNet as self.model and a loss with a weight: its .ckpt nests
  # the state_dict under 'state_dict', each key under the attribute's name.
  ref = move_off_init(MilesialUNet(3, 2, bilinear=True, base=8, depth=3), 3, 2)
  opt = torch.optim.Adam(ref.parameters())
  state = {f'model.{k}': v for k, v in ref.state_dict().items()}
  state['criterion.pos_weight'] = torch.tensor([2.0])
  torch.save({'epoch': 3, 'global_step': 120, 'state_dict': state,
              'optimizer_states': [opt.state_dict()], 'hyper_parameters': {'lr': 1e-3}},
             tmp_path / 'last.ckpt')
  assert main(['torch-to-flax', str(tmp_path / 'last.ckpt'), str(tmp_path / 'flax')]) == 0
  assert "(the UNet under 'model.' in " in capsys.readouterr().out
  model, variables = load_pretrained(str(tmp_path / 'flax'))
  x = torch.randn(2, 3, 37, 45)
  with torch.no_grad():
    want = ref.eval()(x).numpy().transpose(0, 2, 3, 1)
  got = model.apply(variables, x.numpy().transpose(0, 2, 3, 1), train=False)
  assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max()
  # The way back writes the UNet's own state_dict, which its class loads strictly.
  flax_to_torch(str(tmp_path / 'flax'), str(tmp_path / 'unet.pth'))
  assert_same_state_dict(ref.state_dict(),
                         torch.load(tmp_path / 'unet.pth', weights_only=True))


def test_two_unets_in_one_file_are_refused(tmp_path, capsys):
  unet = SeedUNet(1, 1, base=4, depth=1).state_dict()
  torch.save({**{f'student.{k}': v for k, v in unet.items()},
              **{f'teacher.{k}': v for k, v in unet.items()}}, tmp_path / 'kd.pth')
  check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / 'kd.pth'),
                                   str(tmp_path / 'o')],
                "kd.pth: holds 2 UNets (under 'student.', 'teacher.'); save the one to convert "
                'on its own', tmp_path / 'o')


# --- refusals: one line on stderr, exit status 2, nothing written --------------------------

def run_cli(capsys, *argv):
  code = main(list(argv))
  err = capsys.readouterr().err.strip()
  return code, err


def check_refused(capsys, tmp_path, argv, message, dest):
  before = set(os.listdir(tmp_path))
  code, err = run_cli(capsys, *argv)
  assert code == 2
  assert len(err.splitlines()) == 1, err
  assert message in err, err
  assert not os.path.exists(dest)
  assert set(os.listdir(tmp_path)) == before  # no temporary leftovers either


def _save_variant(tmp_path, edit, name='bad.pth'):
  state = SeedUNet(1, 1, base=4, depth=3).state_dict()
  edit(state)
  torch.save(state, tmp_path / name)
  return str(tmp_path / name)


@pytest.mark.parametrize('edit,message', [
    (lambda s: s.pop('up2.conv.double_conv.3.weight'),
     "missing key 'up2.conv.double_conv.3.weight'"),
    (lambda s: s.__setitem__('extra.weight', torch.zeros(3)), "unexpected key 'extra.weight'"),
    (lambda s: s.__setitem__('down2.downsampling.1.double_conv.3.weight',
                             torch.zeros(16, 16, 5, 5)),
     "key 'down2.downsampling.1.double_conv.3.weight' has shape (16, 16, 5, 5), the model "
     'inferred from the file expects (16, 16, 3, 3)'),
    (lambda s: s.__setitem__('up1.upsampling.weight', torch.zeros(32, 16, 2)),
     "key 'up1.upsampling.weight' has shape (32, 16, 2)"),
    (lambda s: s.__setitem__('in_conv.double_conv.1.running_var', torch.ones(5)),
     "key 'in_conv.double_conv.1.running_var' has shape (5,)"),
    (lambda s: s.__setitem__('epoch', 3), "entry 'epoch' is a int, not a tensor"),
])
def test_bad_state_dicts_are_refused_by_name(tmp_path, capsys, edit, message):
  src = _save_variant(tmp_path, edit)
  check_refused(capsys, tmp_path, ['torch-to-flax', src, str(tmp_path / 'out')], message,
                tmp_path / 'out')


def test_not_a_unet(tmp_path, capsys):
  torch.save({'fc.weight': torch.zeros(2, 2)}, tmp_path / 'fc.pth')
  check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / 'fc.pth'), str(tmp_path / 'o')],
                'not a UNet state_dict', tmp_path / 'o')


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_truncated_files(tmp_path, capsys, suffix):
  state = SeedUNet(1, 1, base=4, depth=3).state_dict()
  path = tmp_path / f'full{suffix}'
  torch.save(state, path) if suffix == '.pth' else save_safetensors(state, str(path))
  data = path.read_bytes()
  (tmp_path / f'cut{suffix}').write_bytes(data[:len(data) // 2])
  path.unlink()
  check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / f'cut{suffix}'),
                                   str(tmp_path / 'o')], 'is it truncated', tmp_path / 'o')


def test_other_bad_arguments(tmp_path, capsys):
  src = _save_variant(tmp_path, lambda s: None, 'ok.pth')
  check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / 'nope.pth'),
                                   str(tmp_path / 'o')], 'nope.pth: no such file', tmp_path / 'o')
  (tmp_path / 'w.npz').write_bytes(b'x')
  check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / 'w.npz'), str(tmp_path / 'o')],
                'unknown file type', tmp_path / 'o')
  (tmp_path / 'taken').mkdir()
  code, err = run_cli(capsys, 'torch-to-flax', src, str(tmp_path / 'taken'))
  assert code == 2 and 'already exists' in err and os.listdir(tmp_path / 'taken') == []
  check_refused(capsys, tmp_path,
                ['flax-to-torch', str(tmp_path / 'taken'), str(tmp_path / 'x.pth')],
                'not a unet_jax checkpoint', tmp_path / 'x.pth')
  assert main(['torch-to-flax', src, str(tmp_path / 'flax')]) == 0
  capsys.readouterr()
  check_refused(capsys, tmp_path,
                ['flax-to-torch', str(tmp_path / 'flax'), str(tmp_path / 'x.h5')],
                'unknown output type', tmp_path / 'x.h5')


def test_class_names_and_mask_values_reach_predict_and_export(tmp_path, capsys):
  # A 3-class PyTorch model: a state_dict names no class and says no mask value; given on the
  # command line, predict draws each class in its colour and export's model.json names them.
  from PIL import Image

  from unet_jax.checkpoint import load_pretrained_with_metadata
  from unet_jax.export import export_checkpoint
  from unet_jax.predict import main as predict_main
  state = move_off_init(SeedUNet(1, 3, base=4, depth=2), 1, 3).state_dict()
  # (a head whose classes are three feature channels: more than one class in the image below)
  state['out_conv.conv.weight'] = torch.eye(3, 4)[..., None, None]
  state['out_conv.conv.bias'] = torch.zeros(3)
  torch.save(state, tmp_path / 'm.pth')
  assert main(['torch-to-flax', str(tmp_path / 'm.pth'), str(tmp_path / 'flax'),
               '--class_names', 'background,liver,tumour',
               '--mask_values', '#000000,#ff0000,#00FF80']) == 0
  model, variables, meta = load_pretrained_with_metadata(str(tmp_path / 'flax'))
  assert meta['class_names'] == ['background', 'liver', 'tumour']
  assert meta['mask_values'] == [[0, 0, 0], [255, 0, 0], [0, 255, 128]]
  image = (np.random.default_rng(0).random((24, 20)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert predict_main([str(tmp_path / 'x.png'), '--checkpoint', str(tmp_path / 'flax'),
                       '--output', str(tmp_path / 'pred')]) == 0
  classes = np.asarray(unet_jax_predict(model, variables, image[..., None]))
  assert len(np.unique(classes)) > 1
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'pred' / 'x_mask.png')),
                                np.asarray(meta['mask_values'], np.uint8)[classes])
  _, description = export_checkpoint(str(tmp_path / 'flax'), 16)
  assert description['class_names'] == ['background', 'liver', 'tumour']
  # Gray values, and the way back to PyTorch.
  assert main(['torch-to-flax', str(tmp_path / 'm.pth'), str(tmp_path / 'gray'),
               '--mask_values', '0,1,2']) == 0
  assert load_pretrained_with_metadata(str(tmp_path / 'gray'))[2]['mask_values'] == [0, 1, 2]
  assert main(['flax-to-torch', str(tmp_path / 'gray'), str(tmp_path / 'back.pth'),
               '--layout', 'milesial']) == 0
  assert torch.load(tmp_path / 'back.pth', weights_only=True)['mask_values'] == [0, 1, 2]
  # The seed's layout: a .pth the seed's class loads strictly (the values were not the file's);
  # a .safetensors header keeps both, and converting it back brings them.
  assert main(['flax-to-torch', str(tmp_path / 'gray'), str(tmp_path / 'seed.pth')]) == 0
  SeedUNet(1, 3, base=4, depth=2).load_state_dict(
      torch.load(tmp_path / 'seed.pth', weights_only=True), strict=True)
  assert main(['flax-to-torch', str(tmp_path / 'flax'), str(tmp_path / 'm.safetensors')]) == 0
  assert main(['torch-to-flax', str(tmp_path / 'm.safetensors'), str(tmp_path / 'again')]) == 0
  again = load_pretrained_with_metadata(str(tmp_path / 'again'))[2]
  assert {k: again[k] for k in ('class_names', 'mask_values')} == {
      k: meta[k] for k in ('class_names', 'mask_values')}
  # Refused, one line each, nothing written.
  milesial = _save_variant(tmp_path, lambda s: s.__setitem__('mask_values', [0, 255]), 'mv.pth')
  for argv, message in [
      (['--class_names', 'a,b'], '--class_names names 2 class(es) but there are 3 (' +
       f'{tmp_path}/m.pth has 3 output channel(s)); name each class once, in class-id order'),
      (['--class_names', 'a,b,a'], "--class_names names 'a' more than once"),
      (['--mask_values', '0,255'], '--mask_values gives 2 value(s) but there are 3 classes'),
      (['--mask_values', '0,1,256'], "--mask_values 0,1,256: '256' is neither a gray value 0-255 "
       'nor a colour #rrggbb; give one per class, e.g. 0,255 or #000000,#ff0000'),
      (['--mask_values', '0,#ff0000,2'], 'mixes gray values and colours; give one kind'),
      (['--mask_values', '0,1,1'], 'a value more than once; give each class its own'),
      (['--mask_values', '#ff00zz,1,2'], "'#ff00zz' is neither a gray value"),
  ]:
    check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / 'm.pth'),
                                     str(tmp_path / 'o'), *argv], message, tmp_path / 'o')
  check_refused(capsys, tmp_path, ['torch-to-flax', milesial, str(tmp_path / 'o'),
                                   '--mask_values', '0,1'],
                f'{milesial}: holds its own mask_values [0, 255], not [0, 1]; leave out '
                '--mask_values', tmp_path / 'o')
  assert main(['torch-to-flax', milesial, str(tmp_path / 'same'), '--mask_values', '0,255']) == 0
  save_safetensors(torch.load(tmp_path / 'm.pth', weights_only=True),
                   str(tmp_path / 'h.safetensors'), metadata={'class_names': 'liver'})
  check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / 'h.safetensors'),
                                   str(tmp_path / 'o')],
                f"{tmp_path}/h.safetensors: its header's class_names is not JSON ('liver'); "
                'remove it from the header', tmp_path / 'o')
  check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / 'm.safetensors'),
                                   str(tmp_path / 'o'), '--class_names', 'bg,a,b'],
                f"{tmp_path}/m.safetensors: holds its own class_names ['background', 'liver', "
                "'tumour'], not ['bg', 'a', 'b']; leave out --class_names", tmp_path / 'o')


def test_normalize_of_a_converted_model_reaches_predict_and_export(tmp_path, capsys):
  # A PyTorch model trained on z-scored images: recorded, predict and export normalise so.
  import jax

  from unet_jax.checkpoint import load_pretrained_with_metadata
  from unet_jax.export import export_checkpoint
  from unet_jax.predict import main as predict_main
  from unet_jax.predict import probabilities
  ref = move_off_init(SeedUNet(3, 1, base=4, depth=2), 3, 1)
  torch.save(ref.state_dict(), tmp_path / 'm.pth')
  check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / 'm.pth'), str(tmp_path / 'o'),
                                   '--normalize', 'percentile'],
                "--normalize percentile: use 'unit' (images scaled to [0, 1]), 'zscore' (then "
                "each image's channels to mean 0, deviation 1) or 'minmax' (then each image's "
                'channels stretched to [0, 1])', tmp_path / 'o')
  assert main(['torch-to-flax', str(tmp_path / 'm.pth'), str(tmp_path / 'z'),
               '--normalize', 'zscore']) == 0
  assert load_pretrained_with_metadata(str(tmp_path / 'z'))[2]['normalize'] == 'zscore'
  image = np.random.default_rng(0).integers(0, 256, (16, 20, 3), np.uint8)
  scaled = image / np.float32(255)
  zscored = (scaled - scaled.mean(axis=(0, 1))) / scaled.std(axis=(0, 1))
  with torch.no_grad():
    want = torch.sigmoid(ref(torch.from_numpy(zscored).permute(2, 0, 1)[None]))[0, 0].numpy()
  from PIL import Image
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert predict_main([str(tmp_path / 'x.png'), '--checkpoint', str(tmp_path / 'z'), '--output',
                       str(tmp_path / 'pred'), '--probabilities']) == 0
  np.testing.assert_allclose(np.load(tmp_path / 'pred' / 'x_prob.npy')[..., 0], want, atol=2e-5)
  data, about = export_checkpoint(str(tmp_path / 'z'), (16, 20))
  served = np.asarray(jax.export.deserialize(data).call(scaled[None]))
  np.testing.assert_allclose(probabilities(served)[0, ..., 0], want, atol=2e-5)
  assert about['normalize'] == 'zscore, inside the artifact'
  # nnU-Net's rescale_to_0_1 (RescaleTo01Normalization, on the file's own values): each
  # channel shifted to 0 and divided by its new maximum; through predict and export alike.
  assert main(['torch-to-flax', str(tmp_path / 'm.pth'), str(tmp_path / 'mm'),
               '--normalize', 'minmax']) == 0
  other = image.copy()
  other[..., 1] = other[..., 1] // 3 + 40  # (channels of other ranges: each stretched alone)
  Image.fromarray(other).save(tmp_path / 'y.png')
  shifted = other.astype(np.float32) - other.min(axis=(0, 1))
  stretched = shifted / shifted.max(axis=(0, 1))
  with torch.no_grad():
    want_mm = torch.sigmoid(ref(torch.from_numpy(stretched).permute(2, 0, 1)[None]))[0, 0].numpy()
  assert predict_main([str(tmp_path / 'y.png'), '--checkpoint', str(tmp_path / 'mm'),
                       '--output', str(tmp_path / 'predmm'), '--probabilities']) == 0
  assert 'stretched to [0, 1]' in capsys.readouterr().out
  np.testing.assert_allclose(np.load(tmp_path / 'predmm' / 'y_prob.npy')[..., 0], want_mm,
                             atol=2e-5)
  data, about = export_checkpoint(str(tmp_path / 'mm'), (16, 20))
  served = np.asarray(jax.export.deserialize(data).call(other[None] / np.float32(255)))
  np.testing.assert_allclose(probabilities(served)[0, ..., 0], want_mm, atol=2e-5)
  assert about['normalize'] == 'minmax, inside the artifact'
  # Converted without it (the file said nothing): predict --normalize says it instead.
  assert main(['torch-to-flax', str(tmp_path / 'm.pth'), str(tmp_path / 'plain')]) == 0
  assert 'normalize' not in load_pretrained_with_metadata(str(tmp_path / 'plain'))[2]
  for flag, out in (['--normalize', 'zscore'], 'told'), ([], 'untold'):
    assert predict_main([str(tmp_path / 'x.png'), '--checkpoint', str(tmp_path / 'plain'),
                         '--output', str(tmp_path / out), '--probabilities', *flag]) == 0
  said = capsys.readouterr().out.splitlines()
  assert "each image's channels z-scored" in said[-2] and 'z-scored' not in said[-1]
  np.testing.assert_allclose(np.load(tmp_path / 'told' / 'x_prob.npy')[..., 0], want, atol=2e-5)
  assert np.abs(np.load(tmp_path / 'untold' / 'x_prob.npy')[..., 0] - want).max() > 1e-3
  # Against what a checkpoint records, or unknown: refused, one line, nothing written.
  for flag, message in (('unit', f"--normalize unit: {tmp_path / 'z'} was trained on images "
                         "normalised 'zscore' (as it records), and predict gives them so; "
                         'leave out --normalize'),
                        ('percentile', "--normalize percentile: use 'unit' (images scaled to "
                         "[0, 1]), 'zscore'")):
    assert predict_main([str(tmp_path / 'x.png'), '--checkpoint', str(tmp_path / 'z'),
                         '--output', str(tmp_path / 'refused'), '--normalize', flag]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / 'refused').exists()


def test_whole_pickled_model_is_refused(tmp_path, capsys):
  torch.save(SeedUNet(1, 1, base=4, depth=3), tmp_path / 'model.pth')  # the module, not weights
  check_refused(capsys, tmp_path, ['torch-to-flax', str(tmp_path / 'model.pth'),
                                   str(tmp_path / 'o')], 'refused to load', tmp_path / 'o')


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('how', ['torch.save', 'legacy-pickle'])
def test_malicious_pickle_never_runs(tmp_path, how):
  marker = tmp_path / 'pwned'
  state = dict(SeedUNet(1, 1, base=4, depth=3).state_dict(), payload=_Payload(marker))
  src = tmp_path / 'evil.pth'
  if how == 'torch.save':
    torch.save(state, src)
  else:
    with open(src, 'wb') as f:
      pickle.dump(state, f)
  # Sanity: the payload is live (plain pickle would run it).
  with open(tmp_path / 'probe.pkl', 'wb') as f:
    pickle.dump(_Payload(tmp_path / 'probe-ran'), f)
  pickle.loads((tmp_path / 'probe.pkl').read_bytes())
  assert (tmp_path / 'probe-ran').exists()

  proc = subprocess.run([sys.executable, '-m', 'unet_jax.convert', 'torch-to-flax', str(src),
                         str(tmp_path / 'out')], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith('error: ') and 'refused to load' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not marker.exists()
  assert not (tmp_path / 'out').exists()


def test_cli_round_trip_in_a_subprocess(tmp_path):
  ref = small_seed()
  save_safetensors(ref.state_dict(), str(tmp_path / 'm.safetensors'))
  for argv in (['torch-to-flax', 'm.safetensors', 'flax'], ['flax-to-torch', 'flax', 'b.pth']):
    proc = subprocess.run([sys.executable, '-m', 'unet_jax.convert', *argv], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
  assert_same_state_dict(ref.state_dict(), torch.load(tmp_path / 'b.pth', weights_only=True))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_half_precision_files_convert_to_their_exact_float32_values(tmp_path, dtype, suffix):
  half = {k: v.to(dtype) if v.is_floating_point() else v
          for k, v in small_seed().state_dict().items()}
  path = tmp_path / f'm{suffix}'
  torch.save(half, path) if suffix == '.pth' else save_safetensors(half, str(path))
  torch_to_flax(str(path), str(tmp_path / 'flax'))
  flax_to_torch(str(tmp_path / 'flax'), str(tmp_path / 'back.pth'))
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert_same_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()},
                         back)


def test_bfloat16_safetensors_read_without_jax_loaded(tmp_path):
  """unet_jax loads lazily: the reader must not rely on JAX having taught numpy bfloat16."""
  save_safetensors({'w': torch.arange(4, dtype=torch.bfloat16)}, str(tmp_path / 'w.safetensors'))
  code = ('import sys; from unet_jax.state_dict_io import read_state_dict; '
          'w = read_state_dict(sys.argv[1])[0]["w"]; '
          'assert "jax" not in sys.modules; print(w.astype("float32").tolist())')
  proc = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'w.safetensors')],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == '[0.0, 1.0, 2.0, 3.0]', proc.stderr


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, small_disk):
  # 1.9 M parameters, 7.8 MB: more than the 4 MiB disk holds, in either direction. Run as a
  # user does: in-process, pytest's log capture would hide Orbax's writer threads' logs.
  torch.save(SeedUNet(1, 1, base=16, depth=4).state_dict(), tmp_path / 'm.pth')
  torch_to_flax(str(tmp_path / 'm.pth'), str(tmp_path / 'flax'))
  for argv in (['torch-to-flax', str(tmp_path / 'm.pth'), str(small_disk / 'out')],
               ['flax-to-torch', str(tmp_path / 'flax'), str(small_disk / 'back.pth')],
               ['flax-to-torch', str(tmp_path / 'flax'), str(small_disk / 'back.safetensors')]):
    proc = subprocess.run([sys.executable, '-m', 'unet_jax.convert', *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f'error: {argv[2]}: cannot write (No space left on device); nothing was written; free '
        'space or choose another destination'), proc.stderr[-3000:]
    assert os.listdir(small_disk) == []


def test_converted_weights_are_float32_numpy_free_jax_arrays(tmp_path):
  ref = small_seed()
  torch.save(ref.state_dict(), tmp_path / 'm.pth')
  torch_to_flax(str(tmp_path / 'm.pth'), str(tmp_path / 'flax'))
  _, variables = load_pretrained(str(tmp_path / 'flax'))
  assert set(variables) == {'params', 'batch_stats'}
  assert all(isinstance(x, jax.Array) and x.dtype == np.float32
             for x in jax.tree.leaves(variables))

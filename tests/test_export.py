"""`python -m unet_jax.export`: one file that JAX alone runs, computing what the PyTorch network
it came from computes, at any batch size; bad requests write nothing."""

import json
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import max_rel_err, move_off_init, nchw
from test_train import _env
from torch_reference import SeedUNet

from unet_jax import load_pretrained
from unet_jax.convert import torch_to_flax
from unet_jax.export import main

# Runs where unet_jax is not installed: plain JAX, the artifact and the images.
SERVE = """
import os, sys, jax, numpy as np
for artifact in sys.argv[1].split(','):
  exp = jax.export.deserialize(open(artifact, 'rb').read())
  for path in sys.argv[2:]:
    out = f'{path}.{os.path.basename(artifact)}.npy'
    np.save(out, np.asarray(exp.call(np.load(path))))
assert not {'unet_jax', 'flax'} & set(sys.modules), 'the artifact needs no unet_jax'
"""


@pytest.fixture
def converted(tmp_path):
  ref = move_off_init(SeedUNet(1, 2, base=4, depth=2), 1, 2, hw=(16, 16)).eval()
  state = ref.state_dict()
  state['mask_values'] = [0, 200]
  torch.save(state, tmp_path / 'm.pth')
  return ref, torch_to_flax(str(tmp_path / 'm.pth'), str(tmp_path / 'ckpt'))


def test_the_exported_file_computes_what_torch_computes(tmp_path, converted, capsys):
  ref, ckpt = converted
  (tmp_path / 'out').mkdir()
  # For this machine (cpu) and for cpu,cuda (whose wide convolutions are XLA's own).
  for name, platforms in (('model', []), ('both', ['--platforms', 'cpu,cuda'])):
    out = tmp_path / 'out' / f'{name}.jax'
    assert main([ckpt, str(out), '--size', '20', *platforms]) == 0
    assert capsys.readouterr().out.startswith(f'wrote {out} (')
    about = json.loads((tmp_path / 'out' / f'{name}.json').read_text())
    assert about['size'] == 20 and about['num_classes'] == 2 and about['mask_values'] == [0, 200]
    assert about['platforms'] == (platforms[1] if platforms else 'cpu').split(',')
  assert sorted(os.listdir(tmp_path / 'out')) == ['both.jax', 'both.json', 'model.jax',
                                                  'model.json']
  umask = os.umask(0o022)
  os.umask(umask)
  for name in ('model.jax', 'model.json'):  # as open() makes them, not mkstemp's 0600
    assert stat.S_IMODE(os.stat(tmp_path / 'out' / name).st_mode) == 0o666 & ~umask
  # Any batch size, in a process that imports only JAX.
  rng = np.random.default_rng(0)
  images = [rng.random((n, 20, 20, 1), np.float32) for n in (1, 3)]
  paths = []
  for i, x in enumerate(images):
    paths.append(str(tmp_path / f'x{i}.npy'))
    np.save(paths[-1], x)
  artifacts = [str(tmp_path / 'out' / f'{name}.jax') for name in ('model', 'both')]
  proc = subprocess.run([sys.executable, '-c', SERVE, ','.join(artifacts), *paths],
                        env=_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for x, path in zip(images, paths, strict=True):
    with torch.no_grad():
      want = ref(nchw(x)).permute(0, 2, 3, 1).numpy()
    for name in ('model', 'both'):
      got = np.load(f'{path}.{name}.jax.npy')
      assert got.shape == want.shape and max_rel_err(got, want) <= 1e-4, name


def test_an_ensemble_exports_the_log_of_torchs_mean_probabilities(tmp_path, capsys):
  refs, paths = [], []
  for k, (base, depth) in enumerate(((4, 2), (8, 1), (4, 1))):
    ref = move_off_init(SeedUNet(1, 3, base=base, depth=depth), 1, 3, hw=(16, 16), seed=k)
    torch.save(ref.state_dict(), tmp_path / f'm{k}.pth')
    refs.append(ref.eval())
    paths.append(torch_to_flax(str(tmp_path / f'm{k}.pth'), str(tmp_path / f'ckpt{k}')))
  out = tmp_path / 'ensemble.jax'
  assert main([*paths, str(out), '--size', '16x20']) == 0, capsys.readouterr().err
  about = json.loads((tmp_path / 'ensemble.json').read_text())
  assert [m['checkpoint'] for m in about['ensemble']] == paths
  assert [m['model']['base_features'] for m in about['ensemble']] == [4, 8, 4]
  x = np.random.default_rng(3).random((2, 16, 20, 1), np.float32)
  got = np.asarray(jax.export.deserialize(out.read_bytes()).call(x))
  with torch.no_grad():
    mean = torch.stack([torch.softmax(r(nchw(x)), 1) for r in refs]).mean(0)
  want = mean.permute(0, 2, 3, 1).numpy()
  # softmax of its output is the members' mean probabilities (its output, their log)
  np.testing.assert_allclose(jax.nn.softmax(got, -1), want, atol=1e-6)
  assert max_rel_err(got, np.log(want)) <= 1e-4
  # Members of other classes are refused, and nothing is written.
  other = move_off_init(SeedUNet(1, 2, base=4, depth=1), 1, 2, hw=(16, 16))
  torch.save(other.state_dict(), tmp_path / 'two.pth')
  two = torch_to_flax(str(tmp_path / 'two.pth'), str(tmp_path / 'two'))
  assert main([paths[0], two, str(tmp_path / 'mixed.jax'), '--size', '16']) == 2
  assert capsys.readouterr().err == (f'error: {paths[0]} and {two} cannot be averaged: '
                                     f'{paths[0]} has num_classes=3, {two} num_classes=2; '
                                     'ensemble checkpoints trained for the same images and '
                                     'classes\n')
  assert not (tmp_path / 'mixed.jax').exists()


def test_size_as_height_x_width(tmp_path, converted, capsys):
  _, ckpt = converted
  assert main([ckpt, str(tmp_path / 'm.jax'), '--size', '12x20']) == 0
  assert '(N, 12, 20, 1) float32 images -> logits' in capsys.readouterr().out
  about = json.loads((tmp_path / 'm.json').read_text())
  assert (about['size'], about['height'], about['width']) == ([12, 20], 12, 20)
  assert 'resample' not in about  # (a converted checkpoint records no training)
  model, variables = load_pretrained(ckpt)
  x = np.random.default_rng(2).random((2, 12, 20, 1), np.float32)
  exported = jax.export.deserialize((tmp_path / 'm.jax').read_bytes())
  np.testing.assert_allclose(exported.call(x), model.apply(variables, x, train=False),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('args,message', [
    ([], "a converted checkpoint records no image size; give one with --size"),
    (['--size', '2'], "--size 2 is below the model's minimum 4 (2**depth, depth=2)"),
    (['--size', '16', '--platforms', 'cpu,gpu'], '--platforms cpu,gpu: choose among cpu, cuda, '
     'rocm, tpu'),
])
def test_bad_requests_write_nothing(tmp_path, converted, capsys, args, message):
  _, ckpt = converted
  (tmp_path / 'out').mkdir()
  assert main([ckpt, str(tmp_path / 'out' / 'model.jax'), *args]) == 2
  assert message in capsys.readouterr().err.strip().splitlines()[-1]
  assert os.listdir(tmp_path / 'out') == []


def test_an_existing_file_is_kept_unless_overwrite(tmp_path, converted, capsys):
  _, ckpt = converted
  (tmp_path / 'model.json').write_text('mine')
  assert main([ckpt, str(tmp_path / 'model.jax'), '--size', '16']) == 2
  assert capsys.readouterr().err.strip() == (
      f'error: {tmp_path}/model.json: exists; pass --overwrite to replace it')
  assert (tmp_path / 'model.json').read_text() == 'mine'
  assert not (tmp_path / 'model.jax').exists()
  assert main([ckpt, str(tmp_path / 'model.jax'), '--size', '16', '--overwrite']) == 0
  assert json.loads((tmp_path / 'model.json').read_text())['size'] == 16

"""The README's code is what a newcomer copies first: its Door 2 block runs as written."""

import os
import re

import jax
import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def _first_python_block(section: str) -> str:
  text = open(README).read()
  start = text.index(f'\n## {section}')
  return re.search(r'```python\n(.*?)```', text[start:], re.S).group(1)


def test_door_2_block_trains_one_step_and_predicts():
  scope = {}
  exec(compile(_first_python_block('Door 2'), 'README.md (Door 2)', 'exec'), scope)
  assert np.isfinite(float(scope['loss']))
  assert scope['logits'].shape == (2, 128, 128, 1)
  # The step moved every weight and every running statistic it was given.
  for name, new in (('params', scope['params']), ('batch_stats', scope['batch_stats'])):
    old = scope['variables'][name]
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
      assert not np.array_equal(np.asarray(a), np.asarray(b)), name

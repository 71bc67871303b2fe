"""constraints.txt against pyproject.toml: every dependency pinned, each pin allowed."""

import pathlib
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
  pins = {}
  for line in (ROOT / 'constraints.txt').read_text().splitlines():
    line = line.split('#')[0].strip()
    if line:
      name, _, version = line.partition('==')
      assert version, f'constraints.txt: {line!r} is not NAME==VERSION'
      pins[canonicalize_name(name)] = version
  return pins


def _requirements() -> list[Requirement]:
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  extras = [r for group in project['optional-dependencies'].values() for r in group]
  return [Requirement(r) for r in project['dependencies'] + extras]


def test_every_dependency_is_pinned_at_a_version_pyproject_allows():
  pins = _pins()
  for req in _requirements():
    name = canonicalize_name(req.name)
    assert name in pins, f'{req.name} is in pyproject.toml but not pinned in constraints.txt'
    assert req.specifier.contains(pins[name], prereleases=True), (
        f'constraints.txt pins {req.name}=={pins[name]}, which pyproject.toml\'s {req} refuses')


def test_pins_are_plain_releases():
  # A local label (torch's +cpu) would refuse the same release from PyPI on other platforms.
  for name, version in _pins().items():
    assert not Version(version).local, f'{name}=={version}: drop the +{Version(version).local}'

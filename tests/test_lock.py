"""requirements/dev.txt, the lock `pip install -e ".[dev]"` installs, against pyproject.toml and this environment."""
import importlib.metadata as md
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines if line}


def test_the_lock_pins_every_declared_dependency_within_its_range():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["optional-dependencies"]["dev"] == {"file": ["requirements/dev.txt"]}
    lock = _pins(ROOT / "requirements" / "dev.txt")
    declared = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    declared += _pins(ROOT / "requirements" / "dev.in").values()
    for req in declared:
        pinned = lock.get(canonicalize_name(req.name))
        assert pinned is not None, f"{req.name} is a dependency but requirements/dev.txt does not pin it: run requirements/lock.py"
        (spec,) = pinned.specifier
        assert spec.operator == "==" and req.specifier.contains(spec.version, prereleases=True), (req, pinned)


def test_this_environment_is_the_lock():
    """What the figures of this checkout are measured with: every package of the lock that applies here, at its
    version (a mismatch: `pip install -e ".[dev]"` again, or regenerate the lock and commit it)."""
    wrong = []
    for name, pinned in _pins(ROOT / "requirements" / "dev.txt").items():
        if pinned.marker is not None and not pinned.marker.evaluate():
            continue
        (spec,) = pinned.specifier
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            installed = None
        if installed is None or not spec.contains(installed):
            wrong.append(f"{name}: locked {spec.version}, installed {installed}")
    assert not wrong, wrong

"""What the chargeproto wheel carries: the license, one version, its declared
dependencies only, the typing marker and ``python -m chargeproto``."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import chargeproto

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "chargeproto"
SOURCE = PROJECT / "src" / "chargeproto"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """Built the way a release is: sdist first, then the wheel from the sdist."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv builds the wheel")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [uv, "build", "--package", "chargeproto", "-o", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("chargeproto-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile) -> str:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return wheel.read(name).decode()


def test_wheel_carries_the_license(wheel: zipfile.ZipFile) -> None:
    (license_file,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(license_file) == (ROOT / "LICENSE").read_bytes()
    text = wheel.read(license_file).decode()
    assert text.startswith("MIT License") and "2026 the chargeplatform contributors" in text
    assert "License-Expression: MIT" in _metadata(wheel)


def test_wheel_version_is_the_package_version(wheel: zipfile.ZipFile) -> None:
    assert f"\nVersion: {chargeproto.__version__}\n" in _metadata(wheel)
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    assert "version" not in config["project"]
    assert config["project"]["dynamic"] == ["version"]


def test_wheel_has_urls_readme_typing_marker_and_main(wheel: zipfile.ZipFile) -> None:
    metadata = _metadata(wheel)
    urls = [line for line in metadata.splitlines() if line.startswith("Project-URL:")]
    assert urls and all("https://github.com/chargeplatform/chargeplatform" in u for u in urls)
    assert "Description-Content-Type: text/markdown" in metadata
    names = wheel.namelist()
    assert "chargeproto/py.typed" in names
    assert "chargeproto/__main__.py" in names


def _imported_roots() -> set[str]:
    roots: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots


def test_every_declared_dependency_is_imported_and_nothing_else(wheel: zipfile.ZipFile) -> None:
    """No dependency without a use (bitstring was declared and never imported)."""
    requires = [
        line.split(":", 1)[1].strip()
        for line in _metadata(wheel).splitlines()
        if line.startswith("Requires-Dist:")
    ]
    declared = {r.split(">")[0].split("<")[0].split("=")[0].strip() for r in requires}
    assert declared == {"construct", "click"}
    third_party = _imported_roots() - set(sys.stdlib_module_names) - {"chargeproto"}
    assert third_party == declared

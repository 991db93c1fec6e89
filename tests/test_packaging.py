"""What the wheels carry: the license, and for chargegw none of the tools."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("distribution", ["chargeproto", "chargegw", "chargesim"])
def test_each_distribution_carries_the_repository_license(distribution: str) -> None:
    """hatch takes license files from the distribution's folder: those are copies of the
    repository's LICENSE and must stay identical to it."""
    copy = ROOT / distribution / "LICENSE"
    assert copy.read_bytes() == (ROOT / "LICENSE").read_bytes()


@pytest.fixture(scope="module")
def chargegw_wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv builds the wheel")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [uv, "build", "--package", "chargegw", "--wheel", "-o", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("chargegw-*.whl")
    return zipfile.ZipFile(wheel)


def test_chargegw_wheel_has_license_and_docs_assets(chargegw_wheel: zipfile.ZipFile) -> None:
    names = chargegw_wheel.namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert any(n.startswith("chargegw/store/migrations/") for n in names)
    # /docs and /redoc are served from the package, not from a CDN
    for asset in (
        "swagger-ui/swagger-ui-bundle.js",
        "swagger-ui/swagger-ui.css",
        "swagger-ui/favicon-32x32.png",
        "swagger-ui/LICENSE",
        "redoc/redoc.standalone.js",
        "redoc/LICENSE",
    ):
        assert f"chargegw/api/static/{asset}" in names, asset
    # the console: its templates, modules, styles and catalogue, nothing from a CDN
    for asset in (
        "templates/base.html",
        "static/js/core.js",
        "static/js/pages/device.js",
        "static/console.css",
        "catalogue/common.yaml",
    ):
        assert f"chargegw/console/{asset}" in names, asset


def test_chargegw_wheel_carries_no_tools(chargegw_wheel: zipfile.ZipFile) -> None:
    """The simulator, load harness and chaos run are the chargesim distribution."""
    names = chargegw_wheel.namelist()
    assert not [
        n
        for n in names
        if n.startswith(("chargegw/sim/", "chargegw/loadtest/", "chargegw/chaos/", "chargesim/"))
    ]
    metadata = chargegw_wheel.read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    ).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "httpx" in r]
    assert [r for r in requires if r.startswith("Requires-Dist: chargesim") and "extra ==" in r]

"""The node is installed without the lab: importing every dicom_node module loads no lab, torch,
scikit-image or matplotlib module, and the node's own distribution holds no lab code."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("dicom_node_lab", "torch", "skimage", "matplotlib")


def test_importing_every_node_module_loads_nothing_of_the_lab() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import dicom_node\n"
        "names = [m.name for m in pkgutil.walk_packages(dicom_node.__path__, 'dicom_node.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(len(names))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "docs")
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) >= 30, "walked fewer modules than the node has"


@pytest.mark.slow
def test_the_node_wheel_holds_no_lab_code(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: building in place would leave build/ and egg-info in the checkout
    shutil.copytree(REPO / "dicom_node", src / "dicom_node", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    [wheel] = tmp_path.glob("dicom_node-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("dicom_node/pipeline/") for n in names)
    assert not [n for n in names if n.startswith(("dicom_node_lab/", "lab/", "tests/", "tools/"))]
    requires = next(n for n in names if n.endswith("METADATA"))
    meta = zipfile.ZipFile(wheel).read(requires).decode()
    needs = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert needs and not [n for n in needs if "torch" in n], "torch is a requirement of the lab, not of the node"

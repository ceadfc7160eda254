"""The built wheel carries what an installed (not editable) package needs at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_the_cpp_source_and_py_typed(tmp_path: Path) -> None:
    # Built from a copy, so the checkout gets no build/ or egg-info folder.
    src = tmp_path / "src_tree"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
    )
    (wheel,) = out.glob("microadam-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "src" / "microadam"
    expected = {f"microadam/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")}
    # impl="cpp" compiles this source on first use; py.typed tells type checkers the hints are API.
    expected |= {f"microadam/kernels/csrc/{p.name}" for p in (package / "kernels" / "csrc").glob("*.cpp")}
    expected.add("microadam/py.typed")
    assert len(expected) > 30
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"

"""The built wheel carries the npe2 manifest (the root napari.yaml is reached through a symlink in the package)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_manifest(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("napari_pupick-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        manifest = zf.read("napari_pupick/napari.yaml").decode()
        names = zf.namelist()
    assert manifest == (ROOT / "napari.yaml").read_text()
    assert "napari-pupick.get_micrograph_reader" in manifest and "widgets:" in manifest
    assert any(n.endswith("licenses/LICENSE") for n in names)

"""Shared fixtures: the real data folder, small synthetic micrographs on disk, napari plugin discovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Real micrographs with ground truth: crops of the shared CC0 EMPIAR sets kept in tests/data/real (made by
#: tests/data/make_real_crops.py), so the suite needs nothing beside the clone. Override with $PUPICK_DATA.
DATA_DIR = Path(os.environ.get("PUPICK_DATA", Path(__file__).resolve().parent / "data" / "real"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data folder (tests/data/real, or $PUPICK_DATA)."""
    if not DATA_DIR.is_dir():  # fail, not skip: the real-data tests are part of what the suite proves
        pytest.fail(f"real data folder {DATA_DIR} not found (tests/data/real, or set PUPICK_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def small_synthetic():
    """Three small non-square synthetic micrographs (128 x 160, float32) with particles and labels."""
    from napari_pupick.synthetic import make_synthetic

    return make_synthetic(n_micrographs=3, shape=(128, 160), n_particles=8, radius=6.0, snr=0.5, seed=1,
                          pixel_size=1.5)


@pytest.fixture(scope="session")
def synthetic_dir(small_synthetic, tmp_path_factory) -> dict:
    """``small_synthetic`` written to a session folder: ``{"micrographs": [paths], "particles": star,
    "labels": star, "folder": micrograph folder, "set": SyntheticSet}``. Treat as read-only."""
    root = tmp_path_factory.mktemp("synthetic")
    files = small_synthetic.write(root)
    return {**files, "folder": root / "micrographs", "set": small_synthetic}


@pytest.fixture
def pupick_plugin():
    """npe2's plugin manager with napari-pupick discovered (for napari.components.ViewerModel, no Qt)."""
    from npe2 import PluginManager

    pm = PluginManager.instance()
    if "napari-pupick" not in pm:
        pm.discover()
    assert "napari-pupick" in pm
    return pm


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random conv3 (width 0.25) checkpoint for batch and RELION tests (picks meaningless but deterministic):
    binning 2, affine normalization, particle radius 8 px, threshold far below every logit, margin 0, no TTA."""
    import torch

    from napari_pupick.models import build_model
    from napari_pupick.training import Checkpoint

    torch.manual_seed(0)
    net = build_model("conv3", width=0.25)
    ckpt = Checkpoint(model=net.name, model_params=dict(net.hparams),
                      state_dict={k: v.detach().clone() for k, v in net.state_dict().items()},
                      preprocess={"downsample": 2, "method": "affine", "gmm": None},
                      config={"particle_radius": 4.0}, metrics={"threshold": -1e3, "margin": 0.0, "tta": False})
    return ckpt.save(tmp_path_factory.mktemp("tiny_model") / "tiny.pt")

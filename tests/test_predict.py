"""Scoring: device choice, tiled == untiled, alignment of the full-resolution map, TTA."""


import numpy as np
import pytest
import torch

from napari_pupick.errors import MicrographError, PupickError
from napari_pupick.models import build_model
from napari_pupick.predict import (
    score_micrograph,
    score_micrographs,
    select_device,
    set_threads,
    upsample_logits,
)

torch.set_num_threads(1)


def _tiny(name="conv3", stride=4, seed=0):
    torch.manual_seed(seed)
    net = build_model(name, stride=stride, width=0.25)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _image(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in {"cpu", "cuda", "mps"}
    assert select_device(None) == select_device("auto")
    if not torch.cuda.is_available():
        with pytest.raises(PupickError, match="CUDA is not available"):
            select_device("cuda")
    else:
        assert select_device("cuda").type == "cuda"
    with pytest.raises(PupickError, match="unknown device|unsupported device"):
        select_device("tpu")


def test_set_threads_returns_previous():
    before = torch.get_num_threads()
    assert set_threads(1) == before
    assert torch.get_num_threads() == 1
    assert set_threads(None) == 1
    set_threads(before)


@pytest.mark.parametrize("name,stride", [("conv3", 4), ("conv3", 2), ("resnet8", 4)])
def test_tiled_equals_untiled(name, stride):
    net = _tiny(name, stride)
    image = _image((131, 97))
    full = score_micrograph(net, image, tile=10_000)
    assert full.shape == image.shape and full.dtype == np.float32
    for tile in (8, 36, 64):
        tiled = score_micrograph(net, image, tile=tile)
        np.testing.assert_allclose(tiled, full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(score_micrograph(net, image), full, atol=1e-5, rtol=0)  # automatic tiling


def test_untiled_matches_the_network_and_alignment():
    """The full-resolution map reads the coarse grid at p / stride: cell (i, j) lands on pixel (s*i, s*j)."""
    net = _tiny("conv3", 4)
    image = _image((61, 50))
    with torch.no_grad():
        coarse = net(torch.from_numpy(image)[None, None])[0, 0].numpy()
    full = score_micrograph(net, image)
    np.testing.assert_allclose(full[::4, ::4], coarse, atol=1e-5)
    # Between cell centres: bicubic (Keys, a = -0.75) weights of the four neighbours along a row at t = 1/2:
    # (-3/32, 19/32, 19/32, -3/32).
    row = coarse[:, 5]
    expected = (-3 * row[2] + 19 * row[3] + 19 * row[4] - 3 * row[5]) / 32
    np.testing.assert_allclose(full[14, 20], expected, atol=1e-5)
    # Past the last cell centre (pixel 60 is cell 15; columns 48 and 49 follow column 48 = cell 12).
    np.testing.assert_allclose(full[:, 49], full[:, 48], atol=1e-6)


def test_upsample_puts_the_peak_on_the_cell_centre():
    for stride in (2, 4):
        coarse = torch.zeros(9, 7)
        coarse[5, 3] = 1.0
        full = upsample_logits(coarse, (9 * stride - 1, 7 * stride), stride).numpy()
        assert full.shape == (9 * stride - 1, 7 * stride)
        assert np.unravel_index(np.argmax(full), full.shape) == (5 * stride, 3 * stride)
        assert full[5 * stride, 3 * stride] == pytest.approx(1.0)
        assert full[5 * stride, 3 * stride + stride // 2] == pytest.approx(19 / 32)  # bicubic weight at t = 1/2
        linear = upsample_logits(coarse, (9 * stride - 1, 7 * stride), stride, mode="bilinear").numpy()
        assert linear[5 * stride, 3 * stride + stride // 2] == pytest.approx(0.5)
    # A peak between two cells: bicubic puts the maximum between their centres, nearer the stronger one.
    coarse = torch.zeros(5, 9)
    coarse[2, 4], coarse[2, 5] = 1.0, 0.8
    full = upsample_logits(coarse, (17, 33), 4).numpy()
    y, x = np.unravel_index(np.argmax(full), full.shape)
    assert y == 8 and 16 < x < 18


def test_tta_is_the_mean_over_rotations():
    net = _tiny("conv3", 4)
    image = _image((64, 48))
    manual = np.mean([np.rot90(score_micrograph(net, np.rot90(image, k)), -k) for k in range(4)], axis=0)
    np.testing.assert_allclose(score_micrograph(net, image, tta=True), manual, atol=1e-5)


def test_model_mode_and_weights_untouched():
    net = _tiny("resnet8", 4).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    score_micrograph(net, _image((40, 40)))
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_score_micrographs_generator():
    net = _tiny()
    images = [_image((40, 52), seed=s) for s in range(3)]
    results = list(score_micrographs(net, iter(images), tile=16))
    assert len(results) == 3
    for image, res in zip(images, results):
        np.testing.assert_allclose(res, score_micrograph(net, image), atol=1e-5)


def test_bad_images():
    net = _tiny()
    with pytest.raises(MicrographError, match="2-D"):
        score_micrograph(net, np.zeros((2, 30, 30), np.float32))

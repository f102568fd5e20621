"""Models: output grid alignment, translation equivariance, receptive field, decoder, errors."""

import pytest
import torch

from napari_pupick.errors import ModelError
from napari_pupick.models import MODELS, Decoder, build_model

torch.set_num_threads(1)

CASES = [("conv3", 4), ("conv3", 2), ("conv3-stem2", 4), ("resnet8", 4), ("resnet8", 2)]


def _tiny(name, stride, seed=0):
    torch.manual_seed(seed)
    extra = {"stem_stride": 2} if name == "conv3-stem2" else {}
    net = build_model(name.split("-")[0], stride=stride, width=0.25, **extra)
    # Non-trivial batch-norm statistics, so that eval mode is not an identity.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("name,stride", CASES)
def test_attributes_and_output_shape(name, stride):
    net = _tiny(name, stride)
    assert net.name == name.split("-")[0] and net.stride == stride
    assert {"stride": stride, "width": 0.25, "dropout": 0.0}.items() <= net.hparams.items()
    assert net.receptive_field % 2 == 1
    for H, W in [(37, 50), (64, 64), (65, 31)]:
        with torch.no_grad():
            out = net(torch.randn(2, 1, H, W))
        h, w = -(-H // stride), -(-W // stride)
        assert out.shape == (2, 1, h, w)
        assert net.output_shape((H, W)) == (h, w)
        assert net.encode(torch.randn(1, 1, H, W)).shape == (1, net.features, h, w)


def test_receptive_fields_and_strides_documented():
    # conv 7x7 / 2, pool 3 / 2, conv 5x5, conv 5x5: 7 + 2 * 2 + 4 * 4 + 4 * 4 = 43
    assert build_model("conv3", stem_stride=2).receptive_field == 43
    # the default, the paper's layout: conv 7x7, pool 3 / 2, conv 5x5, pool 3 / 2, conv 5x5:
    # 7 + 2 + 4 * 2 + 2 * 2 + 4 * 4 = 37
    assert build_model("conv3").hparams["stem_stride"] == 1
    assert build_model("conv3").receptive_field == 37
    assert build_model("conv3", stride=2, stem_stride=1).receptive_field == 25
    assert build_model("resnet8").receptive_field == 75
    assert build_model("conv3").stride == 4 and build_model("resnet8").stride == 4


@pytest.mark.parametrize("name,stride", CASES)
def test_translation_equivariance(name, stride):
    """Shifting the input by ``stride`` pixels shifts the output by one cell (away from the borders)."""
    net = _tiny(name, stride)
    rf2 = net.receptive_field // 2
    n = 2 * rf2 + 8 * stride + 1
    x = torch.randn(1, 1, n + stride, n + stride)
    with torch.no_grad():
        a = net(x)[0, 0]  # cell j at pixel stride * j of x
        b = net(x[..., stride:, stride:])[0, 0]  # cell j at pixel stride * (j + 1) of x
    # Interior cells of b whose receptive field stays inside both inputs.
    lo = -(-rf2 // stride)
    hi = (n - 1 - rf2) // stride
    assert hi > lo
    torch.testing.assert_close(b[lo : hi + 1, lo : hi + 1], a[lo + 1 : hi + 2, lo + 1 : hi + 2], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("name,stride", CASES)
def test_cell_centre_and_receptive_field(name, stride):
    """Output cell j depends on input pixels stride*j +- receptive_field // 2 exactly (so it sits on stride*j)."""
    net = _tiny(name, stride)
    rf2 = net.receptive_field // 2
    size = 2 * rf2 + 4 * stride + 1
    cell = (size // 2) // stride  # a central cell, its centre at pixel c
    c = stride * cell
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, size, size, generator=g)
    with torch.no_grad():
        base = net(x)[0, 0, cell, cell]

        def changed(dy, dx):
            for amp in (50.0, -50.0, 7.0, -7.0):
                y = x.clone()
                y[0, 0, c + dy, c + dx] += amp
                if abs(float(net(y)[0, 0, cell, cell] - base)) > 1e-6:
                    return True
            return False

        # Pixels on the edge of the window influence the cell; pixels just outside never do.
        for d in (rf2, -rf2):
            assert changed(0, d) and changed(d, 0)
        for d in (rf2 + 1, -rf2 - 1):
            assert not changed(0, d) and not changed(d, 0)
        # Noise everywhere outside the window leaves the cell unchanged.
        y = torch.randn(1, 1, size, size, generator=g) * 10
        y[0, 0, c - rf2 : c + rf2 + 1, c - rf2 : c + rf2 + 1] = x[0, 0, c - rf2 : c + rf2 + 1, c - rf2 : c + rf2 + 1]
        assert float(net(y)[0, 0, cell, cell]) == pytest.approx(float(base), abs=1e-5)


def test_decoder_reconstructs_input_shape():
    net = _tiny("conv3", 4)
    dec = Decoder(net.features, net.stride, width=8)
    x = torch.randn(2, 1, 37, 45)
    out = dec(net.encode(x), x.shape[-2:])
    assert out.shape == x.shape
    out.mean().backward()  # differentiable end to end
    assert all(p.grad is not None for p in dec.parameters())


def test_build_errors():
    with pytest.raises(ModelError, match="unknown model"):
        build_model("vgg")
    with pytest.raises(ModelError, match="bad hyperparameters"):
        build_model("conv3", depth=3)
    with pytest.raises(ModelError, match="stride"):
        build_model("conv3", stride=3)
    with pytest.raises(ModelError, match="stem_stride"):
        build_model("conv3", stride=1, stem_stride=2)
    assert set(MODELS) == {"conv3", "resnet8"}


def test_rebuild_from_hparams():
    net = _tiny("resnet8", 4)
    again = build_model(net.name, **net.hparams)
    again.load_state_dict(net.state_dict())
    again.eval()
    x = torch.randn(1, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x))

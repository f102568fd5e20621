"""Fully convolutional particle classifiers and the autoencoder's decoder.

Every model maps a normalized micrograph (or a tile of one) to a map of logits (log-likelihood ratios that a
particle is centred there) on a coarse grid: ``forward(x)`` of shape (B, 1, H, W) returns (B, 1, h, w) with
``h = ceil(H / stride)`` and ``w = ceil(W / stride)``.

Alignment (exact, tested): output cell ``(i, j)`` is centred on input pixel ``(stride * i, stride * j)`` (row,
column). Every convolution and pooling layer has an odd kernel ``k``, padding ``dilation * (k - 1) / 2`` and
stride 1 or 2, so the centre of output cell ``j`` of each layer sits on input cell ``stride_layer * j``; the
strides multiply. Away from the borders the network is translation equivariant: shifting the input by ``stride``
pixels shifts the output by one cell. An output cell depends only on input pixels within ``receptive_field // 2``
of its centre (the zero padding of inner layers included), which is what exact tiled scoring relies on.

Architectures (``build_model(name, **hparams)``):

- ``"conv3"`` (default): the paper's three layers: conv 7x7 (32 filters), conv 5x5 (64), conv 5x5 (128), each
  followed by batch-norm and PReLU, then a linear 1x1 convolution to one logit. Downsampling to the output
  stride (default 4): the first convolution has stride ``stem_stride`` (default 1) and 3x3 max-pools of stride 2
  follow the first layers until the total stride is reached. Default layout: conv7, pool/2, conv5, pool/2, conv5
  (receptive field 37 pixels); ``stem_stride=2`` gives conv7/2, pool/2, conv5, conv5 (receptive field 43).

  Measured choice (1 CPU thread; training steps of 8 tiles of 129 x 129): ``stem_stride=2`` scores a 1024 x 1024
  image in 0.56 s and trains at 0.20 s per step (44,000 output cells per second), the default needs 0.87 s and
  0.38 s (23,000 cells/s), because its second layer runs on a grid twice as fine. It is the more accurate
  (100 labels, AP against every held-out particle, one seed): ribosome 0.827 against 0.809, EMPIAR-10947 0.216 /
  0.230 against 0.181 / 0.208 (two seeds), apoferritin equal (0.939); so it is the default since the defaults
  issue. Output stride 2 would double the cost again; with bicubic upsampling of the logits (``predict``)
  stride 4 localizes particles well enough.
- ``"resnet8"``: a stem (conv 5x5), then three residual blocks of two 3x3 convolutions (the last two dilated),
  then the 1x1 head: 8 weight layers, receptive field 75 pixels with ``stride=4``. Slower (1.85 s per 1024 x 1024
  image, 12,000 cells/s in training) and, from a random start with few labels, not more accurate in our runs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from napari_pupick.errors import ModelError

__all__ = ["MODELS", "Decoder", "PickerNet", "build_model"]


def _conv_bn_act(cin: int, cout: int, k: int, dilation: int = 1) -> list:
    return [nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.PReLU(cout)]


def _pool() -> nn.Module:
    # Odd kernel, padding 1, stride 2: output cell j is centred on input cell 2j, size ceil(n / 2).
    return nn.MaxPool2d(3, stride=2, padding=1)


class PickerNet(nn.Module):
    """A fully convolutional classifier: an encoder of conv layers, then a linear 1x1 head giving one logit.

    Attributes
    ----------
    name : str
        Architecture name (a key of ``MODELS``).
    hparams : dict
        The keyword arguments it was built with (plain types), so ``build_model(name, **hparams)`` rebuilds it.
    receptive_field : int
        Side, in input pixels, of the square region one output cell sees (odd).
    stride : int
        Step of the output grid in input pixels: output cell ``(i, j)`` sits on input pixel
        ``(stride * i, stride * j)``.
    features : int
        Channels of ``encode(x)`` (the decoder's input).
    """

    def __init__(self, name: str, hparams: dict, encoder: nn.Module, features: int, receptive_field: int,
                 stride: int, dropout: float = 0.0):
        super().__init__()
        self.name = name
        self.hparams = dict(hparams)
        self.encoder = encoder
        self.features = int(features)
        self.receptive_field = int(receptive_field)
        self.stride = int(stride)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(features, 1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features of shape (B, features, ceil(H / stride), ceil(W / stride)) for input (B, 1, H, W)."""
        return self.encoder(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, h, w) from features (B, features, h, w)."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, 1, ceil(H / stride), ceil(W / stride)) for input (B, 1, H, W)."""
        return self.classify(self.encode(x))

    def output_shape(self, shape: tuple) -> tuple:
        """The (h, w) of the logit grid for an input of shape (H, W)."""
        return tuple(-(-int(n) // self.stride) for n in shape)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, receptive_field={self.receptive_field}, stride={self.stride}"


def _check_stride(stride: int) -> int:
    stride = int(stride)
    if stride not in (1, 2, 4):
        raise ModelError(f"model stride must be 1, 2 or 4, not {stride}")
    return stride


def _width(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def _conv3(stride: int = 4, width: float = 1.0, dropout: float = 0.0, stem_stride: int | None = None) -> PickerNet:
    """The paper's three-layer network (see the module docstring); ``stem_stride`` defaults to 1."""
    stride = _check_stride(stride)
    stem_stride = 1 if stem_stride is None else int(stem_stride)
    if stem_stride not in (1, 2) or stem_stride > stride:
        raise ModelError(f"stem_stride must be 1 or 2 and at most the stride ({stride}), not {stem_stride}")
    n_pool = int(math.log2(stride // stem_stride))
    w1, w2, w3 = _width(32, width), _width(64, width), _width(128, width)
    layers = [nn.Conv2d(1, w1, 7, stride=stem_stride, padding=3, bias=False), nn.BatchNorm2d(w1), nn.PReLU(w1)]
    rf, jump = 7, stem_stride
    for i, (cin, cout) in enumerate([(w1, w2), (w2, w3)]):
        if i < n_pool:
            layers.append(_pool())
            rf, jump = rf + 2 * jump, jump * 2
        layers += _conv_bn_act(cin, cout, 5)
        rf += 4 * jump
    hparams = dict(stride=stride, width=float(width), dropout=float(dropout), stem_stride=stem_stride)
    return PickerNet("conv3", hparams, nn.Sequential(*layers), w3, rf, stride, dropout)


class _Residual(nn.Module):
    """Two 3x3 conv + batch-norm layers with a shortcut (1x1 projection when the width changes), then PReLU."""

    def __init__(self, cin: int, cout: int, dilation: tuple = (1, 1)):
        super().__init__()
        d1, d2 = dilation
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=d1, dilation=d1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, padding=d2, dilation=d2, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)))
        self.act = nn.PReLU(cout)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


def _resnet8(stride: int = 4, width: float = 1.0, dropout: float = 0.0) -> PickerNet:
    """A ResNet-8-like network (see the module docstring)."""
    stride = _check_stride(stride)
    n_pool = int(math.log2(stride))
    w1, w2, w3 = _width(32, width), _width(64, width), _width(128, width)
    layers = _conv_bn_act(1, w1, 5)
    rf, jump = 5, 1
    blocks = [(w1, w2, (1, 1)), (w2, w3, (1, 2)), (w3, w3, (2, 2))]
    for i, (cin, cout, dil) in enumerate(blocks):
        if i < n_pool:
            layers.append(_pool())
            rf, jump = rf + 2 * jump, jump * 2
        layers.append(_Residual(cin, cout, dil))
        rf += 2 * (dil[0] + dil[1]) * jump
    hparams = dict(stride=stride, width=float(width), dropout=float(dropout))
    return PickerNet("resnet8", hparams, nn.Sequential(*layers), w3, rf, stride, dropout)


MODELS = {"conv3": _conv3, "resnet8": _resnet8}


def build_model(name: str = "conv3", **hparams) -> PickerNet:
    """Build a freshly initialised classifier.

    Parameters
    ----------
    name : str
        ``"conv3"`` or ``"resnet8"``.
    **hparams
        ``stride`` (1, 2 or 4; default 4), ``width`` (channel multiplier; default 1.0, tests use e.g. 0.25),
        ``dropout`` (on the features before the head; default 0); conv3 also ``stem_stride`` (1 or 2, default
        1: the stride of its first convolution).

    Raises
    ------
    ModelError
        For an unknown name or hyperparameter.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}: choose one of {sorted(MODELS)}")
    try:
        return MODELS[name](**hparams)
    except TypeError as exc:
        raise ModelError(f"bad hyperparameters {hparams!r} for model {name!r}: {exc}") from None


class Decoder(nn.Module):
    """Reconstructs the input from encoder features (the autoencoder regularizer).

    ``log2(stride)`` transposed convolutions (kernel 4, stride 2) each double the grid, then a 3x3 convolution
    gives one channel; the result is cropped to the input's (H, W). Output pixel ``p`` of a doubling comes from
    input cells ``p // 2`` and its neighbours, so the reconstruction stays aligned with the input to within half a
    pixel.

    Parameters
    ----------
    features : int
        Channels of the encoder output.
    stride : int
        The encoder's stride.
    width : int
        Channels of the hidden layers.
    """

    def __init__(self, features: int, stride: int, width: int = 32):
        super().__init__()
        stride = _check_stride(stride)
        layers: list = []
        cin = features
        for _ in range(int(math.log2(stride))):
            layers += [nn.ConvTranspose2d(cin, width, 4, stride=2, padding=1), nn.PReLU(width)]
            cin = width
        layers.append(nn.Conv2d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, shape: tuple) -> torch.Tensor:
        """Reconstruction of shape (B, 1, H, W) from features (B, C, h, w); ``shape`` is (H, W)."""
        out = self.net(features)
        return out[..., : shape[0], : shape[1]]

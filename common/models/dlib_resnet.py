"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) as a PyTorch module.

The network of dlib's ``dnn_face_recognition_ex.cpp``: 29 convolutions, 5.6 M parameters, trained by dlib on about
3 M faces of 7,485 people with a pairwise metric loss (public domain / CC0). With dlib's weights loaded
(``load_state_dict(common.dlib_weights.dlib_resnet_state_dict(path))``) it gives dlib's ``compute_face_descriptor``
for the same 150x150 chip to within float32 rounding; two faces are the same person when their descriptors are
closer than 0.6 (Euclidean). The affine layers are dlib's batch norms with the statistics folded in, so the model
has no BatchNorm and trains under DP-SGD as it is (Opacus validates it; :class:`ChannelAffine` has an exact
per-sample gradient rule). No I/O here: the weights come in through :mod:`common.dlib_weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.models.embedding import DPConv2d

DLIB_PIXEL_MEAN = (122.782, 117.001, 104.298)  # R, G, B: dlib's input_rgb_image_sized
DLIB_PIXEL_SCALE = 1.0 / 256.0  # dlib feeds (pixel - mean) / 256
DLIB_THRESHOLD = 0.6  # same person when the Euclidean distance of two descriptors is below this
# (channels, down) for each residual block, from the input side (dlib's levels 4, 3, 2, 1, 0).
BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2 + ((256, True),)
)
TRAINABLE_PARTS = ("all", "last-stage", "projection")


class ChannelAffine(nn.Module):
    """Per-channel scale and shift, ``x * weight + bias`` (dlib's ``affine`` layer: a batch norm folded in).

    Parameters
    ----------
    channels : int
        Number of channels C. ``weight`` (the scale) starts at 1 and ``bias`` (the shift) at 0, both [C].

    Notes
    -----
    Input [B, C, ...] (any number of trailing dimensions), output of the same shape. Each sample is scaled on its
    own, so per-sample gradients are exact (:func:`_channel_affine_grad_sample`).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))  # [C] scale
        self.bias = nn.Parameter(torch.zeros(channels))  # [C] shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)  # [B, C, ...]


@register_grad_sampler(ChannelAffine)
def _channel_affine_grad_sample(
    layer: ChannelAffine, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a :class:`ChannelAffine`, [B, C] each, for Opacus."""
    x = activations[0].to(backprops.dtype)  # [B, C, ...]
    dims = tuple(range(2, x.ndim))
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = (x * backprops).sum(dim=dims)  # [B, C]
    if layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=dims)  # [B, C]
    return ret


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` after zero-padding both at the end of each dimension to the larger size (dlib's ``add_prev``).

    dlib adds a down-block's output and its shortcut this way where their channels (32 vs 64) or sides (3 vs 4 and
    1 vs 2 in the 256-wide blocks) differ: the smaller tensor is placed at the top-left, with zeros around it.
    """
    size = [max(s, t) for s, t in zip(a.shape[1:], b.shape[1:])]  # [C, H, W]

    def pad(x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[1:]
        return F.pad(x, (0, size[2] - w, 0, size[1] - h, 0, size[0] - c))  # [B, C', H', W']

    return pad(a) + pad(b)


class Stem(nn.Module):
    """Conv 7x7 stride 2 (no padding) -> affine -> ReLU -> max-pool 3x3 stride 2 (no padding).

    [B, 3, 150, 150] -> [B, 32, 72, 72] -> [B, 32, 35, 35].
    """

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv = DPConv2d(3, channels, 7, stride=2, padding=0)
        self.affine = ChannelAffine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.affine(self.conv(x)))  # [B, 32, 72, 72]
        return F.max_pool2d(x, 3, stride=2)  # [B, 32, 35, 35]


class ResidualBlock(nn.Module):
    """dlib's ``ares``: conv 3x3 -> affine -> ReLU -> conv 3x3 -> affine, plus the input, then ReLU.

    Parameters
    ----------
    channels_in, channels : int
        Input and output channels. A plain block keeps the shape ([B, C, H, W] -> [B, C, H, W]).
    stride : int, default 1
        Stride of the first convolution; 3x3 convolutions at stride 1 pad by 1, strided ones not at all (dlib's
        rule). Only :class:`DownBlock` uses 2.
    """

    def __init__(self, channels_in: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = DPConv2d(channels_in, channels, 3, stride=stride, padding=1 if stride == 1 else 0)
        self.affine1 = ChannelAffine(channels)
        self.conv2 = DPConv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = ChannelAffine(channels)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x  # [B, C, H, W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.affine1(self.conv1(x)))  # [B, C, H', W']
        y = self.affine2(self.conv2(y))  # [B, C, H', W']
        return F.relu(add_zero_padded(y, self.shortcut(x)))  # [B, C, max(H', H''), max(W', W'')]


class DownBlock(ResidualBlock):
    """dlib's ``ares_down``: a :class:`ResidualBlock` whose first convolution has stride 2 (no padding) and whose
    shortcut is a 2x2 stride-2 average pool; the two are added zero-padded (:func:`add_zero_padded`).

    [B, C_in, H, W] -> [B, C, max((H - 3) // 2 + 1, H // 2), ...]: 35 -> 17, 17 -> 8, 8 -> 4 (3 vs 4), 4 -> 2 (1 vs 2).
    """

    def __init__(self, channels_in: int, channels: int) -> None:
        super().__init__(channels_in, channels, stride=2)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2, stride=2)  # [B, C_in, H // 2, W // 2]


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: a 150x150 RGB face chip to a 128-d descriptor.

    Layout for a 150x150 chip (every convolution is followed by a :class:`ChannelAffine`)::

        input     (pixel - mean) / 256                          [B, 3, 150, 150]
        stem      conv 7x7/2 (32), ReLU, max-pool 3x3/2         [B, 32, 35, 35]
        blocks    0-2   ResidualBlock 32                        [B, 32, 35, 35]
                  3-6   DownBlock 64, ResidualBlock 64 x 3      [B, 64, 17, 17]
                  7-9   DownBlock 128, ResidualBlock 128 x 2    [B, 128, 8, 8]
                  10-12 DownBlock 256, ResidualBlock 256 x 2    [B, 256, 4, 4]
                  13    DownBlock 256                           [B, 256, 2, 2]
        pool      global average                                [B, 256]
        projection Linear 256 -> 128, no bias                   [B, 128]

    Parameters
    ----------
    normalize : bool, default False
        Return unit-length descriptors. dlib's own descriptors are not normalised (their norms are about 1.3 to 1.6)
        and its 0.6 threshold applies to them as they are: keep False to reproduce dlib.
    signed_input : bool, default False
        Take pixels in [-1, 1] (facefl's input convention for embedding networks) instead of 0..255.

    Notes
    -----
    Input: float [B, 3, H, W], RGB in 0..255 (dlib's chips are uint8 cast to float), 150x150 for dlib's weights;
    the means (``pixel_mean``, a buffer in the state_dict) and the 1/256 scale are applied inside. Output: float
    [B, 128]. 5,614,592 parameters. Train and eval mode compute the same thing (no batch statistics, no dropout).
    """

    def __init__(self, *, normalize: bool = False, signed_input: bool = False) -> None:
        super().__init__()
        self.normalize = normalize
        self.signed_input = signed_input
        self.register_buffer("pixel_mean", torch.tensor(DLIB_PIXEL_MEAN))  # [3]
        self.register_buffer("pixel_scale", torch.tensor(DLIB_PIXEL_SCALE), persistent=False)
        self.stem = Stem(BLOCKS[0][0])
        blocks: list[nn.Module] = []
        channels_in = BLOCKS[0][0]
        for channels, down in BLOCKS:
            blocks.append(DownBlock(channels_in, channels) if down else ResidualBlock(channels_in, channels))
            channels_in = channels
        self.blocks = nn.Sequential(*blocks)
        self.projection = nn.Linear(channels_in, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _project(self.projection, self.trunk(x, len(self.blocks)), self.normalize)  # [B, 128]

    def trunk(self, x: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Input through the stem and the first ``num_blocks`` blocks; pooled to [B, 256] when that is all 14."""
        assert x.ndim == 4 and x.shape[1] == 3, f"DlibResNet expects float RGB [B, 3, H, W], got {tuple(x.shape)}"
        if self.signed_input:
            x = (x + 1.0) * 127.5  # [-1, 1] -> 0..255
        x = (x - self.pixel_mean.view(1, 3, 1, 1)) * self.pixel_scale  # [B, 3, 150, 150]
        x = self.blocks[:num_blocks](self.stem(x))  # [B, C, h, w]
        return x.mean(dim=(2, 3)) if num_blocks == len(self.blocks) else x  # [B, 256] once every block ran

    def split_frozen(self) -> tuple[nn.Module, nn.Module] | None:
        """(frozen trunk, trainable head), two modules sharing this model's layers, when the stem and one or more
        leading blocks have no trainable parameter (see :func:`set_trainable`); None when the stem trains.

        The trunk's output for a face never changes while the head trains, so a site can compute it once and train
        the head alone: ``head(trunk(x)) == self(x)``."""
        def frozen(module: nn.Module) -> bool:
            return not any(p.requires_grad for p in module.parameters())

        if not frozen(self.stem):
            return None
        first = 0
        while first < len(self.blocks) and frozen(self.blocks[first]):
            first += 1
        return DlibTrunk(self, first), DlibHead(self, first)


class DlibTrunk(nn.Module):
    """The frozen beginning of a :class:`DlibResNet`: chip -> features (see :meth:`DlibResNet.split_frozen`). Its
    state_dict holds exactly the frozen layers (the stem and the first ``num_blocks`` blocks)."""

    def __init__(self, net: DlibResNet, num_blocks: int) -> None:
        super().__init__()
        self.stem, self.blocks = net.stem, net.blocks[:num_blocks]
        self.num_blocks = num_blocks
        self._net = (net,)  # not a submodule: the trunk owns only the frozen layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net[0].trunk(x, self.num_blocks)


class DlibHead(nn.Module):
    """The trainable end of a :class:`DlibResNet`: the blocks from ``first_block`` on (the same layer objects) and
    the projection; what Opacus wraps when a site trains on precomputed trunk features."""

    def __init__(self, net: DlibResNet, first_block: int) -> None:
        super().__init__()
        self.blocks = net.blocks[first_block:]  # [B, C, h, w] -> [B, 256, 2, 2]
        self.projection = net.projection
        self.normalize = net.normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if len(self.blocks):
            features = self.blocks(features).mean(dim=(2, 3))  # [B, 256]
        return _project(self.projection, features, self.normalize)  # [B, 128]


def _project(projection: nn.Linear, pooled: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = projection(pooled)  # [B, 256] -> [B, 128]
    return F.normalize(x, dim=1) if normalize else x


def set_trainable(model: DlibResNet, part: str) -> list[str]:
    """Freeze all but ``part`` of ``model``; return the names of the parameters left trainable.

    Parameters
    ----------
    model : DlibResNet
        The model; ``requires_grad`` of each parameter is set in place.
    part : {"all", "last-stage", "projection"}
        "projection": the final Linear only (32,768 parameters). "last-stage": the four 256-wide blocks 10-13
        (dlib's levels 1 and 0, at 4x4 and 2x2) plus the projection (4,462,592 parameters). "all": everything
        (5,614,592).

    Returns
    -------
    list[str]
        Trainable parameter names, in ``named_parameters`` order.
    """
    if part not in TRAINABLE_PARTS:
        raise ValueError(f"Unknown trainable part {part!r}; choose one of {', '.join(TRAINABLE_PARTS)}.")
    last_stage = tuple(f"blocks.{i}." for i, block in enumerate(model.blocks) if block.channels == BLOCKS[-1][0])
    prefixes = {"all": ("",), "last-stage": last_stage + ("projection.",), "projection": ("projection.",)}[part]
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            trainable.append(name)
    return trainable

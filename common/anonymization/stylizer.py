"""A fast feed-forward stylizer: Johnson et al. (2016) "Perceptual losses for real-time style transfer".

One :class:`StyleNet` renders every image in one style (it is trained per style, see
``common.anonymization.style_train``). The layout follows pytorch/examples ``fast_neural_style``::

    9x9 conv, stride 1        3      -> base        [B, base,   H,   W]
    3x3 conv, stride 2        base   -> 2 base      [B, 2 base, H/2, W/2]
    3x3 conv, stride 2        2 base -> 4 base      [B, 4 base, H/4, W/4]
    num_residual residual blocks (two 3x3 convs)    [B, 4 base, H/4, W/4]
    nearest x2 upsample + 3x3 conv  4 base -> 2 base
    nearest x2 upsample + 3x3 conv  2 base -> base
    9x9 conv, stride 1        base   -> 3, sigmoid  [B, 3,      H,   W]

Every convolution pads reflectively and is followed by ``InstanceNorm2d(affine=True)`` and a ReLU
(except the last one and the second convolution of each residual block). Upsampling is nearest
neighbour followed by a convolution rather than a transposed convolution, which avoids checkerboard
artifacts (Odena et al. 2016). The output goes through a sigmoid, so it lies in [0, 1] and keeps a
gradient everywhere while training.

The network only uses standard operators (convolution, instance norm, ReLU, nearest upsampling,
reflection padding, sigmoid): it can be scripted with ``torch.jit.script``, traced, and exported
with ``torch.onnx.export(..., dynamo=False)``. No I/O happens here: weights are loaded and saved
elsewhere; :func:`stylenet_config` and :func:`build_stylenet` let a cache rebuild the architecture
from saved metadata.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Base channel count of each width; the three resolutions have base, 2 * base and 4 * base channels.
STYLENET_WIDTHS: dict[str, int] = {"full": 32, "half": 16}

# Residual blocks used when ``num_residual`` is None. At 128x128 on this project's 2-core CPU machines
# (inference_mode, batch 8) "half" with 5 blocks renders about 30 faces/s even on ONE thread, so it keeps
# Johnson et al.'s 5 blocks: the cost sits in the full-resolution 9x9 convolutions, not in the blocks at
# 1/4 resolution (3 blocks were only ~10% faster). "full" with 5 blocks: about 13 faces/s on one thread.
DEFAULT_NUM_RESIDUAL: dict[str, int] = {"full": 5, "half": 5}

# H and W are reflect-padded up to a multiple of this inside forward (two stride-2 convolutions).
_MULTIPLE = 4
MIN_SIDE = 16


class ConvLayer(nn.Sequential):
    """Reflection pad -> Conv2d (``stride`` 1 or 2) -> InstanceNorm2d(affine) -> ReLU (``norm``/``act`` optional)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int = 1, *, norm: bool = True, act: bool = True
    ) -> None:
        layers: list[nn.Module] = [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(c_in, c_out, kernel, stride=stride)]
        if norm:
            layers.append(nn.InstanceNorm2d(c_out, affine=True))
        if act:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class UpsampleConvLayer(nn.Sequential):
    """Nearest-neighbour x2 upsampling -> :class:`ConvLayer` (in place of a transposed convolution)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3) -> None:
        super().__init__(nn.Upsample(scale_factor=2.0, mode="nearest"), *ConvLayer(c_in, c_out, kernel))


class ResidualBlock(nn.Module):
    """``x + IN(conv(ReLU(IN(conv(x)))))`` with 3x3 reflection-padded convolutions (Johnson et al.)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3)
        self.conv2 = ConvLayer(channels, channels, 3, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class StyleNet(nn.Module):
    """The image transformation network of Johnson et al. (2016) for one style.

    Parameters
    ----------
    width : {"full", "half"}, default "full"
        Channel width (see :data:`STYLENET_WIDTHS`): "full" has 32/64/128 channels (about 1.7 M
        parameters with 5 residual blocks), "half" 16/32/64 and about a quarter of the compute.
    num_residual : int or None, default None
        Residual blocks at 1/4 resolution; None takes :data:`DEFAULT_NUM_RESIDUAL` for the width
        (5 for both, as in Johnson et al.; "half" still renders more than 25 faces/s of 128x128 on
        2 CPU cores).

    Notes
    -----
    ``forward`` maps float ``[B, 3, H, W]`` in [0, 1] to float ``[B, 3, H, W]`` in [0, 1] for any
    H, W >= 16. Sides that are not multiples of 4 are reflect-padded on the bottom/right inside
    ``forward`` and the output is cropped back.
    """

    def __init__(self, width: str = "full", num_residual: int | None = None) -> None:
        super().__init__()
        if width not in STYLENET_WIDTHS:
            raise ValueError(f"Unknown StyleNet width {width!r}; choose one of {', '.join(STYLENET_WIDTHS)}.")
        if num_residual is None:
            num_residual = DEFAULT_NUM_RESIDUAL[width]
        if isinstance(num_residual, bool) or not isinstance(num_residual, int) or num_residual < 0:
            raise ValueError(f"num_residual should be a non-negative integer, got {num_residual!r}.")
        self.width = width
        self.base = STYLENET_WIDTHS[width]
        self.num_residual = num_residual
        self.multiple = _MULTIPLE  # attributes rather than globals, so that TorchScript sees them
        self.min_side = MIN_SIDE
        b = self.base
        self.encoder = nn.Sequential(
            ConvLayer(3, b, 9),  # [B, b, H, W]
            ConvLayer(b, 2 * b, 3, stride=2),  # [B, 2b, H/2, W/2]
            ConvLayer(2 * b, 4 * b, 3, stride=2),  # [B, 4b, H/4, W/4]
        )
        self.residual = nn.Sequential(*[ResidualBlock(4 * b) for _ in range(num_residual)])
        self.decoder = nn.Sequential(
            UpsampleConvLayer(4 * b, 2 * b),  # [B, 2b, H/2, W/2]
            UpsampleConvLayer(2 * b, b),  # [B, b, H, W]
            ConvLayer(b, 3, 9, norm=False, act=False),  # [B, 3, H, W], logits
        )
        # The generic face the anonymizer paints over a person's inner face before stylizing it
        # (common.anonymization.face_prior), float [3, S, S] in [0, 1]; empty when the stylizer has none. It is not
        # used by forward: it travels with the weights so that one file holds the whole anonymizer.
        self.register_buffer("face_prior", torch.zeros(0))

    def set_face_prior(self, prior: torch.Tensor | None) -> None:
        """Set (or clear, with None) :attr:`face_prior`: float ``[3, S, S]`` in [0, 1]."""
        if prior is None:
            self.face_prior = torch.zeros(0)
            return
        if prior.ndim != 3 or prior.shape[0] != 3 or prior.shape[1] != prior.shape[2]:
            raise ValueError(f"A face prior is a float [3, S, S] image, got shape {tuple(prior.shape)}.")
        self.face_prior = prior.detach().float().clamp(0.0, 1.0).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        assert x.dim() == 4 and x.shape[1] == 3, f"StyleNet expects float [B, 3, H, W], got {x.shape}"
        assert h >= self.min_side and w >= self.min_side, f"StyleNet needs H, W >= {self.min_side}, got {h}x{w}"
        m = self.multiple
        pad_h = (m - h % m) % m
        pad_w = (m - w % m) % m
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [0, pad_w, 0, pad_h], mode="reflect")  # [B, 3, H', W'], multiples of 4
        y = self.decoder(self.residual(self.encoder(x)))  # [B, 3, H', W']
        y = torch.sigmoid(y)
        return y[:, :, :h, :w]  # [B, 3, H, W]


def stylenet_config(model: StyleNet) -> dict:
    """The architecture of ``model`` as ``{"width": str, "num_residual": int}`` (JSON-serialisable)."""
    if not isinstance(model, StyleNet):
        raise TypeError(f"stylenet_config expects a StyleNet, got {type(model).__name__}.")
    return {"width": model.width, "num_residual": int(model.num_residual)}


def build_stylenet(config: dict) -> StyleNet:
    """Build an untrained :class:`StyleNet` from :func:`stylenet_config`'s output (then load its state_dict).

    Raises
    ------
    ValueError
        If ``config`` lacks ``"width"`` or holds keys other than ``"width"`` and ``"num_residual"``.
    """
    if not isinstance(config, dict) or "width" not in config:
        raise ValueError(f"A StyleNet config is a dict with a 'width' (and optionally 'num_residual'), got {config!r}.")
    unknown = set(config) - {"width", "num_residual"}
    if unknown:
        raise ValueError(
            f"Unknown StyleNet config keys {sorted(unknown)}; the saved metadata may come from a newer version."
        )
    return StyleNet(width=config["width"], num_residual=config.get("num_residual"))


def load_stylenet_state(model: StyleNet, state: dict) -> StyleNet:
    """Load a state_dict into ``model``, sizing :attr:`StyleNet.face_prior` to the saved one (absent in files
    written before face priors existed: the stylizer then has none)."""
    state = dict(state)
    prior = state.pop("face_prior", None)
    model.set_face_prior(prior if prior is not None and prior.numel() else None)
    model.load_state_dict({**state, "face_prior": model.face_prior})
    return model

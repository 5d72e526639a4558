"""Feature networks and losses for neural style transfer (Gatys et al. 2016; Johnson et al. 2016).

Two feature networks share one interface: ``forward(x)`` takes images ``[B, 3, H, W]`` in [0, 1] and
returns a list of feature maps, one per tap; ``style_layers`` lists the taps whose Gram matrices
describe the style and ``content_layer`` is the tap compared for content.

- :class:`RandomFeatureNet`: a fixed random-weight multi-scale CNN, drawn from a seed, with nothing to
  download. Random filters followed by ReLU still give Gram statistics that capture texture
  (Ustyuzhaninov et al. 2016, "Texture synthesis using shallow convolutional networks with random
  filters"; He et al. 2016, "A powerful generative model using random weights for the deep image
  representation"). It is the default here, since no ImageNet VGG can be downloaded.
- :class:`VGG19Features`: torchvision's VGG-19 convolutional trunk with weights read from a local file
  whose SHA-256 is checked (the classic choice when such a file is available).

No I/O happens here except through :func:`common.weights.load_state_dict_checked`.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from common.weights import load_state_dict_checked

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Indices in torchvision's ``vgg19().features`` of the ReLU outputs we tap.
_VGG19_TAPS = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu4_2": 22, "relu5_1": 29}
_VGG19_ORDER = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")
_GRAM_EPS = 1e-12  # keeps the relative style error finite for an all-black style image


class _FrozenFeatures(nn.Module):
    """A fixed feature network: ImageNet-standardised input, no gradients for its weights, always in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> None:
        """Call at the end of ``__init__``, once every weight exists."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> _FrozenFeatures:
        """The network is fixed; it stays in eval mode whatever ``mode`` is."""
        return super().train(False)


class RandomFeatureNet(_FrozenFeatures):
    """A fixed multi-scale CNN with random weights: ``len(widths)`` stages of 3x3 conv + ReLU.

    Stage ``i`` works at ``1 / 2**i`` of the input resolution (a 2x2 average pool precedes every stage
    but the first; average rather than max pooling, as Gatys et al. recommend for synthesis, keeps the
    gradient spread over all pixels). Weights are Kaiming-normal for ReLU (std ``sqrt(2 / fan_in)``)
    so that activations keep a similar scale through the stages, and biases are zero; they are drawn
    from a local ``torch.Generator`` seeded with ``seed``, so the global RNG is untouched and two
    instances built with the same arguments are identical. Nothing is learned: every parameter has
    ``requires_grad=False`` and the module is always in eval mode.

    Parameters
    ----------
    widths : tuple[int, ...], default (32, 64, 128, 256, 256)
        Output channels of each stage (at least two stages).
    seed : int, default 0
        Seed of the weights.
    content_layer : int, default 2
        Tap used for content (stage 2 is at 1/4 resolution: it keeps the layout of a face but not
        its fine texture).

    Notes
    -----
    The input is standardised with the ImageNet mean and standard deviation before the first
    convolution, so that the random filters see zero-centred colours. ``forward`` returns every
    stage's output ``[B, widths[i], H / 2**i, W / 2**i]``; ``style_layers`` is all of them.
    """

    def __init__(
        self, widths: tuple[int, ...] = (32, 64, 128, 256, 256), *, seed: int = 0, content_layer: int = 2
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"RandomFeatureNet needs at least two stages of positive width, got widths={widths}.")
        if not 0 <= content_layer < len(widths):
            raise ValueError(f"content_layer must index one of the {len(widths)} stages, got {content_layer}.")
        self.widths = widths
        self.seed = int(seed)
        self.style_layers: tuple[int, ...] = tuple(range(len(widths)))
        self.content_layer = int(content_layer)

        generator = torch.Generator().manual_seed(self.seed)
        self.convs = nn.ModuleList()
        c_in = 3
        for c_out in widths:
            # Built on the meta device so that nn.Conv2d's own initialisation does not draw from the global RNG.
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect", device="meta").to_empty(device="cpu")
            std = math.sqrt(2.0 / (c_in * 9))  # Kaiming normal for ReLU, fan_in
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
                conv.bias.zero_()
            self.convs.append(conv)
            c_in = c_out
        self.freeze()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.mean) / self.std  # [B, 3, H, W]
        features: list[torch.Tensor] = []
        for i, conv in enumerate(self.convs):
            if i > 0:
                h = F.avg_pool2d(h, 2)  # [B, C, H / 2**i, W / 2**i]
            h = F.relu(conv(h))
            features.append(h)
        return features


class VGG19Features(_FrozenFeatures):
    """torchvision's VGG-19 trunk up to relu5_1, with ImageNet weights read from a local, hashed file.

    Parameters
    ----------
    path : str or PathLike
        A ``torch.save``-d state_dict of ``torchvision.models.vgg19`` (keys ``features.N.weight`` /
        ``features.N.bias``; the ``classifier.*`` keys, if present, are ignored), e.g.
        torchvision's ``vgg19-dcbb9e9d.pth`` copied by hand.
    sha256 : str
        Its expected SHA-256 (checked by :func:`common.weights.load_state_dict_checked`).

    Notes
    -----
    ``forward`` normalises ``[B, 3, H, W]`` images in [0, 1] with the ImageNet mean and std and
    returns ``[relu1_1, relu2_1, relu3_1, relu4_1, relu4_2, relu5_1]``; ``style_layers`` are
    relu1_1 ... relu5_1 (indices 0, 1, 2, 3, 5) and ``content_layer`` is relu4_2 (index 4), as in
    Gatys et al. The weights are frozen and the module is always in eval mode.
    """

    def __init__(self, path: str | os.PathLike[str], sha256: str) -> None:
        super().__init__()
        from torchvision.models import vgg19  # heavy import, only when asked for

        with torch.device("meta"):  # no random initialisation (and no global RNG use): the file fills every weight
            trunk = vgg19(weights=None).features[: _VGG19_TAPS["relu5_1"] + 1]
        trunk = trunk.to_empty(device="cpu")
        for module in trunk:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # the tapped maps must not be overwritten
        state = load_state_dict_checked(path, sha256)
        prefix = "features."
        features_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not features_state:
            raise ValueError(
                f"Weights file {path} has no 'features.*' keys; pass a state_dict of torchvision.models.vgg19 "
                f"(its keys look like 'features.0.weight'), got keys such as {sorted(state)[:3]}."
            )
        wanted = trunk.state_dict()
        missing = [k for k in wanted if k not in features_state]
        if missing:
            raise ValueError(f"Weights file {path} does not fit VGG-19's trunk: missing keys {missing[:5]}.")
        shapes = [k for k in wanted if features_state[k].shape != wanted[k].shape]
        if shapes:
            raise ValueError(f"Weights file {path} does not fit VGG-19's trunk: wrong shapes for {shapes[:5]}.")
        trunk.load_state_dict({k: features_state[k] for k in wanted})
        self.trunk = trunk
        self.taps = tuple(_VGG19_TAPS[name] for name in _VGG19_ORDER)
        self.style_layers: tuple[int, ...] = (0, 1, 2, 3, 5)
        self.content_layer = 4
        self.freeze()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.mean) / self.std  # [B, 3, H, W]
        features: list[torch.Tensor] = []
        for i, layer in enumerate(self.trunk):
            h = layer(h)
            if i in self.taps:
                features.append(h)
        return features


def build_feature_net(vgg19_path: str | None = None, vgg19_sha256: str | None = None) -> nn.Module:
    """The feature network for style losses: :class:`VGG19Features` from a local file, else :class:`RandomFeatureNet`.

    Raises
    ------
    ValueError
        If only one of ``vgg19_path`` and ``vgg19_sha256`` is given.
    """
    if vgg19_path is None:
        if vgg19_sha256 is not None:
            raise ValueError("vgg19_sha256 was given without vgg19_path; pass the path of the VGG-19 weights file too.")
        return RandomFeatureNet()
    if vgg19_sha256 is None:
        raise ValueError(
            f"vgg19_path {vgg19_path} was given without vgg19_sha256; pass the file's SHA-256 "
            "(common.weights.sha256_file computes it) so that the weights are checked before they are used."
        )
    return VGG19Features(vgg19_path, vgg19_sha256)


# -- losses -------------------------------------------------------------------------------------------------


def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """Gram matrices ``F F^T / (C H W)`` of feature maps ``f`` [B, C, H, W] -> [B, C, C]."""
    b, c, h, w = f.shape
    flat = f.reshape(b, c, h * w)  # [B, C, HW]
    return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)  # [B, C, C]


def style_grams(feature_net: nn.Module, style: torch.Tensor) -> list[torch.Tensor]:
    """Gram matrices ``[1, C, C]`` of ``style`` ``[1, 3, h, w]`` (in [0, 1]) at ``feature_net.style_layers``."""
    with torch.no_grad():
        features = feature_net(style)
        return [gram_matrix(features[i]) for i in feature_net.style_layers]


def style_loss(
    features: list[torch.Tensor], target_grams: list[torch.Tensor], style_layers: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean over style layers of the relative squared error of the Gram matrices.

    For each layer ``l``: ``mean (G_l - T_l)^2 / (mean T_l^2 + eps)``, with ``G_l`` the Gram matrices of
    ``features`` and ``T_l`` the target. Dividing by the target's own mean square gives every layer the
    same say whatever its width and activation scale (plain Gram MSE is dominated by the narrow, shallow
    layers: with :class:`RandomFeatureNet` the first layer's term is ~600 times the last one's), and makes
    the loss's scale independent of the feature network, so one ``style_weight`` fits both of them. A
    stylisation with no trace of the style scores about 0.3 to 1; a perfect match scores 0.

    Parameters
    ----------
    features : list[torch.Tensor]
        A feature network's output for the images being stylised, ``[B, C_l, H_l, W_l]`` per tap.
    target_grams : list[torch.Tensor]
        One ``[1, C, C]`` (or ``[B, C, C]``) Gram matrix per style layer, as from :func:`style_grams`.
    style_layers : tuple[int, ...] or None
        Indices into ``features`` matching ``target_grams``; None means the first ``len(target_grams)``
        maps when ``len(features) == len(target_grams)``.

    Returns
    -------
    torch.Tensor
        A scalar, averaged over the batch.
    """
    if style_layers is None:
        if len(features) != len(target_grams):
            raise ValueError(
                f"{len(features)} feature maps but {len(target_grams)} target Grams; pass style_layers "
                "(the feature network's .style_layers) to say which maps the Grams belong to."
            )
        style_layers = tuple(range(len(features)))
    if len(style_layers) != len(target_grams):
        raise ValueError(f"style_layers has {len(style_layers)} entries but there are {len(target_grams)} target Grams.")
    loss = features[0].new_zeros(())
    for i, target in zip(style_layers, target_grams):
        gram = gram_matrix(features[i])  # [B, C, C]
        scale = target.detach().pow(2).mean() + _GRAM_EPS
        loss = loss + F.mse_loss(gram, target.expand_as(gram)) / scale
    return loss / len(target_grams)


def content_loss(features: list[torch.Tensor], target_features: list[torch.Tensor], layer: int) -> torch.Tensor:
    """Mean squared difference of the feature maps at index ``layer`` (a scalar)."""
    return F.mse_loss(features[layer], target_features[layer])


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertically and horizontally adjacent pixels of ``x`` [B, C, H, W]."""
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    return dh.pow(2).mean() + dw.pow(2).mean()


def prepare_style_image(style: torch.Tensor, shorter_side: int) -> torch.Tensor:
    """A style image as float ``[1, 3, h, w]`` in [0, 1], resized so its shorter side is ``shorter_side``.

    Parameters
    ----------
    style : torch.Tensor
        uint8 ``[3, H, W]`` (0..255) or float ``[3, H, W]`` in [0, 1]; RGB.
    shorter_side : int
        Target length of the shorter side in pixels (the aspect ratio is kept).
    """
    if style.ndim != 3 or style.shape[0] != 3:
        raise ValueError(f"The style image should be an RGB tensor [3, H, W], got shape {tuple(style.shape)}.")
    if style.dtype == torch.uint8:
        img = style.float() / 255.0
    elif style.is_floating_point():
        img = style.float()
        if float(img.min()) < 0.0 or float(img.max()) > 1.0:
            raise ValueError("A float style image should be in [0, 1]; pass uint8 for 0..255 values.")
    else:
        raise ValueError(f"The style image should be uint8 or float, got {style.dtype}.")
    h, w = img.shape[-2:]
    scale = shorter_side / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0)
    return img.clamp(0.0, 1.0)  # [1, 3, h, w]

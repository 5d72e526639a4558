"""Face-embedding networks: a compact GroupNorm CNN for CPU federations, and facenet-pytorch's
InceptionResnetV1 for GPU deployments.

No I/O here except through :func:`common.weights.load_state_dict_checked`, and nothing downloads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from common.weights import load_state_dict_checked

EMBEDDING_MODELS = ("compact", "inception")


class DPConv2d(nn.Conv2d):
    """``nn.Conv2d`` (ungrouped, undilated) with a faster Opacus per-sample gradient.

    The module computes exactly what ``nn.Conv2d`` computes, and its state_dict is the same; only
    the grad sampler registered for it differs (see :func:`_conv_grad_sample`).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("DPConv2d supports groups=1, dilation=1 and integer zero padding only; use nn.Conv2d otherwise.")


@register_grad_sampler(DPConv2d)
def _conv_grad_sample(
    layer: DPConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample weight gradients of a convolution, [B, O, C, kh, kw], for Opacus.

    Opacus' own Conv2d sampler unfolds the input (im2col, kh*kw copies of every activation) and
    then multiplies. At stride 1 this one avoids the unfolding: in a zero-padded, channels-last
    copy of the input flattened over (row, column), the input patch offset (i, j) seen by every
    output pixel is one contiguous strided window, if the output gradient is laid out on the
    padded width (its extra columns zero). Each kernel offset is then one batched matrix product
    [B, O, L] @ [B, L, C] over a view, with no copy. Strided layers use F.unfold.
    """
    x = activations[0].to(backprops.dtype)  # [B, C, H, W]
    b, c, h, w = x.shape
    o, _, kh, kw = layer.weight.shape
    ph, pw = layer.padding
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))  # [B, O]
    if not layer.weight.requires_grad:
        return ret
    if layer.stride != (1, 1):
        cols = F.unfold(x, (kh, kw), padding=layer.padding, stride=layer.stride)  # [B, C*kh*kw, L]
        ret[layer.weight] = torch.bmm(backprops.flatten(2), cols.transpose(1, 2)).view(b, o, c, kh, kw)
        return ret
    ho, wo = backprops.shape[2:]
    hp, wp = h + 2 * ph, w + 2 * pw  # padded size; ho = hp - kh + 1, wo = wp - kw + 1
    padded = x.new_zeros(b, hp + 1, wp, c)  # one spare row so the last window stays in bounds
    padded[:, ph : ph + h, pw : pw + w] = x.permute(0, 2, 3, 1)
    flat = padded.view(b, (hp + 1) * wp, c)
    grad_out = backprops.new_zeros(b, o, ho, wp)
    grad_out[..., :wo] = backprops
    grad_out = grad_out.view(b, o, ho * wp)  # [B, O, L]
    out = x.new_empty(kh, kw, b, o, c)
    for i in range(kh):
        for j in range(kw):
            window = flat.as_strided((b, ho * wp, c), flat.stride(), flat.storage_offset() + (i * wp + j) * c)
            torch.bmm(grad_out, window, out=out[i, j])  # [B, O, C]
    ret[layer.weight] = out.permute(2, 3, 4, 0, 1)  # [B, O, C, kh, kw]
    return ret


class GlobalDepthwiseConv(nn.Module):
    """MobileFaceNet's global depthwise convolution: one learned [H, W] weighting per channel.

    ``forward(x) = (x * weight).sum((2, 3))`` for x [B, C, H, W] -> [B, C]. Equivalent to
    ``nn.Conv2d(C, C, (H, W), groups=C, bias=False)`` on an H x W input, with an exact, cheap per-sample
    gradient for Opacus (``x * backprop``) instead of Opacus' generic unfold path.
    """

    def __init__(self, channels: int, side: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, side, side))
        nn.init.kaiming_uniform_(self.weight.view(channels, 1, side, side), a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).sum(dim=(2, 3))  # [B, C]


@register_grad_sampler(GlobalDepthwiseConv)
def _gdc_grad_sample(layer: GlobalDepthwiseConv, activations: list[torch.Tensor], backprops: torch.Tensor):
    x = activations[0].to(backprops.dtype)  # [B, C, H, W]
    return {layer.weight: x * backprops[:, :, None, None]}  # [B, C, H, W]


def _num_groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels``."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class ConvLayer(nn.Sequential):
    """Conv2d (no bias) -> GroupNorm -> ReLU; ``act=False`` leaves the ReLU out.

    ``padding`` defaults to ``kernel // 2`` ("same" for odd kernels at stride 1).
    """

    def __init__(
        self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, *, padding: int | None = None, act: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            DPConv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2 if padding is None else padding, bias=False),
            nn.GroupNorm(_num_groups(c_out), c_out),
        ]
        if act:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 ConvLayers plus a shortcut (identity, or a strided 1x1 ConvLayer when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvLayer(c_in, c_out, 3, stride)
        self.conv2 = ConvLayer(c_out, c_out, 3, 1, act=False)
        self.shortcut = (
            nn.Identity() if stride == 1 and c_in == c_out else ConvLayer(c_in, c_out, 1, stride, act=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class CompactFaceNet(nn.Module):
    """A small residual GroupNorm CNN mapping face crops to unit-length embeddings.

    It is built only from layers Opacus has per-sample gradient samplers for (Conv2d, GroupNorm,
    Linear) plus parameter-free elementwise ops, so it passes
    ``opacus.validators.ModuleValidator.validate(model, strict=True)`` without any fix.

    Layout, for a 64x64 input (all convolutions are followed by GroupNorm)::

        stem    4x4 conv, stride 4 (a patch embedding)  3 -> stem_width   [B, 48, 16, 16]
        stage 0 blocks[0] residual blocks                -> widths[0]     [B, 64, 16, 16]
        stage i first block has stride 2                 -> widths[i]     [B, 128, 8, 8]
        global depthwise conv (GDC) + GroupNorm -> Linear -> L2 norm      [B, embedding_dim]

    Why this shape: under DP-SGD, Opacus adds to each step one per-sample weight-gradient
    computation per layer (about 1.7 times the cost of the ordinary weight gradient) plus several
    passes over ``batch * parameters`` floats (the per-sample gradients are stored, clipped and
    summed). Full-resolution layers are slow to unfold, and low-resolution layers with many
    channels hold most parameters for little compute. The patch stem skips the full-resolution
    layers, and the network stops at 1/8 of the input resolution: adding a 4x4 stage of 256
    channels (1.55 M parameters) made the DP step 3.3 times the plain one instead of 2.1 times.
    The convolutions are :class:`DPConv2d`, whose per-sample gradient avoids im2col copies.

    Parameters
    ----------
    embedding_dim : int, default 128
        Length D of the output embedding.
    stem_width : int, default 48
        Channels of the stride-4 patch stem.
    widths : tuple[int, ...], default (64, 128)
        Channels of each stage; every stage after the first halves the resolution.
    blocks : tuple[int, ...], default (2, 2)
        Residual blocks per stage.
    image_size : int, default 64
        Input side length. The head is a global depthwise convolution over the final feature map
        (MobileFaceNet's GDC): unlike global average pooling it keeps where on the face a feature is,
        which matters for faces (average pooling gave chance-level LFW verification after 4 epochs,
        GDC 63% ROC AUC after 3 and rising).

    Notes
    -----
    Input height and width must be divisible by ``4 * 2 ** (len(widths) - 1)`` (8 by default:
    64, 72, ..., 112 all work). Input: float [B, 3, H, W]; output: float [B, D], unit L2 norm.
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        *,
        stem_width: int = 48,
        widths: tuple[int, ...] = (64, 128),
        blocks: tuple[int, ...] = (2, 2),
        image_size: int = 64,
    ) -> None:
        super().__init__()
        if not widths or len(widths) != len(blocks) or min(blocks) < 1:
            raise ValueError(
                f"widths {widths} and blocks {blocks} must be non-empty, of equal length, with at least one block per stage."
            )
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim}.")
        self.embedding_dim = embedding_dim
        self.input_multiple = 4 * 2 ** (len(widths) - 1)
        self.stem = ConvLayer(3, stem_width, kernel=4, stride=4, padding=0)
        stages: list[nn.Module] = []
        c_in = stem_width
        for i, (width, n_blocks) in enumerate(zip(widths, blocks)):
            layers = [ResidualBlock(c_in, width, stride=1 if i == 0 else 2)]
            layers += [ResidualBlock(width, width) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.image_size = image_size
        side = image_size // self.input_multiple
        if image_size % self.input_multiple:
            raise ValueError(f"image_size must be divisible by {self.input_multiple}; got {image_size}.")
        self.gdc = GlobalDepthwiseConv(c_in, side)  # [B, C]
        self.gdc_norm = nn.GroupNorm(_num_groups(c_in), c_in)
        self.embed = nn.Linear(c_in, embedding_dim)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == 3, f"CompactFaceNet expects float [B, 3, H, W], got {tuple(x.shape)}"
        h, w = x.shape[-2:]
        assert h % self.input_multiple == 0 and w % self.input_multiple == 0, (
            f"CompactFaceNet with {len(self.stages)} stages needs H and W divisible by {self.input_multiple}, "
            f"got {h}x{w}; resize the faces (e.g. to 64, 96 or 112 pixels)."
        )
        assert (h, w) == (self.image_size, self.image_size), (
            f"This CompactFaceNet was built for {self.image_size}x{self.image_size} faces, got {h}x{w}."
        )
        x = self.stages(self.stem(x))  # [B, C, H / m, W / m]
        x = self.gdc_norm(self.gdc(x))  # [B, C]
        return F.normalize(self.embed(x), dim=1)  # [B, D]


def build_inception_resnet(
    embedding_dim: int = 512,
    *,
    dp: bool,
    weights_path: str | None = None,
    weights_sha256: str | None = None,
) -> nn.Module:
    """facenet-pytorch's InceptionResnetV1 (23.5 M parameters, meant for 160x160 faces on a GPU).

    The model is always built with ``pretrained=None`` (facenet-pytorch would otherwise download).
    Pretrained weights, for example facenet-pytorch's ``20180402-114759-vggface2.pt`` copied by
    hand, are loaded from ``weights_path`` after its SHA-256 is checked; ``logits.*`` keys (the
    classifier of the pretraining identities) are ignored.

    Parameters
    ----------
    embedding_dim : int, default 512
        Output length. Anything other than 512 replaces the last Linear and its norm layer, which
        then start from random values even when weights are loaded.
    dp : bool
        With ``True`` every BatchNorm is replaced by GroupNorm via
        ``opacus.validators.ModuleValidator.fix`` so the model can be trained with DP-SGD. The
        pretrained BatchNorm statistics and affine parameters are lost: the new GroupNorm layers
        start at weight 1, bias 0, and a pretrained model needs fine-tuning to recover.
    weights_path, weights_sha256 : str or None
        A local state_dict and its expected SHA-256; both or neither.

    Returns
    -------
    nn.Module
        Maps float [B, 3, H, W] (H, W >= 80; 160 is what it was trained at) to L2-normalised
        [B, embedding_dim] embeddings.
    """
    from facenet_pytorch import InceptionResnetV1  # heavy import, only when asked for

    if (weights_path is None) != (weights_sha256 is None):
        raise ValueError(
            "weights_path and weights_sha256 must be given together: the hash is what makes sure the file is the one intended."
        )
    model = InceptionResnetV1(pretrained=None, classify=False)
    if weights_path is not None:
        state = {k: v for k, v in load_state_dict_checked(weights_path, weights_sha256).items() if not k.startswith("logits.")}
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"Weights file {weights_path} does not fit InceptionResnetV1: "
                f"missing keys {result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]} (first five of each)."
            )
    if embedding_dim != 512:
        model.last_linear = nn.Linear(1792, embedding_dim, bias=False)
        model.last_bn = nn.BatchNorm1d(embedding_dim, eps=0.001, momentum=0.1, affine=True)
    if dp:
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    assert not model.classify, "InceptionResnetV1 must be built with classify=False so that it L2-normalises its output"
    return model


def build_embedding_model(
    name: str,
    *,
    embedding_dim: int,
    dp: bool,
    image_size: int = 64,
    weights_path: str | None = None,
    weights_sha256: str | None = None,
) -> nn.Module:
    """Build the embedding network called ``name`` ("compact" or "inception") for ``image_size`` inputs.

    Both return L2-normalised [B, embedding_dim] embeddings and, with ``dp=True``, pass
    ``ModuleValidator.validate(model, strict=True)`` ("compact" always does; ``dp`` only changes
    "inception", whose BatchNorm layers it replaces). ``weights_path`` / ``weights_sha256`` load a
    local state_dict through :func:`common.weights.load_state_dict_checked` (both or neither).
    """
    if name == "compact":
        if (weights_path is None) != (weights_sha256 is None):
            raise ValueError("weights_path and weights_sha256 must be given together.")
        model = CompactFaceNet(embedding_dim, image_size=image_size)
        if weights_path is not None:
            model.load_state_dict(load_state_dict_checked(weights_path, weights_sha256))
        return model
    if name == "inception":
        return build_inception_resnet(
            embedding_dim, dp=dp, weights_path=weights_path, weights_sha256=weights_sha256
        )
    raise ValueError(f"Unknown embedding model {name!r}; choose one of {', '.join(EMBEDDING_MODELS)}.")

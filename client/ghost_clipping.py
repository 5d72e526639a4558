"""DP-SGD clipping without per-sample gradients: in closed form for a site that trains only a linear projection
and its margin head, and per-sample norms of convolutions for Opacus' ghost clipping.

With dlib's pretrained backbone and ``trainable = "projection"`` a site trains ``cos = head(projection(features))``
on its cached trunk features. Opacus would compute each sample's whole gradient to clip it, ``[B, C, 128]`` for a
head of C identities: 50 times the cost of a non-DP step at C = 1,000. Here each sample's gradient norm comes in
closed form, without materialising any per-sample gradient (ghost clipping: Goodfellow 2015, Li et al. 2022), and
the sum of the clipped gradients from the same matrix products a non-DP backward pass runs. Opacus still draws the
Poisson batches and adds the noise (its ghost-clipping optimizer, which takes the sum of clipped gradients in
``.grad``); ``tests/test_dp_clipping.py`` checks the clipped sums against Opacus' own per-sample gradients.

For sample i with trunk features a_i, projection output z_i, loss L_i and G_i = dL_i/dcos_i (row i of ``[B, C]``):

- projection (a bias-free Linear): dL_i/dW_p = (dL_i/dz_i) a_i^T, so its norm is |dL_i/dz_i| |a_i|;
- head row c, with e_i = z_i/|z_i| and w_c = W_c/|W_c|: dL_i/dW_c = G_ic / |W_c| (e_i - cos_ic w_c), so
  |dL_i/dW_h|^2 = sum_c G_ic^2 (1 - cos_ic^2) / |W_c|^2.

Other models train under Opacus' ghost clipping (``client.train._privatize_embedding``), which needs each layer's
per-sample gradient norms; :func:`_conv2d_norm_sample` gives a convolution's without forming its gradient where the
feature map is small (dlib's last stage at 4x4 and 2x2), and from the formed gradient elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule, register_norm_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.utils.tensor_utils import unfold2d
from torch import nn

from common.models.embedding import DPConv2d
from common.models.losses import MarginHead, margin_head_squared_norms


def closed_form_supported(backbone: nn.Module) -> bool:
    """True when ``backbone``'s trainable parameters are exactly one bias-free ``projection`` Linear applied to its
    input (optionally L2-normalised after), as :class:`common.models.dlib_resnet.DlibHead` without blocks."""
    projection = getattr(backbone, "projection", None)
    if not isinstance(projection, nn.Linear) or projection.bias is not None or len(getattr(backbone, "blocks", ())):
        return False
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    return len(trainable) == 1 and trainable[0] is projection.weight


def clipped_gradient_sum(
    backbone: nn.Module,
    head: MarginHead,
    features: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    max_grad_norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set ``.grad`` of the projection's and the head's weights to the sum over the batch of each sample's gradient
    clipped to ``max_grad_norm`` (flat clipping over both); return (cosine ``[B, C]``, per-sample losses ``[B]``),
    detached.

    ``loss_fn`` maps cosines ``[B, C]`` to per-sample losses ``[B]``, each depending on its own row only (margin
    softmax). ``backbone`` must pass :func:`closed_form_supported`.
    """
    if not closed_form_supported(backbone):
        raise ValueError("Closed-form clipping needs a backbone whose only trainable layer is a bias-free projection.")
    weight = backbone.projection.weight  # [D, F]
    features = features.reshape(len(features), -1).to(weight.dtype)  # [B, F]
    with torch.no_grad():
        z = features @ weight.T  # [B, D]
    z.requires_grad_(True)
    emb = F.normalize(z, dim=1) if getattr(backbone, "normalize", False) else z
    cosine = head(emb)  # [B, C]
    losses = loss_fn(cosine)  # [B]
    if losses.shape != (len(features),):
        raise ValueError(f"loss_fn must return one loss per sample, shape [{len(features)}], got {tuple(losses.shape)}.")
    (g,) = torch.autograd.grad(losses.sum(), cosine, retain_graph=True)  # [B, C]: row i is dL_i/dcos_i
    (dz,) = torch.autograd.grad(cosine, z, g, retain_graph=True)  # [B, D]: row i is dL_i/dz_i
    with torch.no_grad():
        cos = cosine.detach()
        head_sq = margin_head_squared_norms(head.weight, cos, g)
        projection_sq = features.square().sum(dim=1) * dz.square().sum(dim=1)
        coef = (max_grad_norm / ((head_sq + projection_sq).sqrt() + 1e-6)).clamp(max=1.0)  # [B], as Opacus clips
    (head_grad,) = torch.autograd.grad(cosine, head.weight, g * coef[:, None])  # [C, D]
    head.weight.grad = head_grad
    weight.grad = (dz * coef[:, None]).T @ features  # [D, F]
    return cos, losses.detach()


@register_norm_sampler([nn.Conv2d, DPConv2d])
def _conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                        backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a Conv2d for Opacus' ghost clipping.

    With A_i ``[k, T]`` the unfolded input of sample i (k = in-channels x kernel area, T output positions) and B_i
    ``[c, T]`` its backprops, the weight's gradient is B_i A_i^T and its squared norm
    sum_{t,t'} (A_i^T A_i)_{tt'} (B_i^T B_i)_{tt'}: T^2 (k + c) operations instead of the T k c of forming it. Where
    that is not cheaper (large feature maps, few channels) or the convolution is grouped, the gradient is formed
    (Opacus' own per-sample gradient) and its norm taken: mixed ghost clipping (Bu et al. 2022)."""
    x = activations[0].to(backprops.dtype)
    n, c = len(x), layer.out_channels
    positions = backprops.shape[2] * backprops.shape[3]
    k = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    if n == 0 or layer.groups != 1 or positions * (k + c) >= k * c:
        grads = GradSampleModule.GRAD_SAMPLERS.get(type(layer), compute_conv_grad_sample)(layer, activations, backprops)
        return {p: g.reshape(len(g), -1).norm(dim=1) for p, g in grads.items()}
    a = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                 dilation=layer.dilation)  # [n, k, T]
    b = backprops.reshape(n, c, positions)  # [n, c, T]
    norms = {}
    if layer.weight.requires_grad:
        squared = ((a.transpose(1, 2) @ a) * (b.transpose(1, 2) @ b)).sum(dim=(1, 2))  # [n]
        norms[layer.weight] = squared.clamp_min(0.0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = b.sum(dim=2).norm(dim=1)
    return norms

"""An LPIPS-like perceptual distance on the early stages of dlib's pretrained face ResNet (the VAE's optional term).

LPIPS (Zhang et al. 2018) compares two images by the features of an ImageNet network: each feature vector is scaled
to unit length across channels, and the squared differences are averaged over positions and summed over layers. No
ImageNet network is available here, so this uses the one pretrained network the project has, dlib's face ResNet,
tapped after its stem and after each of its first three stages (32, 32, 64 and 128 channels), unweighted (LPIPS'
learned per-channel weights need human judgements we do not have). The network is frozen: only the VAE learns, and
the loss is per sample, so it is DP-compatible as it is (Opacus clips the VAE's per-sample gradients, which include
this term's).

Caution: dlib's network also judges the VAE's identity figures (``server.face_judge``); with this term on, those
figures are no longer independent of the training objective. The benchmark marks such rows.

Faces come in as the VAE's ``aligned`` crops (the central 80% of dlib's chip) in [0, 1]; they are resized to the
120 pixels that region spans in dlib's 150-pixel chip, so the features see faces at the scale dlib was trained on.
No I/O here: the weights come in through the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.models.dlib_resnet import DlibResNet

TAPS = (3, 7, 10)  # block counts after which features are compared (ends of dlib's 32-, 64- and 128-channel stages)
INNER_SIDE = 120  # pixels the aligned crop spans in dlib's 150-pixel chip


class FacePerceptualLoss(nn.Module):
    """Per-sample perceptual distance ``[B]`` between reconstructions and inputs, ``[B, 3, S, S]`` in [0, 1].

    Parameters
    ----------
    net : DlibResNet
        dlib's ResNet with its weights loaded (either input convention); frozen here.
    """

    def __init__(self, net: DlibResNet):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FacePerceptualLoss:  # the network stays in eval mode
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(INNER_SIDE, INNER_SIDE), mode="bilinear", align_corners=False)
        h = (x * 255.0 - self.net.pixel_mean.view(1, 3, 1, 1)) * self.net.pixel_scale  # dlib's input scaling
        h = self.net.stem(h)
        taps = [h]
        done = 0
        for end in TAPS:
            h = self.net.blocks[done:end](h)
            taps.append(h)
            done = end
        return taps

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x_hat.shape != x.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FacePerceptualLoss needs two [B, 3, S, S] images of one shape, got {tuple(x_hat.shape)} "
                             f"and {tuple(x.shape)}.")
        with torch.no_grad():
            target = self.features(x)
        total = x.new_zeros(len(x))
        for a, b in zip(self.features(x_hat), target):
            total = total + (F.normalize(a, dim=1) - F.normalize(b, dim=1)).square().sum(1).mean(dim=(1, 2))
        return total  # [B]

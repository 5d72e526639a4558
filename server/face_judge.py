"""dlib's pretrained face ResNet as the measuring stick of the VAE's faces.

The VAE is judged the way people who work on face generation judge faces, by a face recognizer it was never trained
with (the VAE's optional perceptual term uses the same network's early layers: a run that turns it on is marked, and
its identity figures are then no longer independent):

- identity kept: the share of held-out faces whose reconstruction dlib still matches to the face the VAE was given
  (descriptor distance below dlib's 0.6), and the mean descriptor distance;
- a Frechet distance in dlib's 128-d descriptor space between real held-out faces and decoded prior samples (and
  reconstructions), beside the same distance between two disjoint sets of real held-out faces (the floor a perfect
  generator would reach with sets of this size). It is not Inception-FID: no ImageNet network is available here, and
  a face recognizer's space measures face likeness and identity spread rather than generic image statistics;
- morphs: each frame's descriptor distance to each source face, whether the end frames match their source faces,
  and the largest step between consecutive frames (a smooth path has no step above ``MORPH_MAX_STEP``).

The VAE's faces are ``aligned`` crops: the central 120 of the 150 pixels of dlib's own face chip (see
``common.data.datasets``). The judge puts them back in dlib's geometry (resized to 120 pixels, edges replicated out
to 150) before describing them; originals and reconstructions go through the same steps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.data.datasets import ALIGNED_CROP_FRACTION
from common.metrics import frechet_distance
from common.models.dlib_resnet import DLIB_THRESHOLD, DlibResNet

log = logging.getLogger(__name__)

CHIP_SIZE = 150  # dlib's chip side
MORPH_MAX_STEP = 0.25  # a smooth morph moves less than this (dlib descriptor units) between consecutive frames:
# under half of dlib's same-person threshold, so no single frame changes who the face is.


class FaceJudge:
    """dlib descriptors (unnormalised, dlib's 0.6 threshold applies) of ``aligned`` face crops.

    Parameters
    ----------
    model : DlibResNet
        With dlib's weights loaded, ``normalize=False`` and ``signed_input=False`` (0..255 pixels).
    batch_size : int, default 64
    """

    def __init__(self, model: DlibResNet, batch_size: int = 64):
        if model.normalize or model.signed_input:
            raise ValueError("The face judge needs dlib's ResNet as dlib runs it: DlibResNet(normalize=False, "
                             "signed_input=False).")
        self.model = model.eval().requires_grad_(False)
        self.batch_size = batch_size

    def to_chip(self, images: torch.Tensor) -> torch.Tensor:
        """``aligned`` crops (uint8, or float in [0, 1]) [B, 3, S, S] -> float chips in 0..255 [B, 3, 150, 150]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"The face judge expects RGB images [B, 3, S, S], got {tuple(images.shape)}.")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        inner = round(CHIP_SIZE * ALIGNED_CROP_FRACTION)
        pad = (CHIP_SIZE - inner) // 2
        x = F.interpolate(x, size=(inner, inner), mode="bilinear", antialias=True, align_corners=False)
        x = F.pad(x, (pad, CHIP_SIZE - inner - pad) * 2, mode="replicate")
        return x.clamp(0.0, 1.0) * 255.0

    @torch.no_grad()
    def describe(self, images: torch.Tensor) -> torch.Tensor:
        """Descriptors [B, 128] of ``aligned`` crops [B, 3, S, S] (uint8, or float in [0, 1])."""
        out = [self.model(self.to_chip(images[i : i + self.batch_size]))
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, 128)


def load_face_judge(cache_dir: str | Path) -> FaceJudge | None:
    """The judge with dlib's weights from the installed ``face-recognition-models`` package (converted once into
    ``cache_dir`` and loaded by SHA-256); None, with a warning, when the package or its file is missing."""
    from common.dlib_weights import cached_dlib_resnet
    from common.weights import load_state_dict_checked

    try:
        path, sha256 = cached_dlib_resnet(cache_dir)
    except FileNotFoundError as exc:
        log.warning("The VAE's face-aware metrics are skipped: %s", exc)
        return None
    model = DlibResNet()
    model.load_state_dict(load_state_dict_checked(path, sha256))
    return FaceJudge(model)


def identity_metrics(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """From descriptors [N, 128] of faces and of their reconstructions: ``identity-kept`` (share closer than dlib's
    threshold) and ``descriptor-distance`` (mean distance)."""
    d = (original - reconstruction).norm(dim=1)
    return {"identity-kept": float((d < DLIB_THRESHOLD).double().mean()), "descriptor-distance": float(d.mean())}


def morph_metrics(frames: torch.Tensor, source_a: torch.Tensor, source_b: torch.Tensor) -> dict:
    """Descriptor paths of morphs.

    Parameters
    ----------
    frames : torch.Tensor
        Descriptors of the frames, [P, T, 128] (P morphs of T frames each, from face a to face b).
    source_a, source_b : torch.Tensor
        Descriptors of the source faces, [P, 128].

    Returns
    -------
    dict
        ``ends-matched``: share of morphs whose first frame matches a and last frame matches b (dlib's threshold);
        ``max-step``: the largest distance between consecutive frames over all morphs; ``smooth``: share of morphs
        with no step above ``MORPH_MAX_STEP``; ``to_a`` / ``to_b``: each frame's mean distance to each source face
        over the morphs (lists of T floats).
    """
    to_a = (frames - source_a[:, None]).norm(dim=2)  # [P, T]
    to_b = (frames - source_b[:, None]).norm(dim=2)
    steps = (frames[:, 1:] - frames[:, :-1]).norm(dim=2)  # [P, T-1]
    matched = (to_a[:, 0] < DLIB_THRESHOLD) & (to_b[:, -1] < DLIB_THRESHOLD)
    return {"ends-matched": float(matched.double().mean()), "max-step": float(steps.max()),
            "smooth": float((steps.max(dim=1).values <= MORPH_MAX_STEP).double().mean()),
            "to_a": to_a.mean(0).tolist(), "to_b": to_b.mean(0).tolist()}


@torch.no_grad()
def judge_vae(vae: nn.Module, judge: FaceJudge, faces: torch.Tensor, reference: torch.Tensor | None, *,
              cache: dict | None = None, morphs: int = 16, morph_steps: int = 11, seed: int = 0,
              batch_size: int = 128, reconstructions: torch.Tensor | None = None) -> dict[str, float]:
    """The face-aware metrics of a VAE on held-out ``faces`` (uint8 ``aligned`` crops [N, 3, S, S]).

    ``reference`` is a second, disjoint set of real held-out faces (as many as ``faces`` for a fair floor); without
    it ``frechet-reference`` is left out. ``reconstructions`` (float [N, 3, S, S]) saves recomputing them. ``cache`` keeps the descriptors of the real faces between rounds. Morphs
    join faces ``2k`` and ``2k + 1`` for the first ``morphs`` pairs. Returns ``identity-kept``,
    ``descriptor-distance``, ``frechet-recon``, ``frechet-samples``, ``frechet-reference``, ``morph-ends-matched``,
    ``morph-max-step`` and ``morph-smooth``.
    """
    cache = cache if cache is not None else {}
    if "judge/faces" not in cache:
        cache["judge/faces"] = judge.describe(faces)
        if reference is not None and len(reference) >= 2:
            cache["judge/reference"] = judge.describe(reference)
    real = cache["judge/faces"]
    vae.eval()
    x = faces.float().div(255.0)
    recon = reconstructions if reconstructions is not None else torch.cat(
        [vae.reconstruct(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    recon_desc = judge.describe(recon)
    metrics = identity_metrics(real, recon_desc)
    samples = vae.sample(len(faces), generator=torch.Generator().manual_seed(seed))
    metrics["frechet-recon"] = frechet_distance(real, recon_desc)
    metrics["frechet-samples"] = frechet_distance(real, judge.describe(samples))
    if "judge/reference" in cache:
        metrics["frechet-reference"] = frechet_distance(real, cache["judge/reference"])
    pairs = min(morphs, len(faces) // 2)
    if pairs:
        frames = torch.stack([vae.morph(x[2 * k], x[2 * k + 1], steps=morph_steps) for k in range(pairs)])
        frame_desc = judge.describe(frames.flatten(0, 1)).view(pairs, morph_steps, -1)
        path = morph_metrics(frame_desc, real[0 : 2 * pairs : 2], real[1 : 2 * pairs : 2])
        metrics.update({f"morph-{k}": v for k, v in path.items() if not isinstance(v, list)})
    return metrics

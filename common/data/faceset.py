"""The in-memory face dataset every other module passes around."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class FaceSet:
    """Aligned face crops of several identities, held as uint8 tensors.

    Attributes
    ----------
    images : torch.Tensor
        uint8, shape [N, 3, H, W] (RGB; grayscale sources are replicated to three channels).
    labels : torch.Tensor
        int64, shape [N]; ``labels[i]`` indexes ``identities``.
    identities : tuple[str, ...]
        Identity names (folder names), in label order.
    paths : tuple[str, ...]
        For each image, its path relative to the dataset root (or a synthetic id).
    skipped : dict[str, int]
        Inputs that were skipped while loading, counted by reason
        (``"unreadable"``, ``"no-face"``, ``"single-image-identity"``, ...).
    """

    images: torch.Tensor
    labels: torch.Tensor
    identities: tuple[str, ...]
    paths: tuple[str, ...]
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"FaceSet.images must be uint8 [N, 3, H, W], got {self.images.dtype} {tuple(self.images.shape)}."
            )
        n = self.images.shape[0]
        if self.labels.shape != (n,) or len(self.paths) != n:
            raise ValueError(
                f"FaceSet has {n} images but {tuple(self.labels.shape)} labels and {len(self.paths)} paths."
            )
        if n and int(self.labels.max()) >= len(self.identities):
            raise ValueError("FaceSet.labels index past the end of FaceSet.identities.")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: torch.Tensor | list[int], relabel: bool = True) -> FaceSet:
        """Return the images at ``indices``; with ``relabel`` the identities are renumbered 0..K-1."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        labels = self.labels[idx]
        identities = self.identities
        if relabel:
            kept = sorted(set(labels.tolist()))
            remap = {old: new for new, old in enumerate(kept)}
            labels = torch.tensor([remap[int(x)] for x in labels], dtype=torch.long)
            identities = tuple(self.identities[k] for k in kept)
        return FaceSet(
            images=self.images[idx],
            labels=labels,
            identities=identities,
            paths=tuple(self.paths[i] for i in idx.tolist()),
            skipped=dict(self.skipped),
        )

    def by_identity(self, names: list[str] | tuple[str, ...] | set[str]) -> FaceSet:
        """Return the images of the named identities (relabelled)."""
        wanted = {self.identities.index(n) for n in names if n in self.identities}
        idx = [i for i, lab in enumerate(self.labels.tolist()) if lab in wanted]
        return self.subset(idx)

    def to_float(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255.0)

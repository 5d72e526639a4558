"""Which faces a site trains on and which held-out faces the server evaluates on.

Three sources, one rule: evaluation people are never given to any site.
- LFW (recognised by its protocol files): sites share the ``peopleDevTrain.txt`` identities with at least two
  images; the server verifies on ``pairsDevTest.txt`` (people never seen in training) and reconstructs faces of
  ``peopleDevTest.txt`` people.
- Any other identity-folder dataset (VGGFace2, CASIA-WebFace layout): a seeded share of identities is held out
  for the server; the rest are split across sites.
- No ``data``: the synthetic smoke-test set, split the same way.
In a deployment a site reads its own folder instead (``load_site_folder``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import RunConfig
from common.data.datasets import (IMAGE_EXTENSIONS, DataError, is_lfw_root, lfw_train_identities, list_identities,
                                  load_faces, load_lfw_pairs, read_pairs_file, read_people_file)
from common.data.faceset import FaceSet
from common.data.partition import make_pairs, partition_identities, split_heldout_identities, train_val_split
from common.data.synthetic import make_synthetic_faces

SYNTHETIC_IDENTITIES = 40
SYNTHETIC_IMAGES_PER_IDENTITY = 12


@dataclass(frozen=True)
class EvalData:
    """Held-out data for the server's global evaluation (uint8 images). ``cache`` keeps what evaluation computes
    once per run from these images (a frozen pretrained trunk's features; see ``server.evaluate``)."""

    pairs_a: torch.Tensor
    pairs_b: torch.Tensor
    same: torch.Tensor
    faces: torch.Tensor
    description: str
    reference: torch.Tensor | None = None  # more held-out faces, disjoint from ``faces`` (the VAE's Frechet floor)
    cache: dict = field(default_factory=dict, compare=False, repr=False)


def _cache_dir(cfg: RunConfig) -> Path | None:
    return Path(cfg.cache_dir) if cfg.cache_dir else None


@functools.lru_cache(maxsize=4)
def _synthetic(image_size: int, seed: int) -> FaceSet:
    return make_synthetic_faces(SYNTHETIC_IDENTITIES, SYNTHETIC_IMAGES_PER_IDENTITY, image_size, seed)


def _check_root(data: str) -> Path:
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(
            f"Dataset path does not exist: {root} (pass an identity-folder dataset such as LFW, or leave data empty "
            "for the synthetic smoke-test set)"
        )
    if not root.is_dir():
        raise DataError(f"Dataset path is not a folder of identity folders: {root}")
    return root


def training_identities(cfg: RunConfig) -> list[str]:
    """The identities that may be split across sites (before ``max-identities``)."""
    if not cfg.data:
        names, _ = split_heldout_identities(_synthetic(cfg.image_size, cfg.seed).identities, cfg.heldout_fraction,
                                            cfg.seed)
    else:
        root = _check_root(cfg.data)
        if is_lfw_root(root):
            names = lfw_train_identities(root, min_images=2)
        else:
            names = list_identities(root)
            if len(names) < 4:
                raise DataError(f"Found {len(names)} identity folders in {root}; need at least 4 "
                                "(root/<identity>/<image>).")
            names, _ = split_heldout_identities(names, cfg.heldout_fraction, cfg.seed)
    if cfg.max_identities and cfg.max_identities < len(names):
        names = _seeded_take(names, cfg.max_identities, cfg.seed)
    return names


def _seeded_take(names: list[str], n: int, seed: int) -> list[str]:
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))[:n]
    return sorted(names[i] for i in order.tolist())


def site_identities(cfg: RunConfig, site_index: int, num_sites: int) -> list[str]:
    names = training_identities(cfg)
    if not 0 <= site_index < num_sites:
        raise ValueError(f"Site index {site_index} is outside 0..{num_sites - 1}.")
    return partition_identities(names, num_sites, cfg.seed, scheme=cfg.partition, alpha=cfg.dirichlet_alpha,
                                weights=image_counts(cfg))[site_index]


@functools.lru_cache(maxsize=8)
def _image_counts(data: str) -> dict[str, int]:
    root = Path(data)
    if is_lfw_root(root):
        return dict(read_people_file(root / "peopleDevTrain.txt"))
    return {name: sum(1 for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            for name in list_identities(root)}


def image_counts(cfg: RunConfig) -> dict[str, int] | None:
    """Images per identity, so that IID sites get about equal numbers of examples (None: all equal)."""
    return _image_counts(cfg.data) if cfg.data else None


def site_faces(cfg: RunConfig, site_index: int, num_sites: int, progress: bool = False) -> tuple[FaceSet, FaceSet]:
    """(train, validation) faces of simulated site ``site_index`` of ``num_sites``."""
    names = site_identities(cfg, site_index, num_sites)
    if not cfg.data:
        faces = _synthetic(cfg.image_size, cfg.seed).by_identity(names)
    else:
        faces = load_faces(cfg.data, image_size=cfg.image_size, mode=cfg.face_mode, identities=names, min_images=2,
                           cache_dir=_cache_dir(cfg), progress=progress)
    return train_val_split(faces, cfg.val_fraction, cfg.seed)


def load_site_folder(cfg: RunConfig, path: str, progress: bool = False) -> tuple[FaceSet, FaceSet]:
    """(train, validation) faces of a deployed site that keeps its photos in ``path``."""
    root = _check_root(path)
    faces = load_faces(root, image_size=cfg.image_size, mode=cfg.face_mode, min_images=2, cache_dir=_cache_dir(cfg),
                       progress=progress)
    return train_val_split(faces, cfg.val_fraction, cfg.seed)


def eval_data(cfg: RunConfig, progress: bool = False) -> EvalData:
    """The server's held-out evaluation data (never seen by a site)."""
    n_pairs = cfg.eval_pairs
    if cfg.data and is_lfw_root(Path(cfg.data)):
        root = Path(cfg.data)
        a, b, same = load_lfw_pairs(root, "pairsDevTest.txt", image_size=cfg.image_size, mode=cfg.face_mode,
                                    cache_dir=_cache_dir(cfg),
                                    max_pairs=n_pairs)
        people = [name for name, _ in read_people_file(root / "peopleDevTest.txt")]
        faces, reference = _heldout_faces(cfg, people)
        return EvalData(a, b, same, faces, f"LFW pairsDevTest.txt ({len(same)} pairs), peopleDevTest faces",
                        reference=reference)
    if not cfg.data:
        full = _synthetic(cfg.image_size, cfg.seed)
        _, held = split_heldout_identities(full.identities, cfg.heldout_fraction, cfg.seed)
        held_set = full.by_identity(held)
        desc = f"synthetic held-out identities ({len(held)})"
    else:
        root = _check_root(cfg.data)
        _, held = split_heldout_identities(list_identities(root), cfg.heldout_fraction, cfg.seed)
        held_set = load_faces(root, image_size=cfg.image_size, mode=cfg.face_mode, identities=held, min_images=1,
                              cache_dir=_cache_dir(cfg), progress=progress)
        desc = f"{root.name}: held-out identities ({held_set.num_identities})"
    ia, ib, same = make_pairs(held_set, n_pairs or 1000, cfg.seed)
    faces = held_set.images[torch.randperm(len(held_set), generator=torch.Generator().manual_seed(cfg.seed))]
    return EvalData(held_set.images[ia], held_set.images[ib], same, faces[: cfg.eval_faces],
                    f"{desc}, {len(same)} pairs", reference=faces[cfg.eval_faces : 2 * cfg.eval_faces])


def _heldout_faces(cfg: RunConfig, people: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first image of each of ``eval-faces`` held-out people taken in a seeded order, and of the next ``eval-faces``
    people of that order (a disjoint reference set of real faces, for the VAE's Frechet-distance floor)."""
    order = torch.randperm(len(people), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n = min(len(people), cfg.eval_faces)
    sets = []
    for chosen in (sorted(people[i] for i in order[:n]), sorted(people[i] for i in order[n : 2 * n])):
        if not chosen:
            sets.append(torch.empty(0, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8))
            continue
        faces = load_faces(cfg.data, image_size=cfg.image_size, mode=cfg.face_mode, identities=chosen, min_images=1,
                           cache_dir=_cache_dir(cfg), progress=False)
        first = [int(torch.nonzero(faces.labels == k)[0]) for k in range(faces.num_identities)]
        sets.append(faces.images[first][: cfg.eval_faces])
    return sets[0], sets[1]


@dataclass(frozen=True)
class ProtocolData:
    """A dataset's test protocol on people no site trains on (``facefl evaluate``).

    ``faces`` holds every test image once (uint8); ``pair_a``/``pair_b`` index the verification pairs into it
    (``same`` True for matched pairs); ``gallery``/``probes`` index one image of every test person and a second image
    of each person who has one, for rank-1 identification (``faces.labels`` says who is who).
    """

    faces: FaceSet
    pair_a: torch.Tensor
    pair_b: torch.Tensor
    same: torch.Tensor
    gallery: torch.Tensor
    probes: torch.Tensor
    description: str


def protocol_data(cfg: RunConfig, progress: bool = True) -> ProtocolData:
    """LFW: View 1 (``pairsDevTest.txt`` pairs; identification among the ``peopleDevTest.txt`` people). Another
    identity-folder dataset: the run's held-out people, ``eval-pairs`` (default 1000) seeded pairs. Synthetic
    faces without ``data``."""
    root = Path(cfg.data).expanduser() if cfg.data else None
    if root is not None and is_lfw_root(root):
        people = [name for name, _ in read_people_file(root / "peopleDevTest.txt")]
        faces = load_faces(root, image_size=cfg.image_size, mode=cfg.face_mode, identities=people, min_images=1,
                           cache_dir=_cache_dir(cfg), progress=progress)
        index = {path: i for i, path in enumerate(faces.paths)}
        pairs = [p for p in read_pairs_file(root / "pairsDevTest.txt")
                 if p.relpath_a in index and p.relpath_b in index]
        if not pairs:
            raise DataError(f"No pair of {root / 'pairsDevTest.txt'} has both images readable under {root}.")
        a = torch.tensor([index[p.relpath_a] for p in pairs])
        b = torch.tensor([index[p.relpath_b] for p in pairs])
        same = torch.tensor([p.same for p in pairs])
        what = f"LFW View 1: pairsDevTest.txt ({len(pairs)} pairs)"
    else:
        if root is None:
            full = _synthetic(cfg.image_size, cfg.seed)
            _, held = split_heldout_identities(full.identities, cfg.heldout_fraction, cfg.seed)
            faces, what = full.by_identity(held), f"synthetic held-out identities ({len(held)})"
        else:
            _, held = split_heldout_identities(list_identities(_check_root(cfg.data)), cfg.heldout_fraction, cfg.seed)
            faces = load_faces(root, image_size=cfg.image_size, mode=cfg.face_mode, identities=held, min_images=1,
                               cache_dir=_cache_dir(cfg), progress=progress)
            what = f"{root.name}: held-out identities ({faces.num_identities})"
        a, b, same = make_pairs(faces, cfg.eval_pairs or 1000, cfg.seed)
        what += f", {len(same)} pairs"
    firsts = [torch.nonzero(faces.labels == k).flatten() for k in range(faces.num_identities)]
    gallery = torch.stack([idx[0] for idx in firsts])
    probes = torch.stack([idx[1] for idx in firsts if len(idx) > 1])
    return ProtocolData(faces, a, b, same, gallery, probes,
                        f"{what}; rank-1 identification of {len(probes)} probes among {len(gallery)} people")

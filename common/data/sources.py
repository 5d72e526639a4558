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

import dataclasses
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
    """The identities that may be split across sites: the dataset's training people less the server's validation
    people (:func:`validation_identities`), then at most ``max-identities`` of them."""
    names, _ = _training_and_validation(cfg)
    if cfg.max_identities and cfg.max_identities < len(names):
        names = _seeded_take(names, cfg.max_identities, cfg.seed)
    return names


def validation_identities(cfg: RunConfig) -> list[str]:
    """The server's validation people: ``validation-people`` of the dataset's training people (at most a fifth of
    them, seeded), never given to a site and never part of the test protocol. The server scores each round's
    aggregate on their pairs to keep or reject it (``reject-worse-rounds``); test pairs never choose a model."""
    return _training_and_validation(cfg)[1]


def _training_and_validation(cfg: RunConfig) -> tuple[list[str], list[str]]:
    names = _all_training_identities(cfg)
    count = min(cfg.validation_people, len(names) // 5) if cfg.validates_rounds else 0
    if count < 2:
        return names, []
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(cfg.seed + 7919)).tolist()
    held = set(order[:count])
    return [n for i, n in enumerate(names) if i not in held], sorted(names[i] for i in held)


def _all_training_identities(cfg: RunConfig) -> list[str]:
    """The identities that may train (before the validation people and ``max-identities`` are taken out)."""
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
    """Images per identity folder (LFW: its people files' counts, training and test people)."""
    root = Path(data)
    if is_lfw_root(root):
        return {**dict(read_people_file(root / "peopleDevTrain.txt")),
                **dict(read_people_file(root / "peopleDevTest.txt"))}
    return {name: _count_images(root / name) for name in list_identities(root)}


def image_count(cfg: RunConfig, name: str) -> int:
    """Image files in identity folder ``name`` of ``cfg.data``."""
    return _image_counts(cfg.data).get(name, 0)


def _count_images(folder: Path) -> int:
    """Image files in ``folder`` as ``load_faces`` sees them (hidden files such as ``._IMG_0001.JPG`` ignored)."""
    return sum(1 for f in folder.iterdir() if not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS)


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
    return train_val_split(masked(cfg, faces), cfg.val_fraction, cfg.seed)


def masked(cfg: RunConfig, faces: FaceSet, probability: float | None = None) -> FaceSet:
    """``faces`` with a synthetic mask (``common.data.masks``) on each face whose own seeded draw (from its path and
    ``cfg.seed``) falls below ``probability`` (default ``mask-probability``): the same faces are masked, with the
    same mask, in every process and run."""
    probability = cfg.mask_probability if probability is None else probability
    if probability <= 0 or len(faces) == 0:
        return faces
    from common.data.datasets import ALIGNED_CROP_FRACTION
    from common.data.masks import mask_faces

    crop = ALIGNED_CROP_FRACTION if cfg.face_mode == "aligned" else 1.0
    images, _ = mask_faces(faces.images, list(faces.paths), seed=cfg.seed, probability=probability,
                           crop_fraction=crop)
    return dataclasses.replace(faces, images=images)


def load_site_folder(cfg: RunConfig, path: str, progress: bool = False) -> tuple[FaceSet, FaceSet]:
    """(train, validation) faces of a deployed site that keeps its photos in ``path``."""
    root = _check_root(path)
    faces = load_faces(root, image_size=cfg.image_size, mode=cfg.face_mode, min_images=2, cache_dir=_cache_dir(cfg),
                       progress=progress)
    return train_val_split(masked(cfg, faces), cfg.val_fraction, cfg.seed)


def evaluation_identities(cfg: RunConfig) -> list[str]:
    """The people the server evaluates on (never a site's): LFW's ``peopleDevTest.txt``, else the held-out share."""
    if not cfg.data:
        return []
    root = _check_root(cfg.data)
    if is_lfw_root(root):
        return [name for name, _ in read_people_file(root / "peopleDevTest.txt")]
    return split_heldout_identities(list_identities(root), cfg.heldout_fraction, cfg.seed)[1]


def prepare_faces(cfg: RunConfig, *, progress: bool = True) -> int:
    """Cut and cache, before a simulated run starts, every face its sites and server read: the sites' people, the
    server's validation people and its evaluation data (``load_faces`` uses every core, shows progress and keeps
    each finished person, so an interrupted preparation resumes). Returns how many faces are ready (0 for the
    synthetic set, which is drawn in memory)."""
    if not cfg.data:
        return 0
    names = sorted(set(training_identities(cfg)) | set(validation_identities(cfg)))
    faces = load_faces(cfg.data, image_size=cfg.image_size, mode=cfg.face_mode, identities=names, min_images=1,
                       cache_dir=_cache_dir(cfg), progress=progress)
    held = eval_data(cfg, progress=progress)
    return len(faces) + len(held.pairs_a) + len(held.pairs_b) + len(held.faces)


def eval_data(cfg: RunConfig, progress: bool = False) -> EvalData:
    """The server's held-out evaluation data (never seen by a site)."""
    n_pairs = cfg.eval_pairs
    if cfg.data and is_lfw_root(Path(cfg.data)):
        root = Path(cfg.data)
        a, b, same = load_lfw_pairs(root, "pairsDevTest.txt", image_size=cfg.image_size, mode=cfg.face_mode,
                                    cache_dir=_cache_dir(cfg), max_pairs=n_pairs, progress=progress)
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


VALIDATION_GENUINE_PER_PERSON = 10  # matched pairs of one validation person, at most (a few people have hundreds)
VALIDATION_IMPOSTORS_PER_GENUINE = 10


@dataclass(frozen=True)
class PairSet:
    """Verification pairs indexing into ``images`` (each face once): ``a[i]``, ``b[i]``, ``same[i]``."""

    images: torch.Tensor  # uint8 [U, 3, S, S]
    a: torch.Tensor
    b: torch.Tensor
    same: torch.Tensor
    description: str


def validation_data(cfg: RunConfig, progress: bool = False) -> PairSet | None:
    """Pairs of the server's validation people (:func:`validation_identities`), None when there are none.

    Matched pairs: every pair of a person's images, at most ``VALIDATION_GENUINE_PER_PERSON`` per person (seeded);
    mismatched pairs: ``VALIDATION_IMPOSTORS_PER_GENUINE`` times as many, images of two different people drawn at
    random (seeded), so that the ROC AUC resolves small changes of a strong model."""
    people = validation_identities(cfg)
    if len(people) < 2:
        return None
    if cfg.data:
        faces = load_faces(cfg.data, image_size=cfg.image_size, mode=cfg.face_mode, identities=people, min_images=2,
                           cache_dir=_cache_dir(cfg), progress=progress)
    else:
        faces = _synthetic(cfg.image_size, cfg.seed).by_identity(people)
    faces = masked(cfg, faces)  # the sites' domain: masked as often as their faces are
    gen = torch.Generator().manual_seed(cfg.seed + 104729)
    a, b = [], []
    for k in range(faces.num_identities):
        rows = torch.nonzero(faces.labels == k).flatten()
        pairs = torch.combinations(rows, 2)
        if len(pairs) > VALIDATION_GENUINE_PER_PERSON:
            pairs = pairs[torch.randperm(len(pairs), generator=gen)[:VALIDATION_GENUINE_PER_PERSON]]
        a.append(pairs[:, 0]), b.append(pairs[:, 1])
    genuine = sum(len(x) for x in a)
    n_imp = genuine * VALIDATION_IMPOSTORS_PER_GENUINE
    ia = torch.randint(len(faces), (n_imp * 2,), generator=gen)
    ib = torch.randint(len(faces), (n_imp * 2,), generator=gen)
    keep = torch.nonzero(faces.labels[ia] != faces.labels[ib]).flatten()[:n_imp]
    a.append(ia[keep]), b.append(ib[keep])
    ia, ib = torch.cat(a), torch.cat(b)
    same = torch.zeros(len(ia), dtype=torch.bool)
    same[:genuine] = True
    return PairSet(faces.images, ia, ib, same,
                   f"validation people ({faces.num_identities}, never a site's, not in the test protocol): "
                   f"{genuine} matched and {len(ia) - genuine} mismatched pairs")


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
    gallery, probes = _identification(faces)
    return ProtocolData(faces, a, b, same, gallery, probes,
                        f"{what}; rank-1 identification of {len(probes)} probes among {len(gallery)} people")


def _identification(faces: FaceSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(gallery, probes) for rank-1: the first image of every person, and the second of each person who has one."""
    firsts = [torch.nonzero(faces.labels == k).flatten() for k in range(faces.num_identities)]
    return torch.stack([idx[0] for idx in firsts]), torch.stack([idx[1] for idx in firsts if len(idx) > 1])


UNTOUCHED_PAIRS = 1000


def untouched_protocol(cfg: RunConfig, progress: bool = True) -> ProtocolData | None:
    """LFW's test people that no View-1 pair names (``peopleDevTest.txt`` less everyone in ``pairsDevTest.txt``): no
    site trained on them and no benchmark chose a setting on them, so they check figures tuned on View 1. Balanced
    seeded pairs among them (``UNTOUCHED_PAIRS``, as for any identity-folder dataset: ``make_pairs``) and rank-1 of a
    second image of each among one image of every one. None for other datasets (their held-out people are already
    the only test)."""
    root = Path(cfg.data).expanduser() if cfg.data else None
    if root is None or not is_lfw_root(root):
        return None
    named = {p.name_a for p in read_pairs_file(root / "pairsDevTest.txt")} | \
        {p.name_b for p in read_pairs_file(root / "pairsDevTest.txt")}
    people = [name for name, _ in read_people_file(root / "peopleDevTest.txt") if name not in named]
    faces = load_faces(root, image_size=cfg.image_size, mode=cfg.face_mode, identities=people, min_images=1,
                       cache_dir=_cache_dir(cfg), progress=progress)
    a, b, same = make_pairs(faces, UNTOUCHED_PAIRS, cfg.seed)
    gallery, probes = _identification(faces)
    return ProtocolData(faces, a, b, same, gallery, probes,
                        f"LFW test people no View-1 pair names ({faces.num_identities}): {len(same)} seeded pairs; "
                        f"rank-1 of {len(probes)} probes among {len(gallery)} people")


def masked_protocols(cfg: RunConfig, protocol: ProtocolData) -> dict[str, ProtocolData]:
    """The test protocol in the masked domain: ``original`` (as it is), ``masked-masked`` (every face masked: both
    sides of each pair, gallery and probes) and ``masked-unmasked`` (the first image of each pair and each probe
    masked, the second and the gallery not: a masked probe against an unmasked gallery). Masks are drawn per face
    from its path and ``cfg.seed``; the pairs and people are the protocol's own."""
    faces = protocol.faces
    all_masked = masked(cfg, faces, probability=1.0)
    n = len(faces)
    both = dataclasses.replace(faces, images=torch.cat([faces.images, all_masked.images]),
                               labels=torch.cat([faces.labels, faces.labels]),
                               paths=tuple(faces.paths) + tuple(f"{p} (masked)" for p in faces.paths))
    return {
        "original": protocol,
        "masked-masked": dataclasses.replace(protocol, faces=all_masked,
                                             description=f"{protocol.description}; every face masked"),
        "masked-unmasked": dataclasses.replace(protocol, faces=both, pair_a=protocol.pair_a + n,
                                               probes=protocol.probes + n,
                                               description=f"{protocol.description}; first image of each pair and "
                                                           "each probe masked"),
    }


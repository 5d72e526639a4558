"""Splitting a face dataset into sites by identity (no person in two sites), and each site's own split.

Everything here is a pure function of its arguments: the same (identities, number of sites, seed) always gives
the same assignment, so a site can compute its own share without talking to anyone.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from common.data.faceset import FaceSet


def _rng(seed: int, *salt: str) -> np.random.Generator:
    digest = hashlib.sha256(("|".join((str(seed),) + salt)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def split_heldout_identities(
    identities: list[str] | tuple[str, ...], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split identity names into (training, held-out) sets; held-out people are never given to a site.

    Deterministic from the sorted names and ``seed``; at least two identities are held out.
    """
    names = sorted(identities)
    if len(names) < 4:
        raise ValueError(f"Need at least 4 identities to hold some out for evaluation; got {len(names)}.")
    order = _rng(seed, "heldout").permutation(len(names))
    n_held = max(2, int(round(fraction * len(names))))
    held = sorted(names[i] for i in order[:n_held])
    train = sorted(names[i] for i in order[n_held:])
    return train, held


def partition_identities(
    identities: list[str] | tuple[str, ...],
    num_sites: int,
    seed: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    min_per_site: int = 2,
    weights: dict[str, int] | None = None,
) -> list[list[str]]:
    """Assign every identity to exactly one of ``num_sites`` sites.

    Parameters
    ----------
    identities : sequence of str
        Identity names; order does not matter (they are sorted first).
    num_sites : int
        Number of sites.
    seed : int
        Partition seed; the same seed gives the same partition on every machine.
    scheme : {"iid", "dirichlet"}
        ``"iid"``: identities shuffled and dealt out evenly. ``"dirichlet"``: site shares of identities drawn
        from Dirichlet(alpha) (smaller alpha, more unequal sites), each site keeping at least ``min_per_site``.
    alpha : float
        Dirichlet concentration (used by ``"dirichlet"`` only).
    min_per_site : int
        Fewest identities any site may get.
    weights : dict, optional
        Images per identity. With ``"iid"`` the shuffled identities then go, one by one, to the site with the
        fewest images so far, so sites get about the same number of examples, not just of people.

    Returns
    -------
    list of list of str
        ``result[site]`` is the sorted list of that site's identities; the lists are disjoint and cover all.
    """
    names = sorted(identities)
    if num_sites < 1:
        raise ValueError(f"The number of sites must be at least 1; got {num_sites}.")
    if len(names) < num_sites * min_per_site:
        raise ValueError(
            f"{len(names)} identities cannot be split over {num_sites} sites with at least {min_per_site} "
            "each: use fewer sites or a larger dataset."
        )
    rng = _rng(seed, "partition", scheme, str(num_sites))
    order = rng.permutation(len(names))
    if scheme == "iid" and weights:
        sites_w: list[list[str]] = [[] for _ in range(num_sites)]
        totals = np.zeros(num_sites)
        for i in order:
            short = [j for j in range(num_sites) if len(sites_w[j]) < min_per_site]
            k = min(short or range(num_sites), key=lambda j: (totals[j], j))
            sites_w[k].append(names[i])
            totals[k] += weights.get(names[i], 1)
        return [sorted(x) for x in sites_w]
    if scheme == "iid":
        counts = np.full(num_sites, len(names) // num_sites)
        counts[: len(names) % num_sites] += 1
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"The Dirichlet alpha must be positive; got {alpha}.")
        spare = len(names) - num_sites * min_per_site
        shares = rng.dirichlet(np.full(num_sites, alpha))
        counts = np.floor(shares * spare).astype(int)
        counts[np.argsort(-(shares * spare - counts))[: spare - counts.sum()]] += 1
        counts += min_per_site
    else:
        raise ValueError(f"Unknown partition scheme {scheme!r}: use 'iid' or 'dirichlet'.")
    sites, start = [], 0
    for c in counts:
        sites.append(sorted(names[i] for i in order[start : start + int(c)]))
        start += int(c)
    return sites


def train_val_split(faces: FaceSet, val_fraction: float, seed: int) -> tuple[FaceSet, FaceSet]:
    """Split one site's images into train and validation, per identity.

    Every identity keeps at least one training image; an identity with three or more images gives about
    ``val_fraction`` of them (at least one when ``val_fraction > 0``) to validation, so validation measures
    recognition of people the site trains on. Labels are kept (not renumbered) in both halves.
    """
    rng = _rng(seed, "val-split")
    train_idx: list[int] = []
    val_idx: list[int] = []
    labels = faces.labels.numpy()
    for label in range(faces.num_identities):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = 0
        if val_fraction > 0 and len(idx) >= 3:
            n_val = max(1, int(round(val_fraction * len(idx))))
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    return (
        faces.subset(sorted(train_idx), relabel=False),
        faces.subset(sorted(val_idx), relabel=False),
    )


def make_pairs(faces: FaceSet, num_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build a balanced set of verification pairs (half same person, half different) from ``faces``.

    Returns index tensors ``a``, ``b`` into ``faces`` and a bool tensor ``same``.
    """
    rng = _rng(seed, "pairs")
    labels = faces.labels.numpy()
    by_label = [np.flatnonzero(labels == k) for k in range(faces.num_identities)]
    multi = [k for k, idx in enumerate(by_label) if len(idx) >= 2]
    if not multi or faces.num_identities < 2:
        raise ValueError("Verification pairs need at least two identities, one of them with two images.")
    half = num_pairs // 2
    a, b, same = [], [], []
    for _ in range(half):
        k = multi[rng.integers(len(multi))]
        i, j = rng.choice(by_label[k], size=2, replace=False)
        a.append(i), b.append(j), same.append(True)
    for _ in range(num_pairs - half):
        k1, k2 = rng.choice(faces.num_identities, size=2, replace=False)
        a.append(rng.choice(by_label[k1])), b.append(rng.choice(by_label[k2])), same.append(False)
    return torch.tensor(a), torch.tensor(b), torch.tensor(same)

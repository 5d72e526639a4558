"""What the server and the sites agree on for secure aggregation (Flower's SecAgg+), and its arithmetic.

SecAgg+ quantises each site's weighted update to integers in ``[0, Q]`` (``Q`` the quantisation range), adds masks
modulo ``M = 2**32`` and lets the server unmask only the sum over the sites. The sum of ``n`` sites must stay below
``M``, and Flower's quantiser stores values as int32, so ``Q`` is chosen from the number of sites:
``Q = min(2**30, M // (n + 1))``. The error this adds to the weighted mean is bounded by :func:`error_bound`.

Masks. Flower 1.42 expands every mask seed (32 random bytes, or a 32-byte Diffie-Hellman shared key) with
``numpy.random.RandomState`` after XOR-folding it to **32 bits**, so each mask is one of only 2**32 streams, and
RandomState's output reveals its state. A server that subtracts the masks it can reconstruct is left with a few
32-bit-seeded pairwise masks on an update whose quantised values it can nearly guess: a brute-force or
meet-in-the-middle search strips them. :func:`mask_stream` replaces that expansion, on both sides, with a ChaCha20
keystream keyed by SHA-256 of the whole seed; :func:`use_strong_masks` installs it in Flower's SecAgg+ modules.
"""

from __future__ import annotations

import hashlib
import importlib
import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEYS_CONFIG = "secagg-keys"  # fitins config: the names of the arrays, in order, one per line (legacy configs hold scalars)
WEIGHT_METRIC = "secagg-weight"  # a site's weight in the mean (its example count, capped; 0 when it declined)
MODULUS = 2**32


def quantization_range(num_sites: int) -> int:
    """The largest quantisation range for which the sum of ``num_sites`` quantised updates cannot wrap around."""
    return min(2**30, MODULUS // (max(1, num_sites) + 1))


def error_bound(num_sites: int, clip_range: float, max_weight: float, total_weight: float) -> float:
    """Bound on |secure mean - exact weighted mean| per coordinate, for updates inside ``[-clip, clip]``.

    Each site's weighted update ``(w_i / W) * u_i`` (``W`` = ``max_weight``) is rounded to one quantisation step
    ``2 clip / Q`` (stochastic rounding: at most one step), and its weight ``w_i / W`` is rounded to ``1 / Q``; the sum
    is divided by ``sum_i w_i / W``."""
    q = quantization_range(num_sites)
    step = 2.0 * clip_range / q
    weight_fraction = total_weight / max_weight
    return num_sites * (step + clip_range / q) / weight_fraction


def mask_stream(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks uniform in ``[0, num_range)`` (int64), one array per shape, from a ChaCha20 keystream keyed by
    SHA-256(seed): the drop-in for Flower's ``pseudo_rand_gen``. 64 bits are drawn per value, so the bias of the
    reduction is at most ``num_range / 2**64`` (none for ``2**32``)."""
    key = hashlib.sha256(b"facefl secagg+ mask v1\0" + bytes(seed)).digest()
    keystream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    out = []
    for dims in dimensions_list:
        count = math.prod(dims)
        raw = np.frombuffer(keystream.update(bytes(8 * count)), dtype="<u8")
        values = (raw % np.uint64(num_range)).astype(np.int64)
        out.append(values.reshape(dims) if dims else np.array(values[0], dtype=np.int64))
    return out


def use_strong_masks() -> None:
    """Make Flower's ``secaggplus_mod`` (sites) and ``SecAggPlusWorkflow`` (server) expand masks with
    :func:`mask_stream`. Both ends must do so (both run facefl's app); idempotent."""
    for module in ("flwr.client.mod.secure_aggregation.secaggplus_mod",  # (the package re-exports a function of
                   "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):  # the same name: go by module)
        importlib.import_module(module).pseudo_rand_gen = mask_stream

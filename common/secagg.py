"""What the server and the sites agree on for secure aggregation (Flower's SecAgg+), and its arithmetic.

SecAgg+ quantises each site's weighted update to integers in ``[0, Q]`` (``Q`` the quantisation range), adds masks
modulo ``M = 2**32`` and lets the server unmask only the sum over the sites. The sum of ``n`` sites must stay below
``M``, and Flower's quantiser stores values as int32, so ``Q`` is chosen from the number of sites:
``Q = min(2**30, M // (n + 1))``. The error this adds to the weighted mean is bounded by :func:`error_bound`.
"""

from __future__ import annotations

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

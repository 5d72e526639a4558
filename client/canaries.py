"""A site's canaries in training (the canary audit; the plan is ``common.canary_plan``).

Exactly what a canary changes in a site's round, and nothing else:
- the canaries' own Poisson draws (each included canary, at every step, with the site's sampling rate) come from the
  plan's generator, never from the one that samples the batches, draws the noise or augments the faces, so the real
  batches, their augmentation and the noise are those of the same run without canaries;
- under DP-SGD a sampled canary's gradient, clipped like any example's, is added to the sum of the clipped gradients
  before the noise; the noise and the division by the expected batch size are unchanged (canaries are not counted in
  the site's N, its sampling rate or its delta); a gradient canary is added to the step even when the real batch
  happens to be empty;
- without DP a sampled canary's gradient is added to the batch's mean gradient with the weight 1 / B of one of the B
  real examples (an input canary's loss is added to the batch's loss sum before dividing by B).
The margin head and the metrics see the canaries only through those gradients (accuracy and loss are reported on the
real examples; the loss of a batch with input canaries includes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.canary_plan import GradientCanaries, InputCanaries


@dataclass(frozen=True)
class SiteCanaries:
    """What a site inserts in one round: its planned canaries, their raw gradient norm and the round's generator."""

    gradient: GradientCanaries | None
    inputs: InputCanaries | None
    raw_norm: float  # canary-norm * max-grad-norm: a gradient canary's norm before clipping
    generator: torch.Generator


class CanaryInjector:
    """Draws each step's canaries and adds their gradients (see the module docstring)."""

    def __init__(self, canaries: SiteCanaries, backbone: nn.Module, sample_rate: float, *,
                 clip: float | None) -> None:
        self.canaries, self.sample_rate, self.clip = canaries, float(sample_rate), clip
        self.gen = canaries.generator
        grad = canaries.gradient
        self._grad_parts: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._grad_included = 0
        if grad is not None:
            params = dict(backbone.named_parameters())
            keep = torch.nonzero(grad.included).flatten()
            self._grad_order = keep
            self._grad_included = len(keep)
            for k, name in enumerate(grad.names):
                rows = torch.nonzero(grad.param[keep] == k).flatten()
                if len(rows):
                    self._grad_parts.append((params[name], rows, keep[rows]))
        self._input_index = (torch.nonzero(canaries.inputs.included).flatten() if canaries.inputs is not None
                             else torch.zeros(0, dtype=torch.long))

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's sampled canaries: (bool mask over the included gradient canaries, indices of input canaries)."""
        grad = torch.rand(self._grad_included, generator=self.gen) < self.sample_rate
        inputs = self._input_index[torch.rand(len(self._input_index), generator=self.gen) < self.sample_rate]
        return grad, inputs

    def add_gradients(self, sampled: torch.Tensor, *, real_batch: int) -> None:
        """Add the sampled gradient canaries to ``.grad``: clipped, as a summand under DP (``clip`` set), or with
        weight 1 / ``real_batch`` without DP."""
        if not bool(sampled.any()):
            return
        grad = self.canaries.gradient
        norm = self.canaries.raw_norm
        value = min(norm, self.clip) if self.clip is not None else norm / max(1, real_batch)
        for param, rows, canary in self._grad_parts:
            chosen = sampled[rows]
            if not bool(chosen.any()):
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            flat = param.grad.view(-1)
            flat.index_add_(0, grad.index[canary[chosen]], (grad.sign[canary[chosen]] * value).to(flat.dtype))

    def input_batch(self, inputs: torch.Tensor, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled input canaries as network inputs (``inputs``: all canaries' inputs) and their labels."""
        return inputs[sampled], self.canaries.inputs.labels[sampled]


def planned_canaries(cfg, site_index: int, server_round: int, num_identities: int,
                     backbone: nn.Module) -> SiteCanaries | None:
    """Simulated site ``site_index``'s canaries for round ``server_round`` when the run config asks for any."""
    from common.canary_plan import gradient_canaries, input_canaries, step_generator, trainable_shapes

    if not (cfg.canary_gradients or cfg.canary_inputs):
        return None
    grad = (gradient_canaries(trainable_shapes(backbone), site_index=site_index, per_site=cfg.canary_gradients,
                              seed=cfg.canary_seed) if cfg.canary_gradients else None)
    inputs = (input_canaries(site_index=site_index, per_site=cfg.canary_inputs, num_identities=num_identities,
                             image_size=cfg.image_size, seed=cfg.canary_seed) if cfg.canary_inputs else None)
    return SiteCanaries(grad, inputs, cfg.canary_norm * cfg.max_grad_norm,
                        step_generator(cfg.canary_seed, site_index, server_round))

"""Optimizer, learning-rate schedule and EMA for STIV training (docs/recipe.md "Training").

AdaFactor: the paper trained with AdaFactor at beta1 = 0.9, beta2 = 0.999 and no weight decay.
No library optimizer matches: `torch.optim.Adafactor` has no first moment and a decaying beta2,
and the paper does not say which variant it used. Our choice, documented here:
- second moment: an EMA with constant beta2 (0.999) of g^2 + eps1, bias-corrected like Adam,
  *factored* into row and column statistics for tensors with >= 2 dimensions (Shazeer & Stern
  2018, sec. 3, viewing a tensor as (shape[0], rest)) and kept whole for 1-D tensors;
- update clipping: the normalised update u = g / sqrt(v) is scaled down to RMS <= 1 (sec. 6);
- first moment: an EMA with beta1 (0.9) of the clipped update, as optax/AXLearn's AdaFactor on
  TPUs applies momentum (the paper trained on TPUs);
- the step is an absolute learning rate (no relative step size, no parameter-scale factor), so
  the recipe's 2e-4 means what it says.

Under DeepSpeed ZeRO-1/2 the optimizer only ever sees flat 1-D partitions, so the factoring
cannot apply there (docs/design-notes.md "AdaFactor under ZeRO"): `optimizer_state_bytes`
measures what each choice costs.
Update clipping would then span a whole partition, whose size depends on the number of ranks,
so the same run would take different steps on 1 and on 4 ranks. `attach_zero_partitions`
tells the optimizer where each parameter lies in its partition; the RMS is then taken per
parameter, summed over the ranks that hold its pieces (one all-reduce of one value per
parameter per step), and ZeRO-2 on any number of ranks takes the unfactored AdaFactor step of
the unpartitioned model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class FlatPartition:
    """Where the model's parameters lie in one rank's flat ZeRO partition."""

    lengths: list[int]  # elements of each consecutive piece of the partition
    param_ids: list[int]  # the model parameter each piece belongs to (-1 = alignment padding)
    param_numel: list[int]  # elements of every model parameter (the RMS denominator)
    process_group: Any = None  # ranks sharing the partitions (None = the default group)


class AdaFactor(torch.optim.Optimizer):
    """AdaFactor with momentum (see the module docstring for the exact variant)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 2e-4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps1: float = 1e-30,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        factored: bool = True,
    ) -> None:
        if not 0.0 <= beta1 < 1.0 or not 0.0 < beta2 < 1.0:
            raise ValueError("optimizer.beta1/beta2: must be in [0, 1)")
        defaults = {
            "lr": lr,
            "beta1": beta1,
            "beta2": beta2,
            "eps1": eps1,
            "clip_threshold": clip_threshold,
            "weight_decay": weight_decay,
            "factored": factored,
        }
        super().__init__(params, defaults)
        # (group index, param index) -> FlatPartition, set by attach_zero_partitions.
        self.flat_partitions: dict[tuple[int, int], FlatPartition] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group_index, group in enumerate(self.param_groups):
            for param_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                factored = group["factored"] and p.dim() >= 2
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    if factored:
                        rows, cols = p.shape[0], p.numel() // p.shape[0]
                        state["exp_avg_sq_row"] = torch.zeros(rows, device=p.device)
                        state["exp_avg_sq_col"] = torch.zeros(cols, device=p.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                beta1, beta2 = group["beta1"], group["beta2"]
                correction = 1.0 - beta2 ** state["step"]
                sq = grad.square().add_(group["eps1"])
                if factored:
                    sq2 = sq.reshape(p.shape[0], -1)
                    g2 = grad.reshape(p.shape[0], -1)
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2).add_(sq2.mean(dim=1), alpha=1 - beta2)
                    col.mul_(beta2).add_(sq2.mean(dim=0), alpha=1 - beta2)
                    # Rank-1 reconstruction v ~ r c^T / mean(r) (Shazeer & Stern 2018, alg. 4).
                    r_factor = (row / row.mean()).rsqrt().unsqueeze(1)
                    c_factor = (col / correction).rsqrt().unsqueeze(0)
                    update = (g2 * r_factor * c_factor).reshape(p.shape)
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(beta2).add_(sq, alpha=1 - beta2)
                    update = grad * (v / correction).rsqrt()
                # Update clipping: RMS(u) <= d (sec. 6), per parameter.
                flat = self.flat_partitions.get((group_index, param_index))
                if flat is None:
                    rms = update.square().mean().sqrt().item()
                    update.div_(max(1.0, rms / group["clip_threshold"]))
                else:
                    _clip_per_parameter(update, flat, group["clip_threshold"])
                m = state["exp_avg"]
                m.mul_(beta1).add_(update, alpha=1 - beta1)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(m.to(p.dtype), alpha=-group["lr"])
        return loss


def _clip_per_parameter(update: torch.Tensor, flat: FlatPartition, threshold: float) -> None:
    """Update clipping on a flat partition with each parameter's own RMS over all ranks."""
    import torch.distributed as dist

    num_params = len(flat.param_numel)
    pieces = update.split(flat.lengths)
    sums = torch.zeros(num_params + 1, dtype=torch.float64, device=update.device)
    ids = torch.tensor([i if i >= 0 else num_params for i in flat.param_ids], device=update.device)
    sums.index_add_(0, ids, torch.stack([piece.double().square().sum() for piece in pieces]))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, group=flat.process_group)  # a parameter may span two ranks
    numel = torch.tensor([*flat.param_numel, 1], dtype=torch.float64, device=update.device)
    rms = (sums / numel).sqrt()
    factor = (rms / threshold).clamp(min=1.0)[ids].to(update.dtype)
    lengths = torch.tensor(flat.lengths, device=update.device)
    update.div_(torch.repeat_interleave(factor, lengths))


def zero_partitions(zero_optimizer: Any, model: torch.nn.Module) -> list[FlatPartition]:
    """One FlatPartition per parameter group of a DeepSpeed ZeRO-1/2 optimizer, read from the
    layout it flattened the group into (parameters in order, each followed by its alignment
    padding) and this rank's slice [rank * size, (rank + 1) * size) of it."""
    import torch.distributed as dist

    index = {id(p): i for i, p in enumerate(model.parameters())}
    numel = [p.numel() for p in model.parameters()]
    partitions = []
    for i, tensors in enumerate(zero_optimizer.round_robin_bit16_groups):
        group = zero_optimizer.real_dp_process_group[i]
        size = zero_optimizer.partition_size[i]
        start = size * dist.get_rank(group=group)
        end = start + size
        paddings = zero_optimizer.round_robin_bit16_padding[i] or [0] * len(tensors)
        lengths, ids, cursor, position = [], [], start, 0
        for tensor, padding in zip(tensors, paddings):
            for first, last, pid in (
                (position, position + tensor.numel(), index[id(tensor)]),
                (position + tensor.numel(), position + tensor.numel() + padding, -1),
            ):
                lo, hi = max(first, start), min(last, end)
                if lo < hi:
                    lengths.append(hi - lo)
                    ids.append(pid)
                    cursor = hi
            position += tensor.numel() + padding
        if cursor < end:  # the group's tail padding
            lengths.append(end - cursor)
            ids.append(-1)
        partitions.append(FlatPartition(lengths, ids, numel, group))
    return partitions


def attach_zero_partitions(zero_optimizer: Any, model: torch.nn.Module) -> bool:
    """Make the AdaFactor inside a DeepSpeed ZeRO-1/2 optimizer clip per parameter (see the
    module docstring); False when there is nothing to attach (another optimizer, no ZeRO)."""
    inner = getattr(zero_optimizer, "optimizer", None)
    if not isinstance(inner, AdaFactor) or not hasattr(zero_optimizer, "round_robin_bit16_groups"):
        return False
    for i, flat in enumerate(zero_partitions(zero_optimizer, model)):
        (partition,) = inner.param_groups[i]["params"]
        if sum(flat.lengths) != partition.numel():
            raise RuntimeError(
                f"ZeRO partition layout: {sum(flat.lengths)} elements mapped, "
                f"{partition.numel()} in the partition"
            )
        inner.flat_partitions[(i, 0)] = flat
    return True


def build_optimizer(
    params: Iterable[torch.Tensor],
    name: str,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    factored: bool = True,
) -> torch.optim.Optimizer:
    """`adafactor` (ours, above) or `adamw` (torch, for comparison)."""
    if name == "adafactor":
        return AdaFactor(
            params, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, factored=factored
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    raise ValueError(f"optimizer.name: unknown optimizer {name!r} (adafactor | adamw)")


def warmup_constant(warmup_steps: int):
    """Linear warm-up to the base LR over `warmup_steps`, then constant (STIV: 1k steps)."""

    def factor(step: int) -> float:
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    return factor


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state tensors (moments, factors)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


class EMA:
    """fp32 exponential moving average of the weights (STIV: decay 0.9999).

    Kept in fp32 even when training in bf16 (docs/design-notes.md "Precision"). With
    `warmup`, the decay ramps as
    min(decay, (1 + step) / (10 + step)) so short CPU runs get a useful average; the paper-scale
    configs use the plain decay."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError("ema_decay: must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if value.is_floating_point():
                shadow.mul_(decay).add_(value.detach().float(), alpha=1 - decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA checkpoint lacks {sorted(missing)[:3]}")
        self.shadow = {k: state[k].float().clone() for k in self.shadow}


def analytic_optimizer_bytes(shapes: list[tuple[int, ...]], option: str, world_size: int) -> int:
    """Per-rank optimizer-state bytes (fp32) predicted for a model with these parameter shapes.

    Options: `adafactor-factored` (no partitioning: momentum + row/col factors),
    `adafactor-zero2` (flat partitions: momentum + full second moment, divided over ranks),
    `adamw-zero2` (the same size as AdaFactor unfactored), `adamw-replicated`."""
    numel = sum(math.prod(s) for s in shapes)
    factors = sum((s[0] + math.prod(s) // s[0]) if len(s) >= 2 else math.prod(s) for s in shapes)
    if option == "adafactor-factored":
        return 4 * (numel + factors)
    if option in ("adafactor-zero2", "adamw-zero2"):
        return 4 * 2 * math.ceil(numel / world_size)
    if option == "adamw-replicated":
        return 4 * 2 * numel
    raise ValueError(f"unknown option {option!r}")

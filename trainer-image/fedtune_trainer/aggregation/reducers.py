"""Step 3 of an aggregation round: the accepted, weighed deltas reduced to one update.

The weighted mean (fedavg and the server optimizers) is folded during `collect`'s checking
decode when nothing changes a client's factor afterwards (`FirstPass`), and otherwise streamed
again from the verified files on disk; median and trimmed mean go tensor by tensor across the
clients; Krum and Multi-Krum select by streamed pairwise distances; the exact LoRA merge
re-factorises layer by layer. Memory is bounded by the adapter, never by the number of clients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from fedtune_trainer.adapter import exact
from fedtune_trainer.aggregation import bounds
from fedtune_trainer.aggregation.bounds import check_weight
from fedtune_trainer.aggregation.intake import Accepted
from fedtune_trainer.aggregation.robust import krum_select, pairwise_distances, robust_reduce
from fedtune_trainer.wire.errors import QuorumError
from fedtune_trainer.wire.settings import KRUM_QUORUM, krum_min_clients
from fedtune_trainer.wire.task import AggregateTask

Log = Callable[[str], None]


@dataclass
class WeightedMean:
    """A streaming weighted mean: memory is one float64 accumulator per tensor (2x the adapter's
    fp32 size), whatever the number of clients.

    Accumulates in float64 so that the order clients arrive in does not change the result beyond
    the final fp32 rounding.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    total_weight: float = 0.0
    count: int = 0

    def add(self, delta: Mapping[str, torch.Tensor], weight: float, scale: float = 1.0) -> None:
        """Add `weight * scale * delta`; the mean divides by the sum of the weights alone.

        `scale` is a clip: it shrinks a delta, not its client's say in the mean. `delta` may be
        lazy (each tensor decoded when it is read): it is read once, in name order, and each
        tensor is folded in place into its float64 sum, so one decoded tensor is held at a time.
        """
        check_weight(weight)
        for name in sorted(delta):
            self.add_tensor(name, delta[name], weight * scale)
        self.count_client(weight)

    def add_tensor(self, name: str, t: torch.Tensor, factor: float) -> None:
        """Fold `factor * t` into the sum of `name` (one tensor of a client's delta)."""
        acc = self.sums.get(name)
        if acc is None:
            self.sums[name] = t.to(torch.float64).mul_(factor)
        else:
            acc.add_(t, alpha=factor)

    def count_client(self, weight: float) -> None:
        """Count a client whose tensors were all folded in, with its `weight` in the divisor."""
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The mean, fp32. Consumes the sums tensor by tensor, so that the float64 sums and the
        fp32 result are never both held whole: call it once."""
        if self.count == 0:
            raise ValueError("no deltas to average")
        return {
            name: self.sums.pop(name).div_(self.total_weight).float() for name in sorted(self.sums)
        }


@dataclass
class FirstPass:
    """The weighted mean folded while `collect` checks each delta, from that one decode.

    It guesses that every delta enters the mean at its raw weight, unscaled, which is what
    happens in a round without a share cap, an outlier clip or a DP clip, and then saves the
    reduce step a second decode of every delta (the cost that made streaming slower than loading
    everything). When the guess fails (`weigh` changed a factor, or a delta was rejected after
    some of its tensors were folded in) the mean is taken again from the verified files on disk:
    never corrected by subtraction, which would cancel catastrophically against a huge delta.
    """

    mean: WeightedMean = field(default_factory=WeightedMean)
    factors: dict[str, float] = field(default_factory=dict)
    spoiled: bool = False

    def fold(self, weight: float) -> Callable[[str, torch.Tensor], None]:
        """The per-tensor hook for `checked_norm` while one client's delta is checked."""
        bounds.check_weight(weight)

        def add(name: str, t: torch.Tensor) -> None:
            self.spoiled = True  # a part of a delta is in the sums until `done` says it is whole
            self.mean.add_tensor(name, t, weight)

        return add

    def done(self, client: str, weight: float) -> None:
        """`client`'s delta is accepted and every tensor of it was folded in at `weight`."""
        self.mean.count_client(weight)
        self.factors[client] = weight
        self.spoiled = False

    def result(self, accepted: list[Accepted]) -> dict[str, torch.Tensor] | None:
        """The mean, if the guess held for exactly these weighed deltas (else None)."""
        if self.spoiled or self.factors != {a.client: a.weight * a.scale for a in accepted}:
            return None
        return self.mean.result()


def reduce_mean(
    accepted: list[Accepted], first: FirstPass | None = None, log: Log | None = None
) -> dict[str, torch.Tensor]:
    """Step 3 for the mean-based rules: the mean `collect` folded, if its guess held; otherwise
    client by client from disk, tensor by tensor (memory: a float64 accumulator, 2x the
    adapter, and one decoded tensor)."""
    if first is not None:
        if (folded := first.result(accepted)) is not None:
            return folded
        first.mean.sums.clear()  # free the guess before the second pass builds its own
        if log is not None:
            log("decoding the deltas again: a clip, a share cap or a late rejection changed it")
    mean = WeightedMean()
    for a in accepted:
        mean.add(a.delta(), a.weight, a.scale)
    return mean.result()


def reduce_robust(
    accepted: list[Accepted], shapes: Mapping[str, tuple[int, ...]], task: AggregateTask
) -> dict[str, torch.Tensor]:
    """Step 3 for median and trimmed mean: one tensor at a time across all clients."""
    readers = [a.tensors() for a in accepted]
    out = {}
    for name in sorted(shapes):
        stack = torch.stack([tensor(name) for tensor in readers])
        out[name] = robust_reduce(stack, task.aggregation)
        del stack
    return out


def reduce_krum(
    task: AggregateTask, accepted: list[Accepted], shapes: Mapping[str, tuple[int, ...]], log: Log
) -> tuple[list[Accepted], dict[str, torch.Tensor]]:
    """Step 3 for krum/multiKrum: select by distances, then the unweighted mean of the selected."""
    spec, n = task.aggregation, len(accepted)
    f = spec.byzantine_clients
    if n < (need := krum_min_clients(f)):
        raise QuorumError(
            f"round {task.round}: {spec.algorithm} with byzantineClients {f} needs at least "
            f"{KRUM_QUORUM} = {need} valid deltas, got {n}"
        )
    m = 1 if spec.algorithm == "krum" else (spec.multi_krum_selected or n - f)
    chosen = set(krum_select(pairwise_distances(accepted, shapes), f, m))
    items = [
        replace(
            a, selected=i in chosen, weight=float(i in chosen), share=(i in chosen) / len(chosen)
        )
        for i, a in enumerate(accepted)
    ]
    log(f"{spec.algorithm} selected {', '.join(a.client for a in items if a.selected)}")
    return items, reduce_mean([a for a in items if a.selected])


def reduce_exact(
    task: AggregateTask,
    accepted: list[Accepted],
    global_tensors: Mapping[str, torch.Tensor],
    names: list[str],
) -> tuple[dict[str, torch.Tensor], exact.Truncation]:
    """Steps 3 and 5 for aggregation.lora exact (fedavg only): the new global, layer by layer.

    Each LoRA layer's target, the weighted mean of the clients' products moved by the server
    learning rate, is re-factorised to rank r by `exact.factorise` (memory: one layer's factors
    of every client, never a dense out x in matrix); tensors outside LoRA pairs (biases) take
    the plain weighted mean.
    """
    total = sum(a.weight for a in accepted)
    readers = [(a.weight / total, a.tensors()) for a in accepted]
    lr = task.aggregation.server_learning_rate
    new_global = {n: t.clone() for n, t in global_tensors.items()}
    layers = []
    pairs = exact.lora_pairs(names)
    for a_name, b_name in pairs:
        clients = [(w, tensor(b_name), tensor(a_name)) for w, tensor in readers]
        terms = exact.layer_terms(global_tensors[b_name], global_tensors[a_name], clients, lr)
        layer = exact.factorise(terms, global_tensors[a_name].shape[0])
        new_global[b_name], new_global[a_name] = layer.b.float(), layer.a.float()
        layers.append(layer)
    paired = {n for pair in pairs for n in pair}
    if others := [n for n in names if n not in paired]:
        mean = WeightedMean()
        for w, tensor in readers:
            mean.add({n: tensor(n) for n in others}, w)
        for n, d in mean.result().items():
            new_global[n] = (global_tensors[n].double() + lr * d.double()).float()
    return new_global, exact.Truncation.of(layers)

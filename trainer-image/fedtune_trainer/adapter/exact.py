"""Exact LoRA aggregation (aggregation.lora: exact): average the clients' products B_i A_i, not
B and A separately, and re-factorise the mean into the global rank-r adapter. Pure math.

Why: the mean of the factors is not the factor of the mean, mean(B_i) mean(A_i) != mean(B_i A_i),
so averaging A and B separately (aggregation.lora: separate) merges something no client trained.
FFA-LoRA (adapter.freezeA) makes it exact by never training A; this mode keeps A trainable.

What it follows: FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024): the server forms the weighted mean of
the clients' full low-rank updates and truncates it back to the global rank by SVD, which also
lets clients train at different ranks (a client of rank r_i < r starts from the top r_i singular
directions of the global, `at_rank`). FedEx-LoRA (Singhal et al., 2024) avoids the truncation
by folding the residual into the frozen base weights; a PEFT adapter cannot carry such a
residual, so here the truncation stays and its error is reported per round.

For one LoRA layer, with s = alpha / r the PEFT scaling, w_i the normalised client weights, eta
the server learning rate and client i's local factors B_i = B_g|r_i + dB_i, A_i = A_g|r_i + dA_i
(each at its own rank r_i and scaling s_i = alpha / r_i):

    target  T = (1 - eta) s B_g A_g + eta sum_i w_i s_i B_i A_i      (dense out x in, never formed)
    global  s B' A' = the best rank-r approximation of T (Eckart-Young), by SVD

with eta = 1 (fedavg) T is the plain weighted mean of the clients' adapted products. The factor
split is FlexLoRA's: B' = U_r Sigma_r / s, A' = V_r^T. A keeps orthonormal rows, about the scale
of PEFT's Kaiming initialisation of A, so the gradient of B (proportional to A) does not vanish;
a balanced split sqrt(Sigma) would shrink both factors while the update is small, and each
factor's gradient is proportional to the other. Directions the target lacks (sigma = 0) keep a
unit A row and a zero B column, exactly like PEFT's initial adapter, so they stay trainable.

How, without a dense matrix: T = Bc Ac with Bc = [c_k B_k] (out x R) and Ac = [A_k] (R x in),
R = r + sum r_i. QR of Bc and of Ac^T gives T = Qb (Rb Ra^T) Qa^T with orthonormal Qb, Qa, so the
singular values of T are those of the R x R core Rb Ra^T, and its singular vectors are Qb and Qa
times the core's. Memory is O((out + in) R) per layer in float64, never out x in; exact up to
float64 rounding (no randomised sketch, unlike svd_lowrank).

What the truncation loses: every singular direction of T beyond the r-th. Its relative Frobenius
norm, sqrt(sum_{j>r} sigma_j^2 / sum_j sigma_j^2), is each layer's truncation error; it is 0 when
T has rank <= r (e.g. a single client at the global rank, or every client's update in a common
r-dimensional subspace).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

LORA_A = ".lora_A."
LORA_B = ".lora_B."


def lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(lora_A name, lora_B name) of every LoRA layer in `names`, sorted by the A name."""
    names_set = set(names)
    pairs = []
    for a in sorted(n for n in names if LORA_A in n):
        b = a.replace(LORA_A, LORA_B)
        if b not in names_set:
            raise ValueError(f"{a} has no matching {b}")
        pairs.append((a, b))
    return pairs


def rank_of(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The LoRA rank of an adapter: the rows of its lora_A tensors (None without any)."""
    ranks = {t.shape[0] for n, t in tensors.items() if LORA_A in n}
    if len(ranks) > 1:
        raise ValueError(f"mixed LoRA ranks in one adapter: {sorted(ranks)}")
    return ranks.pop() if ranks else None


def at_rank(tensors: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """The global adapter as a client of rank `r` starts from: its top-r singular directions.

    The exact mode's global factors are SVD-ordered (column j of B and row j of A carry the j-th
    singular value), so the best rank-r approximation is the first r of each. B is scaled by
    r / r_global so that the client's PEFT scaling alpha / r gives the same product as the
    global's alpha / r_global. A rank at or above the adapter's returns it unchanged.
    """
    r_global = rank_of(tensors)
    if r_global is None or r >= r_global:
        return dict(tensors)
    out = {}
    for name, t in tensors.items():
        if LORA_A in name:
            out[name] = t[:r].clone()
        elif LORA_B in name:
            out[name] = t[:, :r] * (r / r_global)
        else:
            out[name] = t
    return out


def shapes_at_rank(
    shapes: Mapping[str, tuple[int, ...]], r: int | None
) -> dict[str, tuple[int, ...]]:
    """The shapes of a rank-r client's tensors, given the global adapter's (None: the same)."""
    if r is None:
        return dict(shapes)
    out = {}
    for name, shape in shapes.items():
        if LORA_A in name:
            out[name] = (r, *shape[1:])
        elif LORA_B in name:
            out[name] = (shape[0], r, *shape[2:])
        else:
            out[name] = tuple(shape)
    return out


@dataclass(frozen=True)
class Factorised:
    """One layer's new global factors and what the truncation to rank r dropped."""

    b: torch.Tensor
    a: torch.Tensor
    dropped_sq: float
    """sum of sigma_j^2 beyond rank r: the squared Frobenius norm of what was cut."""
    total_sq: float
    """||T||_F^2, the target's squared Frobenius norm."""

    @property
    def error(self) -> float:
        """Relative Frobenius norm of the truncation: ||T - T_r||_F / ||T||_F (0 for T = 0)."""
        return math.sqrt(self.dropped_sq / self.total_sq) if self.total_sq > 0 else 0.0


def factorise(terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]], r: int) -> Factorised:
    """The rank-r truncated SVD of T = sum_k c_k B_k A_k, as B' = U_r Sigma_r, A' = V_r^T.

    `terms` are (c_k, B_k out x r_k, A_k r_k x in); terms of coefficient 0 still lend their A's
    row space, which keeps every row of A' a unit vector even when T has rank < r. Signs are
    fixed (each row of A' has its largest-magnitude entry positive) so that the result does not
    depend on the LAPACK build's choice of singular-vector signs. Returns float64 factors.
    """
    bc = torch.cat([c * b.double() for c, b, _ in terms], dim=1)
    ac = torch.cat([a.double() for _, _, a in terms], dim=0)
    qb, rb = torch.linalg.qr(bc, mode="reduced")
    qa, ra = torch.linalg.qr(ac.T, mode="reduced")
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    if s.numel() < r:
        raise ValueError(f"cannot factorise to rank {r}: the layer has only {s.numel()} dims")
    b = (qb @ u[:, :r]) * s[:r]
    a = vh[:r] @ qa.T
    sign = torch.sign(a.gather(1, a.abs().argmax(dim=1, keepdim=True)))
    sign[sign == 0] = 1
    s2 = s.pow(2)
    return Factorised(
        b=b * sign.T, a=a * sign, dropped_sq=float(s2[r:].sum()), total_sq=float(s2.sum())
    )


def layer_terms(
    global_b: torch.Tensor,
    global_a: torch.Tensor,
    clients: Sequence[tuple[float, torch.Tensor, torch.Tensor]],
    server_lr: float,
) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """The terms of one layer's target in units of the global scaling s = alpha / r.

    `clients` are (w_i, dB_i, dA_i) with normalised weights; a client's rank r_i is read from its
    deltas, its start is `at_rank(global, r_i)` and its product carries s_i / s = r / r_i.
    """
    r = global_a.shape[0]
    terms = [(1.0 - server_lr, global_b, global_a)]
    for w, db, da in clients:
        r_i = da.shape[0]
        b0 = global_b[:, :r_i].double() * (r_i / r)
        a0 = global_a[:r_i].double()
        terms.append((server_lr * w * r / r_i, b0 + db.double(), a0 + da.double()))
    return terms


@dataclass(frozen=True)
class Truncation:
    """A round's truncation error over its layers, for the round record."""

    max: float
    """The largest layer's relative error."""
    total: float
    """sqrt(sum of dropped / sum of targets) over all layers: the error of the adapter whole."""

    @staticmethod
    def of(layers: Sequence[Factorised]) -> Truncation:
        dropped = sum(f.dropped_sq for f in layers)
        total = sum(f.total_sq for f in layers)
        return Truncation(
            max=max((f.error for f in layers), default=0.0),
            total=math.sqrt(dropped / total) if total > 0 else 0.0,
        )

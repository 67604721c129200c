"""Client drift control: FedProx's proximal term and SCAFFOLD's control variates.

Both act on the gradient of one optimizer step (`Drift.apply`), after accumulation and after
the data-parallel all-reduce, on the unscaled gradient, before clipping. On the gradient, not
in the loss: the loss is divided by the step's label tokens and summed over micro-batches and
processes, so a term in the loss would need that same bookkeeping to be counted once; added
to the reduced gradient it is counted exactly once per optimizer step, on every process alike
(so they stay bit-identical), whatever the accumulation or the number of processes.

FedProx (Li et al. 2020): the gradient of mu/2 ||w - w_global||^2 is mu (w - w_global).

SCAFFOLD (Karimireddy et al. 2020): every local step uses g - c_i + c. The analysis is for
SGD; with AdamW the corrected gradient is what AdamW is fed (its moments included). The
client's new control is the mean of its raw (uncorrected) gradients over the round's steps.
That is option II exactly under SGD: y = x - eta sum_k (g_k - c_i + c), so
c_i - c + (x - y) / (K eta) = mean_k g_k (tests/trainer/test_drift.py holds the two equal);
under AdamW option II's displacement would be in the optimizer's units (about lr per step
whatever the gradient's size), which the correction, added to a gradient, must not be.

The client uploads dc_i = c_i+ - c_i encoded by the run's codec (lossy settings included) and
keeps c_i + decode(dc_i), what the server saw, so that c stays the mean of the c_i without a
residual of its own. The server keeps c += |S|/N mean(dc_i). Both are stored by round, like
the error-feedback residual: round r reads the newest version before r and writes version r,
so a rerun of r reads the same inputs and overwrites the same output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from fedtune_trainer.adapter import lora
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.layout import control_prefix

CONTROL_FILE = "control.safetensors"
Tensors = dict[str, torch.Tensor]


@dataclass
class Drift:
    """The per-step gradient corrections of one client round, on the parameters' device."""

    params: dict[str, torch.nn.Parameter]
    mu: float = 0.0
    anchor: Tensors | None = None
    """The global adapter's values (FedProx)."""
    correction: Tensors | None = None
    """c - c_i (SCAFFOLD)."""
    grad_sum: Tensors | None = None
    """The raw gradients summed over the steps (SCAFFOLD's new control)."""
    steps: int = field(default=0)

    @classmethod
    def create(
        cls,
        params: Mapping[str, torch.nn.Parameter],
        mu: float = 0.0,
        server: Mapping[str, torch.Tensor] | None = None,
        own: Mapping[str, torch.Tensor] | None = None,
        scaffold: bool = False,
    ) -> Drift | None:
        """None when there is nothing to correct (training then runs exactly as without)."""
        if mu == 0 and not scaffold:
            return None
        params = dict(params)
        anchor = {n: p.detach().clone() for n, p in params.items()} if mu else None
        correction = grad_sum = None
        if scaffold:
            # At least fp32, whatever the parameter's dtype (the tests' references are fp64).
            wide = {n: torch.promote_types(p.dtype, torch.float32) for n, p in params.items()}
            zero = {n: torch.zeros_like(p, dtype=wide[n]) for n, p in params.items()}
            server, own = server or zero, own or zero
            correction = {
                n: (server[n].to(p.device, wide[n]) - own[n].to(p.device, wide[n])).to(p.dtype)
                for n, p in params.items()
            }
            grad_sum = {n: torch.zeros_like(p, dtype=wide[n]) for n, p in params.items()}
        return cls(params, mu, anchor, correction, grad_sum)

    @torch.no_grad()
    def apply(self) -> None:
        """Correct this step's (reduced, unscaled) gradients in place; once per optimizer step."""
        for name, p in self.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.grad_sum is not None:
                self.grad_sum[name] += p.grad
            if self.anchor is not None:
                p.grad.add_(p.detach() - self.anchor[name], alpha=self.mu)
            if self.correction is not None:
                p.grad.add_(self.correction[name])
        self.steps += 1

    def new_control(self) -> Tensors:
        """c_i+ = the mean raw gradient of the round (option II under SGD), fp32 on the CPU."""
        assert self.grad_sum is not None, "not a SCAFFOLD round"
        return {n: (g / max(1, self.steps)).float().cpu() for n, g in self.grad_sum.items()}


# --------------------------------------------------------------------------------------------
# The math of the control variates (pure)
# --------------------------------------------------------------------------------------------


def control_change(
    new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor] | None
) -> Tensors:
    """dc_i = c_i+ - c_i (c_i = 0 before a client's first round)."""
    return {n: t - old[n] if old is not None else t.clone() for n, t in new.items()}


def kept_control(
    old: Mapping[str, torch.Tensor] | None, sent: Mapping[str, torch.Tensor]
) -> Tensors:
    """What the client keeps: c_i + what the server will decode of dc_i."""
    return {n: old[n] + t if old is not None else t.clone() for n, t in sent.items()}


def server_control(
    old: Mapping[str, torch.Tensor] | None,
    changes: Iterable[Callable[[str], torch.Tensor]],
    shapes: Mapping[str, tuple[int, ...]],
    total: int,
) -> Tensors:
    """c + |S|/N mean_S(dc_i) = c + sum_S(dc_i) / N, streamed one client at a time (float64)."""
    acc = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
    for change in changes:
        for n in shapes:
            acc[n] += change(n).double()
    out = {}
    for n in sorted(shapes):
        base = old[n].double() if old is not None else 0.0
        out[n] = (base + acc[n] / total).float()
    return out


# --------------------------------------------------------------------------------------------
# Storage: versioned by round, like the error-feedback residual
# --------------------------------------------------------------------------------------------


def read_control(
    store: st.Store, round_: int, client: str | None = None
) -> tuple[int | None, Tensors | None]:
    """The newest control (the server's, or `client`'s) committed before `round_`."""
    prefix = control_prefix(client)
    version = st.latest_version_before(store, prefix, round_)
    if version is None:
        return None, None
    _, files = st.read_committed(store, st.versioned_prefix(prefix, version), [CONTROL_FILE])
    return version, lora.parse_weights(files[CONTROL_FILE])


def write_control(
    store: st.Store,
    run: str,
    round_: int,
    control: Mapping[str, torch.Tensor],
    previous: int | None,
    client: str | None = None,
) -> None:
    """Commit round `round_`'s control; drop the versions no rerun can read any more."""
    prefix = control_prefix(client)
    meta = {"kind": "control", "run": run, "round": round_, "client": client or "server"}
    st.commit(
        store,
        st.versioned_prefix(prefix, round_),
        {CONTROL_FILE: lora.weights_bytes(control)},
        meta,
    )
    if previous is not None:
        st.prune_versions_before(store, prefix, previous)

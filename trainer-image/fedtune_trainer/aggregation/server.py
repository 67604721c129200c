"""The server step: the rule that turns the round's reduced delta into the next global adapter,
with its optimizer state versioned by round.

Conventions: a client delta is `local - global` (a negative pseudo-gradient), so every server
rule *adds* its step. Server optimizers follow Reddi et al., "Adaptive Federated Optimization"
(2021) and Hsu et al. (2019) for FedAvgM, with zero-initialised moments and no bias correction
(as in the paper and in Flower):

    fedavg / median / trimmedMean / krum / multiKrum:  x += lr * d
    fedavgm:  m = momentum * m + d;                              x += lr * m
    fedadam:  m = b1 m + (1-b1) d;  v = b2 v + (1-b2) d^2;        x += lr * m / (sqrt(v) + eps)
    fedyogi:  m as fedadam;  v = v - (1-b2) d^2 sign(v - d^2);    x += lr * m / (sqrt(v) + eps)

The state is read from the newest version before round r and written as version r, so a rerun
of round r reads the same state and never steps twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fedtune_trainer.adapter import lora
from fedtune_trainer.aggregation import bounds
from fedtune_trainer.storage import store as st
from fedtune_trainer.wire.layout import (
    SERVER_STATE_PREFIX,
)
from fedtune_trainer.wire.settings import STATELESS_ALGORITHMS, AggregationSpec
from fedtune_trainer.wire.task import AggregateTask

Log = Callable[[str], None]

STATE_FILE = "state.safetensors"


def read_server_state(
    store: st.Store, task: AggregateTask, log: Log
) -> tuple[int | None, dict[str, torch.Tensor] | None]:
    """The newest server state written before this round, if it fits this algorithm."""
    if task.aggregation.algorithm not in STATE_KEYS:
        return None, None
    version = st.latest_version_before(store, SERVER_STATE_PREFIX, task.round)
    if version is None:
        return None, None
    manifest, files = st.read_committed(
        store, st.versioned_prefix(SERVER_STATE_PREFIX, version), [STATE_FILE]
    )
    if manifest.get("algorithm") != task.aggregation.algorithm:
        log(f"server state of round {version} is for {manifest.get('algorithm')}; starting afresh")
        return version, None
    return version, lora.parse_weights(files[STATE_FILE])


def server_update(
    task: AggregateTask,
    store: st.Store,
    global_tensors: dict[str, torch.Tensor],
    update: dict[str, torch.Tensor],
    log: Log,
) -> None:
    """Step 5: the server rule, its state read from before round r and written as version r.

    In place and tensor by tensor: `global_tensors` becomes the new global and `update` is
    consumed, so that the step holds the adapter once (plus the server state), not old and new
    side by side. Every new tensor and moment is checked finite before the state is committed
    (an Inf in FedAdam's second moment would freeze its coordinates for every later round); a
    failure leaves storage untouched, and the caller's tensors are then discarded with the
    attempt.
    """
    r, spec = task.round, task.aggregation
    what = f"round {r}: the {spec.algorithm} step gives"
    bounds.check_finite(update, f"round {r}: the reduced delta has")
    state_version, state = read_server_state(store, task, log)
    state = state or {}
    new_state: dict[str, torch.Tensor] = {}
    for name in sorted(update):
        moments = {k: state.pop(f"{k}/{name}") for k in ("m", "v") if f"{k}/{name}" in state}
        x, moments = server_step_tensor(spec, global_tensors[name], update.pop(name), moments)
        bounds.check_finite({name: x}, f"{what} a global adapter with")
        named = {f"{k}/{name}": t for k, t in moments.items()}
        bounds.check_finite(named, f"{what} a server state with")
        global_tensors[name] = x
        new_state.update(named)
    if new_state:
        st.commit(
            store,
            st.versioned_prefix(SERVER_STATE_PREFIX, r),
            {STATE_FILE: lora.weights_bytes(new_state)},
            {"kind": "server-state", "algorithm": spec.algorithm, "round": r},
        )
        if state_version is not None:
            st.prune_versions_before(store, SERVER_STATE_PREFIX, state_version)


STATE_KEYS = {"fedavgm": ("m",), "fedadam": ("m", "v"), "fedyogi": ("m", "v")}


def _moment(state: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """A moment as a float64 copy that the step may update in place (zeros the first time)."""
    if key in state:
        return state[key].to(torch.float64, copy=True)
    return torch.zeros_like(like)


def server_step_tensor(
    spec: AggregationSpec,
    x: torch.Tensor,
    d: torch.Tensor,
    state: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One tensor's server step: its global value `x`, aggregated delta `d` and its moments
    (`state` keyed "m"/"v", empty on the first round) -> its new value and moments.

    Per tensor so that the aggregator can free each input as its output is made: the server
    step then holds one tensor's float64 temporaries beyond the adapter, not a second adapter.
    """
    algorithm, lr = spec.algorithm, spec.server_learning_rate
    dd, xx = d.double(), x.to(torch.float64, copy=True)
    new_state: dict[str, torch.Tensor] = {}
    if algorithm in STATELESS_ALGORITHMS:
        xx = xx.add_(dd, alpha=lr)
    elif algorithm == "fedavgm":
        m = _moment(state, "m", dd)
        m = m.mul_(spec.server_momentum).add_(dd)
        xx = xx.add_(m, alpha=lr)
        new_state["m"] = m.float()
    elif algorithm in ("fedadam", "fedyogi"):
        m, v = _moment(state, "m", dd), _moment(state, "v", dd)
        m = m.mul_(spec.beta1).add_(dd, alpha=1 - spec.beta1)
        d2 = dd * dd
        if algorithm == "fedadam":
            v = v.mul_(spec.beta2).add_(d2, alpha=1 - spec.beta2)
        else:
            v = v - (1 - spec.beta2) * d2 * torch.sign(v - d2)
        xx = xx + lr * m / (v.sqrt() + spec.epsilon)
        new_state["m"] = m.float()
        new_state["v"] = v.float()
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    return xx.to(x.dtype), new_state


def server_step(
    spec: AggregationSpec,
    global_: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Apply the aggregated delta to the global tensors with the configured server rule.

    `state` holds tensors keyed `<m|v>/<tensor name>` (absent or None on the first round) and the
    new state is returned in the same form (empty for stateless rules). Tensors of `global_` that
    `update` does not name (e.g. frozen LoRA A) pass through unchanged.
    """
    state = state or {}
    new_global = dict(global_)
    new_state: dict[str, torch.Tensor] = {}
    for name in sorted(update):
        own = {k: state[f"{k}/{name}"] for k in ("m", "v") if f"{k}/{name}" in state}
        new_global[name], moments = server_step_tensor(spec, global_[name], update[name], own)
        new_state.update({f"{k}/{name}": t for k, t in moments.items()})
    return new_global, new_state

"""The aggregator's differential-privacy steps with their state in storage: the round's clip
norm under adaptive clipping (Andrew et al. 2021) and its update, and the accountant's epsilon
checked against privacy.targetEpsilon (before round 0 for the whole configured run, and after
every round for the rounds so far). The math is privacy.py's; this module reads and writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch

from . import privacy
from . import store as st
from .intake import Accepted
from .results import RoundRecord
from .runtime import derive_seed
from .task import CLIP_STATE_PREFIX, AggregateTask

Log = Callable[[str], None]


def check_run_budget(task: AggregateTask, log: Log) -> None:
    """Round 0: refuse (BudgetError, not retryable) a run whose configured rounds would spend
    more than privacy.targetEpsilon, before any client trains."""
    if task.privacy.target_epsilon is None:
        return
    z, q, rounds = task.privacy.noise_multiplier, task.sampling_rate, task.rounds
    planned = privacy.epsilon([(z, q)] * rounds, task.privacy.delta)
    what = f"the configured run ({rounds} rounds, noiseMultiplier {z:g}, sampling rate {q:.3g})"
    privacy.check_budget(planned, task.privacy.target_epsilon, what)
    log(f"privacy: the configured run spends epsilon {planned:.4g} of the target")


CLIP_FILE = "clip.json"


def round_clip(
    store: st.Store, task: AggregateTask, log: Log
) -> tuple[AggregateTask, float | None]:
    """Under adaptive clipping, the task this round merges with: clipNorm the state's (version
    r - 1 or older, so a rerun of round r reads the same), the delta's noise multiplier lowered
    by what the noisy count takes (privacy.update_noise_multiplier). Unchanged without it."""
    adaptive = task.privacy.adaptive_clipping
    if adaptive is None:
        return task, None
    clip = task.privacy.clip_norm
    version = st.latest_version_before(store, CLIP_STATE_PREFIX, task.round)
    if version is not None:
        prefix = st.versioned_prefix(CLIP_STATE_PREFIX, version)
        _, files = st.read_committed(store, prefix, [CLIP_FILE])
        clip = float(json.loads(files[CLIP_FILE])["clipNorm"])
    assert clip is not None  # PrivacySpec: adaptiveClipping needs clipNorm
    z = privacy.update_noise_multiplier(
        task.privacy.noise_multiplier, adaptive.count_noise_multiplier
    )
    log(f"adaptive clipping: clip norm {clip:.4g} (of round {version or 0})")
    spec = task.privacy.model_copy(update={"clip_norm": clip, "noise_multiplier": z})
    return task.model_copy(update={"privacy": spec}), clip


def adapt_clip(
    store: st.Store, task: AggregateTask, accepted: list[Accepted], clip: float, log: Log
) -> float:
    """Andrew et al.'s step: next round's clip from the fraction of clients within this one's
    (the count noised, seeded by the round), committed as version r; returns the fraction."""
    adaptive = task.privacy.adaptive_clipping
    assert adaptive is not None
    gen = torch.Generator().manual_seed(derive_seed(task.seed, task.run, task.round, "clip-count"))
    noise = float(torch.randn((), generator=gen, dtype=torch.float64))
    noise *= adaptive.count_noise_multiplier
    fraction, new_clip = privacy.next_clip_norm(
        clip, [a.norm for a in accepted], adaptive.target_quantile, adaptive.learning_rate, noise
    )
    st.commit(
        store,
        st.versioned_prefix(CLIP_STATE_PREFIX, task.round),
        {CLIP_FILE: json.dumps({"clipNorm": new_clip}).encode()},
        {"kind": "clip-state", "round": task.round},
    )
    log(f"adaptive clipping: {fraction:.3g} of clients within {clip:.4g}; next {new_clip:.4g}")
    return fraction


def account(task: AggregateTask, store: st.Store, record: RoundRecord, log: Log) -> RoundRecord:
    """The epsilon spent through this round, composed over every round's own mechanism (its
    noise multiplier and sampling rate, from the records in storage), checked against
    privacy.targetEpsilon before anything of the round is published."""
    from .report import read_records

    z, q = task.privacy.noise_multiplier, task.sampling_rate
    if z <= 0:
        return record
    past = [
        (r.noise_multiplier or 0.0, r.sampling_rate or 1.0)
        for r in read_records(store, task.round - 1, log)
        if r.round >= 1
    ]
    spent = privacy.epsilon([*past, (z, q)], task.privacy.delta)
    privacy.check_budget(spent, task.privacy.target_epsilon, f"round {task.round}")
    log(
        f"privacy: epsilon {spent:.4g} at delta {task.privacy.delta:g} after {len(past) + 1} rounds"
    )
    return record.model_copy(
        update={
            "noise_multiplier": z,
            "sampling_rate": q,
            "epsilon": spent if math.isfinite(spent) else None,
        }
    )

"""Where each artifact of a run lives under its storage root: the keys the client, the
aggregator, the evaluation and the report agree on (docs/architecture.md, "Storage layout")."""

from __future__ import annotations

# --------------------------------------------------------------------------------------------
# Storage layout (docs/architecture.md, "Storage layout")
# --------------------------------------------------------------------------------------------


def round_prefix(round_: int) -> str:
    return f"rounds/{round_:06d}"


def global_prefix(round_: int) -> str:
    return f"{round_prefix(round_)}/global"


def client_prefix(round_: int, client: str) -> str:
    return f"{round_prefix(round_)}/clients/{client}"


def task_key(round_: int, client: str) -> str:
    """A remote client's task for `round_` (wire.site.RemoteTask), written by the run."""
    return f"{round_prefix(round_)}/tasks/{client}.json"


TASK_SIGNATURE_SUFFIX = ".sig"
"""The run's signature of a task sits beside it: `<task_key>.sig`."""


def site_prefix(client: str) -> str:
    """What a site writes besides its commits: heartbeats and refusals (docs/sites.md)."""
    return f"sites/{client}"


def heartbeat_key(client: str) -> str:
    return f"{site_prefix(client)}/heartbeat.json"


def refusal_key(client: str, round_: int) -> str:
    return f"{site_prefix(client)}/refusals/{round_:06d}.json"


RUN_MARKER = "fedtune-run.json"
"""At the storage root: `{"kind": "fedtune.run", "run": <name>, "uid": <metadata.uid>}`, written
by round 0's aggregator to a root that is empty (or already holds it). It is what storage cleanup
(cleanupPolicy Delete) requires: it deletes a root only when this marker names the run's UID."""
RUN_MARKER_KIND = "fedtune.run"

SERVER_STATE_PREFIX = "state/server"
CLIP_STATE_PREFIX = "state/clip"
CONTROL_PREFIX = "state/control"
"""SCAFFOLD's control variates: server/<round>/ (c) and clients/<client>/<round>/ (c_i)."""
FINAL_PREFIX = "final"
REPORT_PREFIX = "report"


EVALUATION_FILE = "evaluation.json"
"""rounds/<r>/evaluation.json: the evaluation Job's result for global r."""


def client_state_prefix(client: str) -> str:
    return f"state/clients/{client}"


def control_prefix(client: str | None = None) -> str:
    """Where SCAFFOLD's control variate of `client` (None: the server's) lives, by round."""
    return f"{CONTROL_PREFIX}/clients/{client}" if client else f"{CONTROL_PREFIX}/server"

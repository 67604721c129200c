"""What a run and a site say to each other through storage (docs/sites.md).

A site is a data owner that takes part in a run from its own cluster. The run's relay Job
(`RelayTask`) writes each round's `RemoteTask` for it, signed with the run's task key
(storage/tasks.py), and waits; the site answers with a signed commit, a `Heartbeat` now and then,
or a `Refusal`. On the site, a watch Job (`WatchTask`) waits for the task, verifies it and checks
the site's policy (`policy_refusals`); the site's client Job (`SiteClientTask`) turns it into the
`ClientTask` it trains (`task.site_client_task`), adding what never leaves the site: its data
URI, its storage location and the privacy it insists on.

Pure models and rules; the tests hold each one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from fedtune_trainer.wire.delta_settings import DeltaSpec
from fedtune_trainer.wire.settings import (
    AdapterSpec,
    ClientName,
    DataSpec,
    LocalPrivacy,
    Model,
    PublicKey,
    RunUid,
    ShortStr,
    StorageLocation,
    TrainingSpec,
    Uri,
)

Image = Annotated[str, Field(min_length=1, max_length=512)]


class RemoteTask(Model):
    """The run's half of a remote client's task for one round: what to train and how to send it.
    No data URI and no credentials: the run never knows them. The site adds its own."""

    kind: Literal["remote-client"] = "remote-client"
    run: ShortStr
    run_uid: RunUid
    round: int = Field(ge=1, le=1_000_000)
    client: ClientName
    image: Image = Field(description="The trainer image the run proposes; the site decides.")
    base_model: Uri
    tokenizer: Uri | None = None
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    delta: DeltaSpec = Field(default_factory=DeltaSpec)


class SitePolicy(Model):
    """What a site accepts of a run; a task outside it is refused, with the reason, before any
    Job of the site runs it."""

    images: list[Image] = Field(
        default_factory=list,
        max_length=64,
        description="Images the site runs: an entry with @sha256: matches that digest exactly; "
        "any other entry is a prefix (a registry or repository, ending in '/' or ':'). Empty: "
        "none, so a site must say which images it trusts.",
    )
    max_rounds: int | None = Field(None, ge=1, description="The most rounds the site gives.")
    max_local_steps: int | None = Field(
        None, ge=1, description="The most optimizer steps a round may ask of the site."
    )
    privacy: LocalPrivacy | None = Field(
        None,
        description="Clipping and noise applied to every delta at the site, whatever the run asks.",
    )
    paused: bool = Field(False, description="Take no task until unpaused (the run goes on).")


class Heartbeat(Model):
    """sites/<client>/heartbeat.json: the site is alive, and what it is doing."""

    client: ClientName
    state: Literal["waiting", "training", "paused", "left"]
    round: int = Field(ge=0, le=1_000_000, description="The round it works on or waits for.")
    at: float = Field(ge=0, description="Unix time of the heartbeat (the site's clock).")


class Refusal(Model):
    """sites/<client>/refusals/<round>.json: the site will not run this round's task, and why."""

    client: ClientName
    round: int = Field(ge=1, le=1_000_000)
    reason: str = Field(min_length=1, max_length=1024)
    at: float = Field(ge=0)


def image_allowed(image: str, allowed: list[str]) -> bool:
    """Whether `image` is one the policy names: a pinned digest matches only itself; any other
    entry is a prefix, and must end at a boundary ('/', ':' or '@'), so that `registry.a.example`
    does not admit `registry.a.example.evil.com/...`."""
    for entry in allowed:
        if "@sha256:" in entry:
            if image == entry:
                return True
        elif entry.endswith(("/", ":", "@")) and image.startswith(entry):
            return True
    return False


def policy_refusals(
    task: RemoteTask, policy: SitePolicy, client: str, run: str, contributed: int
) -> list[str]:
    """Why the site refuses `task` (empty: it accepts). `contributed` is how many rounds the site
    has already given this run."""
    out = []
    if task.client != client:
        out.append(f"the task is for client {task.client!r}, this site is {client!r}")
    if task.run != run:
        out.append(f"the task is for run {task.run!r}, this site joined {run!r}")
    if not image_allowed(task.image, policy.images):
        out.append(f"image {task.image!r} is not in the site's policy")
    if policy.max_rounds is not None and contributed >= policy.max_rounds:
        out.append(f"the site gives at most {policy.max_rounds} rounds and gave {contributed}")
    # localEpochs wins over localSteps, and an epoch's steps depend on data the run never sees.
    training = task.training
    steps = None if training.local_epochs is not None else training.local_steps
    if policy.max_local_steps is not None and (steps is None or steps > policy.max_local_steps):
        asked = "an epoch-based round" if steps is None else f"{steps} local steps"
        out.append(f"the task asks {asked}; the site allows at most {policy.max_local_steps}")
    return out


# --------------------------------------------------------------------------------------------
# The Jobs of a remote client: the run's relay, the site's watch and client
# --------------------------------------------------------------------------------------------

SILENCE_SECONDS = 900
"""How long a site may go without a heartbeat before its relay gives the round up on it."""


class RelayTask(Model):
    """The run's side of a remote client in one round: publish `remote` (signed with the run's
    task key, from FEDTUNE_TASK_SIGNING_KEY), then wait for the site's signed commit, its
    refusal, or its silence; report the commit as a client Job would (ClientSummary)."""

    kind: Literal["relay"] = "relay"
    storage: StorageLocation
    remote: RemoteTask
    client_key: PublicKey = Field(
        description="The site's pinned key: only its signed commit counts."
    )
    silence_seconds: int = Field(
        SILENCE_SECONDS, ge=10, le=86_400, description="No heartbeat this long: the site is silent."
    )

    @property
    def run(self) -> str:
        return self.remote.run

    @property
    def round(self) -> int:
        return self.remote.round

    @property
    def client(self) -> str:
        return self.remote.client


class WatchTask(Model):
    """The site's wait for its next task: the first round after `after_round` whose global is not
    yet committed; verified with the pinned `run_key`, checked against `policy`. Reports the
    accepted task (WatchSummary), the run's end, or a refusal (written to storage as well)."""

    kind: Literal["watch"] = "watch"
    run: ShortStr
    client: ClientName
    storage: StorageLocation = Field(description="The run's root, as the site reaches it.")
    run_key: PublicKey = Field(description="The run's task key, pinned in the site's resource.")
    after_round: int = Field(0, ge=0, le=1_000_000)
    contributed: int = Field(0, ge=0, description="Rounds the site has given the run so far.")
    policy: SitePolicy = Field(default_factory=SitePolicy)


class SiteClientTask(Model):
    """The site's client Job: read the task the watch accepted (verified again, and by its
    digest), then train it with the site's data and privacy, signed with the site's key."""

    kind: Literal["site-client"] = "site-client"
    run: ShortStr
    round: int = Field(ge=1, le=1_000_000)
    client: ClientName
    storage: StorageLocation
    run_key: PublicKey
    task_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    data_uri: Uri
    privacy: LocalPrivacy | None = None

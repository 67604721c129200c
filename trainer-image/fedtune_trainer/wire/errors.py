"""Errors that say the task itself is wrong for this Job, so no retry can succeed.

Torch-free, so that the CLI can map them to the invalid-input exit code without importing the
training stack.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A task setting this Job cannot honour, e.g. a 4-bit base on a Job without a GPU.

    The message starts with the field's path as the spec spells it (`adapter.baseQuantization:
    ...`), so that the one-line reason in the run's status says what to change.
    """


class QuorumError(RuntimeError):
    """Too few valid deltas to make a global adapter this round (the round's clients must be
    run again; rerunning the aggregator over the same deltas cannot succeed)."""


class SiteError(RuntimeError):
    """What a site did to a round: refused its task, paused, left or went silent.

    The Job's failure reason is `reason` itself, not an exception's name: it begins with the
    contract's word for it (contract.REFUSED_PREFIX, SITE_PAUSED, SITE_SILENT, SITE_LEFT), so
    that the run's status and the site's say what the site did. `retry` says whether running the
    Job again may help: a silent site may be back, a refusal or a pause stands.
    """

    def __init__(self, reason: str, *, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry

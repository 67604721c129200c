"""Fixtures of the operator's tests."""

from __future__ import annotations

import kopf
import pytest


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The (reason, message) of every event the handlers post, whichever kopf call posts it."""
    posted: list[tuple[str, str]] = []

    def post(obj: object, *, reason: str, message: str, type: str = "") -> None:
        posted.append((reason, message))

    for name in ("event", "info", "warn"):
        monkeypatch.setattr(kopf, name, post)
    return posted

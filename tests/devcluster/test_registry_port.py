"""The real node's registry keeps one address per cache, whichever clone starts it: podman skips
the layers a registry holds only at an address it has pushed to before."""

from __future__ import annotations

from pathlib import Path

import pytest

from devcluster.registry import registry_port


def test_the_registry_port_is_keyed_by_the_cache_not_by_the_clone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ports = {}
    for cache in ("cache-a", "cache-b"):
        monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / cache))
        ports[cache] = registry_port()
        assert registry_port() == ports[cache]  # stable from one start to the next
    assert ports["cache-a"] != ports["cache-b"]

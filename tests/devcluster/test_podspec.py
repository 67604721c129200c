"""The process kubelet's pure core: what a container sees and what its pod status says."""

from __future__ import annotations

import pytest

from devcluster import podspec
from devcluster.podspec import ContainerConfigError

POD = {
    "metadata": {
        "name": "p",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"app": "x"},
        "annotations": {"note": "n"},
    },
    "spec": {"serviceAccountName": "sa", "containers": [{"name": "c", "image": "img"}]},
}
SECRETS = {("ns", "creds"): {"key": "s3cr3t"}}
CONFIG_MAPS = {("ns", "cfg"): {"mode": "fast", "level": "3"}}


def secrets(ns: str, name: str) -> dict[str, str] | None:
    return SECRETS.get((ns, name))


def config_maps(ns: str, name: str) -> dict[str, str] | None:
    return CONFIG_MAPS.get((ns, name))


def env_of(container: dict) -> dict[str, str]:
    return podspec.container_env(
        POD,
        {"name": "c", **container},
        base={"BASE": "b"},
        secrets=secrets,
        config_maps=config_maps,
        node_name="node",
    )


@pytest.mark.parametrize(
    ("var", "expected"),
    [
        ({"name": "A", "value": "1"}, "1"),
        ({"name": "A", "value": "$(BASE)-x"}, "b-x"),
        ({"name": "A", "value": "$(MISSING)"}, "$(MISSING)"),
        ({"name": "A", "value": "$$(BASE)"}, "$(BASE)"),
        ({"name": "A", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}}, "s3cr3t"),
        ({"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}}, "fast"),
        ({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}, "p"),
        ({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}, "ns"),
        ({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}, "node"),
        ({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}, "x"),
        ({"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}, "127.0.0.1"),
    ],
)
def test_env_values_resolve_like_the_kubelet(var: dict, expected: str) -> None:
    assert env_of({"env": [var]})["A"] == expected


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            {"name": "A", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}},
            'secret "gone" not found',
        ),
        (
            {"name": "A", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nokey"}}},
            "couldn't find key nokey in secret creds",
        ),
        (
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}},
            'configmap "gone" not found',
        ),
        (
            {"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}},
            "unsupported fieldRef",
        ),
    ],
)
def test_missing_references_are_config_errors(var: dict, message: str) -> None:
    with pytest.raises(ContainerConfigError, match=message):
        env_of({"env": [var]})


def test_optional_references_may_be_missing() -> None:
    env = env_of(
        {
            "env": [
                {
                    "name": "A",
                    "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k", "optional": True}},
                }
            ]
        }
    )
    assert "A" not in env


def test_env_from_applies_prefix_and_env_wins() -> None:
    env = env_of(
        {
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "C_"}],
            "env": [{"name": "C_mode", "value": "slow"}],
        }
    )
    assert env["C_level"] == "3"
    assert env["C_mode"] == "slow"
    assert env["BASE"] == "b"


def test_command_line_expands_and_needs_a_command() -> None:
    container = {"name": "c", "command": ["run", "$(X)"], "args": ["--n", "$(X)"]}
    assert podspec.command_line(container, {"X": "1"}) == ["run", "1", "--n", "1"]
    with pytest.raises(ContainerConfigError, match="explicit command"):
        podspec.command_line({"name": "c", "args": ["x"]}, {})


def test_projected_service_account_volume() -> None:
    volume = {
        "name": "kube-api-access",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "cfg", "items": [{"key": "mode", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [
                            {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                        ]
                    }
                },
            ]
        },
    }
    asked: list[tuple[str | None, int]] = []

    def token(audience: str | None, seconds: int) -> str:
        asked.append((audience, seconds))
        return "tok"

    files = podspec.volume_files(
        POD, volume, secrets=secrets, config_maps=config_maps, token=token, node_name="node"
    )
    assert files.files == {"token": b"tok", "ca.crt": b"fast", "namespace": b"ns"}
    assert asked == [(None, 3607)]


@pytest.mark.parametrize(
    ("volume", "expected"),
    [
        ({"name": "v", "secret": {"secretName": "creds"}}, {"key": b"s3cr3t"}),
        (
            {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "level", "path": "l"}]}},
            {"l": b"3"},
        ),
        ({"name": "v", "emptyDir": {}}, {}),
        ({"name": "v", "secret": {"secretName": "gone", "optional": True}}, {}),
    ],
)
def test_volumes_materialise_as_files(volume: dict, expected: dict[str, bytes]) -> None:
    files = podspec.volume_files(
        POD,
        volume,
        secrets=secrets,
        config_maps=config_maps,
        token=lambda a, s: "",
        node_name="node",
    )
    assert files.files == expected


def test_unsupported_volume_is_a_config_error() -> None:
    with pytest.raises(ContainerConfigError, match="unsupported type"):
        podspec.volume_files(
            POD,
            {"name": "v", "hostPath": {"path": "/"}},
            secrets=secrets,
            config_maps=config_maps,
            token=lambda a, s: "",
            node_name="n",
        )


@pytest.mark.parametrize(
    ("written", "log", "policy", "failed", "expected"),
    [
        ("summary", "log", "File", False, "summary"),
        ("", "a\nb", "File", True, ""),
        ("", "a\nb", "FallbackToLogsOnError", True, "a\nb"),
        ("", "a\nb", "FallbackToLogsOnError", False, ""),
        ("x" * 5000, "", "File", False, "x" * 4096),
    ],
)
def test_termination_message(
    written: str, log: str, policy: str, failed: bool, expected: str
) -> None:
    assert podspec.termination_message(written, log, policy=policy, failed=failed) == expected


@pytest.mark.parametrize(
    ("codes", "phase"),
    [
        ([None], "Running"),
        ([0], "Succeeded"),
        ([1], "Failed"),
        ([0, None], "Running"),
        ([0, 2], "Failed"),
        ([0, 0], "Succeeded"),
    ],
)
def test_pod_phase(codes: list[int | None], phase: str) -> None:
    assert podspec.pod_phase("Never", codes) == phase


def test_terminated_container_status_carries_exit_code_and_message() -> None:
    state = podspec.ContainerState(
        "c", started_at="t0", exit_code=3, finished_at="t1", message="boom"
    )
    status = podspec.pod_status(POD, [state], phase="Failed", now="t1", start_time="t0")
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated == {
        "exitCode": 3,
        "reason": "Error",
        "message": "boom",
        "startedAt": "t0",
        "finishedAt": "t1",
    }
    assert status["phase"] == "Failed"


@pytest.mark.parametrize(
    ("target", "hidden"),
    [
        ("/tmp", True),
        ("/tmp/ci/repo", True),
        ("/tmp/ci/repo/x", False),
        ("/data", False),
        ("/var/run/secrets/kubernetes.io/serviceaccount", False),
    ],
)
def test_a_mount_never_hides_the_host_paths_the_pod_runs_from(target: str, hidden: bool) -> None:
    from pathlib import Path

    from devcluster.podexec import hides

    assert hides(Path(target), ["/tmp/ci/repo", "/usr/lib/python3"]) is hidden


# -- PersistentVolumeClaims ---------------------------------------------------------------------

CLAIMS = {
    ("ns", "cache"): {"name": "cache", "uid": "c-1"},
    ("ns", "going"): {"name": "going", "uid": "c-2", "deletionTimestamp": "2026-01-01T00:00:00Z"},
    ("ns", "p-scratch"): {"name": "p-scratch", "uid": "c-3", "ownerReferences": [{"uid": "u-1"}]},
    ("ns", "p-stolen"): {"name": "p-stolen", "uid": "c-4", "ownerReferences": [{"uid": "other"}]},
}


def claims(ns: str, name: str) -> dict | None:
    return CLAIMS.get((ns, name))


TEMPLATE = {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"]}}}


@pytest.mark.parametrize(
    ("volume", "claim", "read_only"),
    [
        (
            {"name": "v", "persistentVolumeClaim": {"claimName": "cache"}},
            "claims/ns/cache/c-1",
            False,
        ),
        (
            {"name": "v", "persistentVolumeClaim": {"claimName": "cache", "readOnly": True}},
            "claims/ns/cache/c-1",
            True,
        ),
        ({"name": "scratch", "ephemeral": TEMPLATE}, "claims/ns/p-scratch/c-3", False),
    ],
)
def test_claims_map_to_one_shared_directory(volume: dict, claim: str, read_only: bool) -> None:
    files = podspec.volume_files(
        POD,
        volume,
        secrets=secrets,
        config_maps=config_maps,
        token=lambda a, s: "",
        node_name="n",
        claims=claims,
    )
    assert (files.claim, files.read_only, files.writable, files.files) == (
        claim,
        read_only,
        True,
        {},
    )


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        (
            {"name": "v", "persistentVolumeClaim": {"claimName": "nope"}},
            'persistentvolumeclaim "nope" not found',
        ),
        (
            {"name": "v", "persistentVolumeClaim": {"claimName": "going"}},
            'persistentvolumeclaim "going" is being deleted',
        ),
        ({"name": "later", "ephemeral": TEMPLATE}, "waiting for the ephemeral volume controller"),
        ({"name": "stolen", "ephemeral": TEMPLATE}, "was not created for the pod"),
    ],
)
def test_a_claim_that_is_not_there_is_a_config_error(volume: dict, message: str) -> None:
    with pytest.raises(ContainerConfigError, match=message):
        podspec.volume_files(
            POD,
            volume,
            secrets=secrets,
            config_maps=config_maps,
            token=lambda a, s: "",
            node_name="n",
            claims=claims,
        )

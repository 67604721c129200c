"""Reading versitygw's server access log: what the e2e measurement of the model cache counts."""

from __future__ import annotations

import pytest

from devcluster.s3 import AccessRecord, parse_access_log

UA = "Boto3/1.44.8 md/Botocore#1.44.8 ua/2.1 os/linux#6.18 lang/python#3.11.7 Botocore/1.44.8"
TAIL = f"- {UA} - ZJTt3jHO= SigV4 - AuthHeader s3.us-east-1.amazonaws.com - arn:aws:s3:::/b Yes"


def line(operation: str, key: str, status: str, error: str, sent: str, size: str) -> str:
    """A line as versitygw 1.8 writes it (captured from the real server, fields substituted)."""
    uri = f"/bkt/{key}" if key != "-" else "/bkt"
    return (
        f"ak bkt [29/November/2026:15:59:05 +0000] 127.0.0.1 ak KMC6DGWTP92P73HN {operation} "
        f"{key} {uri} {status} {error} {sent} {size} 6 6 {TAIL}"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            line("s3_GetObject", "m/x.bin", "200", "-", "0", "0"),
            [AccessRecord("bkt", "s3_GetObject", "m/x.bin", 200, 0, 0)],
        ),
        (
            line("s3_PutObject", "m/x.bin", "200", "-", "0", "100000"),
            [AccessRecord("bkt", "s3_PutObject", "m/x.bin", 200, 0, 100000)],
        ),
        (
            line("s3_ListObjectsV2", "-", "200", "-", "509", "0"),
            [AccessRecord("bkt", "s3_ListObjectsV2", "", 200, 509, 0)],
        ),
        (
            line("s3_HeadObject", "m/none", "404", "NoSuchKey", "0", "0"),
            [AccessRecord("bkt", "s3_HeadObject", "m/none", 404, 0, 0)],
        ),
        ("log starts 2026-11-29 15:58:56.469156685 +0000 UTC m=+0.044181378", []),
        ("", []),
    ],
    ids=["get", "put", "list", "missing", "banner", "empty"],
)
def test_access_log_lines(text: str, expected: list[AccessRecord]) -> None:
    assert parse_access_log(text) == expected

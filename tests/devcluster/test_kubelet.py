"""The process kubelet waits out an API server that is away and gives up on a real answer."""

from __future__ import annotations

import pytest
import urllib3
from kubernetes.client.rest import ApiException

from devcluster.statusreport import api_server_away

REFUSED = urllib3.exceptions.MaxRetryError(
    urllib3.HTTPConnectionPool("127.0.0.1", 1), "/api/v1/secrets", reason=ConnectionRefusedError()
)


@pytest.mark.parametrize(
    ("error", "away"),
    [
        pytest.param(REFUSED, True, id="connection-refused-after-retries"),
        pytest.param(urllib3.exceptions.ProtocolError("reset"), True, id="connection-reset"),
        pytest.param(ApiException(status=503), True, id="paths-not-installed-yet"),
        pytest.param(ApiException(status=429), True, id="storage-reinitializing"),
        pytest.param(ApiException(status=500), True, id="internal-error"),
        pytest.param(ApiException(status=None), True, id="no-status"),
        pytest.param(ApiException(status=404), False, id="not-found"),
        pytest.param(ApiException(status=403), False, id="forbidden"),
        pytest.param(ApiException(status=422), False, id="invalid"),
        pytest.param(ValueError("bug"), False, id="a-bug-is-not-retried"),
    ],
)
def test_api_server_away_is_retried_and_an_answer_is_not(error: Exception, away: bool) -> None:
    assert api_server_away(error) is away

"""The one table of gRPC status codes that the edge and the cloud share."""

from __future__ import annotations

import grpc
import pytest

from splitexit.status import STATUS_CODES, STATUS_NUMBERS, status_name


def test_the_table_is_grpcs() -> None:
    assert dict(STATUS_NUMBERS) == {code.name: code.value[0] for code in grpc.StatusCode}
    assert "OK" not in STATUS_CODES and len(STATUS_CODES) == len(grpc.StatusCode) - 1


@pytest.mark.parametrize("given, name", [
    (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"), (lambda: grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    ("deadline_exceeded", "DEADLINE_EXCEEDED"), (8, "RESOURCE_EXHAUSTED"),
    (0, None), ("OK", None), (99, None), ("nonsense", None), (True, None), (None, None), (int, None),
])
def test_status_name_reads_every_form_a_failure_carries(given, name) -> None:
    assert status_name(given) == name

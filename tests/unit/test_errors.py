"""The error taxonomy at the service edge: who is at fault decides the gRPC code."""

from __future__ import annotations

from typing import Any

import pytest

from pynydus.api import snapshots_pb2
from pynydus.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    FormatError,
    HostCheckError,
    InvalidArgument,
    NotFound,
    NydusError,
    Unavailable,
)
from pynydus.grpcwire.rpc import STATUS_CODES, RpcAbort
from pynydus.snapshot.service import Snapshots


@pytest.mark.parametrize(("cls", "code"), [
    (NotFound, "NOT_FOUND"), (AlreadyExists, "ALREADY_EXISTS"),
    (FailedPrecondition, "FAILED_PRECONDITION"), (HostCheckError, "FAILED_PRECONDITION"),
    (InvalidArgument, "INVALID_ARGUMENT"), (ConfigError, "INVALID_ARGUMENT"),
    (Unavailable, "UNAVAILABLE"), (FormatError, "DATA_LOSS"),
])
def test_each_error_has_one_grpc_code(cls: type[NydusError], code: str) -> None:
    assert cls.grpc_code == code and code in STATUS_CODES


def test_corrupt_data_is_not_the_callers_invalid_argument() -> None:
    assert not issubclass(FormatError, InvalidArgument)


class _CorruptSnapshotter:
    def stat(self, key: str) -> Any:
        raise FormatError(f"bootstrap of {key}: superblock at offset 1024: bad magic")


def test_a_format_error_reaches_the_client_as_data_loss() -> None:
    core = Snapshots(_CorruptSnapshotter())  # type: ignore[arg-type]
    with pytest.raises(RpcAbort) as err:
        core.Stat(snapshots_pb2.StatSnapshotRequest(key="k"))
    assert err.value.code == "DATA_LOSS" and "bad magic" in err.value.message

"""Which Snapshots calls a server may run on its reader thread (``Snapshots.inline``), and
that they answer as the worker's call does: List over a few snapshots is one of them."""

import threading
from pathlib import Path

import pytest

from pynydus.api import snapshots_pb2 as pb
from pynydus.grpcwire.rpc import RpcAbort
from pynydus.snapshot import service
from pynydus.snapshot.service import Snapshots
from pynydus.snapshot.snapshotter import Snapshotter


@pytest.fixture
def core(tmp_path_factory: pytest.TempPathFactory) -> Snapshots:
    return Snapshots(Snapshotter(Path(tmp_path_factory.mktemp("svc", numbered=True))))


def _names(messages: list[pb.ListSnapshotsResponse]) -> list[str]:
    return [info.name for msg in messages for info in msg.info]


def test_list_of_a_few_snapshots_is_inline_and_answers_as_the_workers(core: Snapshots) -> None:
    methods = {m.name: m for m in core.methods().values()}
    core.sn.prepare("a", labels={"x": "1"})
    core.sn.commit("A", "a")
    core.sn.prepare("b", "A")
    for filters in ([], ["labels.x==1"], ["kind==active"]):
        request = pb.ListSnapshotsRequest(filters=filters)
        call = core.inline(methods["List"], request)
        assert call is not None
        inline = list(call())
        assert inline == list(core.List(request))
    call = core.inline(methods["List"], pb.ListSnapshotsRequest())
    assert call is not None and _names(list(call())) == ["A", "b"]


def test_list_of_more_snapshots_goes_to_a_worker(core: Snapshots) -> None:
    list_method = {m.name: m for m in core.methods().values()}["List"]
    for i in range(service._INLINE_LIST):
        core.sn.prepare(f"k{i:03}")
    assert core.inline(list_method, pb.ListSnapshotsRequest()) is not None
    core.sn.prepare("one-more")
    assert core.inline(list_method, pb.ListSnapshotsRequest()) is None
    assert len(_names(list(core.List(pb.ListSnapshotsRequest())))) == service._INLINE_LIST + 1


def test_nothing_is_inline_while_a_transaction_holds_the_metastore(core: Snapshots) -> None:
    methods = {m.name: m for m in core.methods().values()}
    core.sn.prepare("a")
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with core.sn.ms.transaction():
            held.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        assert core.inline(methods["List"], pb.ListSnapshotsRequest()) is None
        assert core.inline(methods["Stat"], pb.StatSnapshotRequest(key="a")) is None
    finally:
        done.set()
        holder.join(30)
    assert core.inline(methods["List"], pb.ListSnapshotsRequest()) is not None


def test_a_bad_filter_is_left_to_the_worker_which_reports_it(core: Snapshots) -> None:
    request = pb.ListSnapshotsRequest(filters=["labels.x=="])
    list_method = {m.name: m for m in core.methods().values()}["List"]
    assert core.inline(list_method, request) is None
    with pytest.raises(RpcAbort) as err:
        list(core.List(request))
    assert err.value.code == "INVALID_ARGUMENT"

"""The system controller's routing and answers, with a fake filesystem (no sockets)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pynydus.system.controller import (
    Controller,
    DaemonView,
    PrefetchLists,
    parse_file_list,
    views_by_daemon,
)


class FakeDaemons:
    def __init__(self, views: list[DaemonView]) -> None:
        self.views = views
        self.prefetch = PrefetchLists()

    def daemon_views(self) -> list[DaemonView]:
        return self.views

    def daemon_read_bytes(self, daemon_id: str) -> int | None:
        return 4096 if daemon_id == "d1" else None

    def set_prefetch(self, image: str, files: list[str]) -> None:
        self.prefetch.put(image, files)

    def daemon_records(self) -> dict[str, list[dict[str, Any]]]:
        return {"daemons": [{"id": v.id, "pid": v.pid} for v in self.views], "instances": []}


def view(did: str, config_path: str = "", instances: tuple[dict[str, str], ...] = ()) -> DaemonView:
    return DaemonView(id=did, pid=0, api_socket=f"/run/{did}.sock", mountpoint="/mnt",
                      reference="reg/app:1", config_path=config_path, state="RUNNING",
                      instances=instances)


def test_daemons_are_listed_with_upstreams_fields() -> None:
    inst = {"snapshot_id": "7", "snapshot_dir": "/r/snapshots/7", "mountpoint": "/r/snapshots/7/mnt",
            "image_id": "reg/app:1", "config_path": "/r/config/d1/config.json"}
    reply = Controller(FakeDaemons([view("d1", instances=(inst,))])).handle("GET", "/api/v1/daemons")
    assert reply.status == 200
    (d,) = reply.body
    assert set(d) >= {"id", "pid", "api_socket", "supervisor_path", "reference", "mountpoint",
                      "startup_cpu_utilization", "memory_rss_kb", "read_data_kb", "instances"}
    assert d["read_data_kb"] == 4.0
    assert d["instances"] == {"7": {k: inst[k] for k in ("snapshot_id", "snapshot_dir",
                                                         "mountpoint", "image_id")}}
    assert json.loads(reply.payload())[0]["id"] == "d1"


def test_no_filesystem_lists_nothing() -> None:
    assert Controller(None).handle("GET", "/api/v1/daemons/").body == []
    assert Controller(None).handle("GET", "/api/v1/daemons/records").body == \
        {"daemons": [], "instances": []}


def test_records_are_the_stores_as_they_are() -> None:
    reply = Controller(FakeDaemons([view("d1"), view("d2")])).handle(
        "GET", "/api/v1/daemons/records")
    assert reply.status == 200
    assert reply.body == {"daemons": [{"id": "d1", "pid": 0}, {"id": "d2", "pid": 0}],
                          "instances": []}


@pytest.mark.parametrize("method, path, status", [
    ("DELETE", "/api/v1/daemons/records", 405),
    ("PUT", "/api/v1/daemons/upgrade", 501),
    ("GET", "/api/v1/other", 404),
    ("POST", "/api/v1/daemons", 405),
    ("GET", "/api/v1/prefetch", 405),
])
def test_routing(method: str, path: str, status: int) -> None:
    reply = Controller(FakeDaemons([])).handle(method, path)
    assert reply.status == status
    assert set(reply.body) == {"code", "message"}


@pytest.mark.parametrize("body, stored", [
    (b'[{"image": "reg/a:1", "prefetch": "/a,/b\\n/c  relative"}]', {"reg/a:1": ["/a", "/b", "/c"]}),
    (b'{"image": "reg/a:1", "prefetch": ["/x", 3, "y"]}', {"reg/a:1": ["/x"]}),
    (b'[{"prefetch": "/a"}, 7]', {}),
    (b"not json", {}),
    (b"", {}),
])
def test_prefetch_is_always_200_and_keeps_what_it_can_read(body: bytes, stored: dict) -> None:
    fake = FakeDaemons([])
    assert Controller(fake).handle("PUT", "/api/v1/prefetch", body).status == 200
    assert {k: fake.prefetch.take(k) for k in stored} == stored
    assert len(fake.prefetch) == 0


def test_prefetch_list_is_taken_once() -> None:
    lists = PrefetchLists()
    lists.put("i", ["/a"])
    assert lists.take("i") == ["/a"] and lists.take("i") is None


def test_parse_file_list_drops_relative_paths() -> None:
    assert parse_file_list(" /usr/bin/python3,lib\n/etc/x ") == ["/usr/bin/python3", "/etc/x"]


@pytest.mark.parametrize("config", [
    {"device": {"backend": {"type": "registry", "config": {"host": "r:5000", "repo": "app"}}}},
    {"version": 2, "backend": {"type": "registry", "registry": {"host": "r:5000", "repo": "app"}}},
])
def test_backend_of_a_daemon_from_its_config(tmp_path: Path, config: dict) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    reply = Controller(FakeDaemons([view("d1", str(path))])).handle(
        "GET", "/api/v1/daemons/d1/backend")
    assert reply.status == 200
    assert reply.body == {"type": "registry", "config": {"host": "r:5000", "repo": "app"}}
    assert Controller(FakeDaemons([view("d2")])).handle(
        "GET", "/api/v1/daemons/d2/backend").status == 404


def test_views_group_instances_by_daemon() -> None:
    def live(did: str, mode: str) -> SimpleNamespace:
        rec = SimpleNamespace(id=did, mode=mode, pid=5, api_socket="s", mountpoint="m", config_path="")
        return SimpleNamespace(record=rec, state="RUNNING")

    def inst(sid: str, did: str) -> SimpleNamespace:
        return SimpleNamespace(snapshot_id=sid, daemon_id=did, snapshot_dir=f"/s/{sid}",
                               mountpoint=f"/m/{sid}", image_ref=f"img{sid}", config_path="c")

    views = views_by_daemon([live("shared_daemon", "shared"), live("a", "assigned")],
                            [inst("1", "shared_daemon"), inst("2", "shared_daemon"), inst("3", "a")])
    by_id = {v.id: v for v in views}
    assert [i["snapshot_id"] for i in by_id["shared_daemon"].instances] == ["1", "2"]
    assert by_id["shared_daemon"].reference == ""
    assert by_id["a"].reference == "img3"

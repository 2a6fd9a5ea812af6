"""``pynydus ctl``'s sans-I/O parts: the tables, Prometheus text, daemon look-up, options."""

from __future__ import annotations

from typing import Any

import pytest

from pynydus.cli import ctl
from pynydus.cli.main import build_parser
from pynydus.errors import NotFound


def test_table_aligns_columns_and_keeps_empty_cells() -> None:
    assert ctl.table(("A", "LONGER"), [("xyz", 1), (None, "")]) == "A    LONGER\nxyz  1\n\n"


def test_sizes_read_as_an_operator_reads_them() -> None:
    assert [ctl.size(n) for n in (512, 3072, 41.2 * 2**20, 5 * 2**40)] == \
        ["512 B", "3.0 KiB", "41.2 MiB", "5120.0 GiB"]


def test_prometheus_text_is_parsed_into_samples() -> None:
    text = ('# HELP x_total what\n# TYPE x_total counter\nx_total 3\n'
            'lat_bucket{le="0.5",op="PREPARE"} 2\n'
            'info{path="a \\"b\\"\\\\c",n="1"} 1.5e3\nbroken{ line\nnan_one NaN\n')
    samples = ctl.parse_prometheus(text)
    assert samples[:3] == [
        {"name": "x_total", "labels": {}, "value": 3.0},
        {"name": "lat_bucket", "labels": {"le": "0.5", "op": "PREPARE"}, "value": 2.0},
        {"name": "info", "labels": {"path": 'a "b"\\c', "n": "1"}, "value": 1500.0}]
    assert [s["name"] for s in samples] == ["x_total", "lat_bucket", "info", "nan_one"]
    table = ctl.metrics_table(samples[:3])
    assert "lat_bucket" not in table and "info     path=a \"b\"\\c,n=1  1500" in table


class FakeSystem:
    def __init__(self, daemons: list[dict[str, Any]]) -> None:
        self.daemons = daemons

    def get(self, path: str) -> Any:
        assert path == "/api/v1/daemons"
        return self.daemons


def test_a_daemon_is_found_by_id_or_taken_as_a_socket_path() -> None:
    system: Any = FakeSystem([{"id": "d1", "api_socket": "/r/d1/api.sock"}])
    assert ctl.daemon_socket(system, "d1") == "/r/d1/api.sock"
    assert ctl.daemon_socket(system, "/else/api.sock") == "/else/api.sock"
    with pytest.raises(NotFound, match='daemon "d2" not found \\(daemons: d1\\)'):
        ctl.daemon_socket(system, "d2")


@pytest.mark.parametrize("argv, expect", [
    (["ctl", "--json", "daemons"], {"json": True, "timeout": 10.0}),
    (["ctl", "daemons", "--json", "--timeout", "2"], {"json": True, "timeout": 2.0}),
    (["ctl", "--sock", "/a", "records", "--sock", "/b"], {"sock": "/b"}),
    (["ctl", "--address", "/g.sock", "health"], {"address": "/g.sock", "json": False}),
    (["ctl", "daemon", "d1", "blobcache", "--id", "7"], {"daemon": "d1", "what": "blobcache",
                                                         "sid": "7"}),
])
def test_options_go_before_or_after_the_command(argv: list[str], expect: dict) -> None:
    args = vars(build_parser().parse_args(argv))
    assert {k: args[k] for k in expect} == expect


def test_metrics_need_an_address() -> None:
    args = build_parser().parse_args(["ctl", "metrics"])
    with pytest.raises(Exception, match="no metrics address"):
        ctl.run(args)

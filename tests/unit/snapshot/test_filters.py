"""containerd filter syntax: parse errors and matching over snapshot fields."""

import pytest

from pynydus.errors import InvalidArgument
from pynydus.snapshot.filters import parse, snapshot_adaptor

SNAPS = {
    "a": snapshot_adaptor("a", "", 3, {"containerd.io/gc.root": "x", "tier": "base"}),
    "b": snapshot_adaptor("b", "a", 2, {"tier": "app"}),
    "v": snapshot_adaptor("v", "a", 1, {}),
    "dot.name": snapshot_adaptor("dot.name", "a", 3, {"k": "a,b"}),
}


def names(*filters: str) -> set[str]:
    flt = parse(list(filters))
    return {n for n, a in SNAPS.items() if flt.match(a)}


@pytest.mark.parametrize(
    "filters, expected",
    [
        ((), {"a", "b", "v", "dot.name"}),
        (("",), {"a", "b", "v", "dot.name"}),
        (("kind==committed",), {"a", "dot.name"}),
        (("kind==active",), {"b"}),
        (("kind==view",), {"v"}),
        (("kind!=committed",), {"b", "v"}),
        (("name==b",), {"b"}),
        (('name=="dot.name"',), {"dot.name"}),
        (("name==dot.name",), {"dot.name"}),
        (("parent==a",), {"b", "v", "dot.name"}),
        (("parent==a,kind==active",), {"b"}),
        (("kind==active", "kind==view"), {"b", "v"}),
        (("labels.tier",), {"a", "b"}),
        (('labels."containerd.io/gc.root"',), {"a"}),
        (('labels."containerd.io/gc.root"==x',), {"a"}),
        (("labels.tier!=base",), {"b", "v", "dot.name"}),
        (("labels.tier~=^ba",), {"a"}),
        (("name~=/^d.t/",), {"dot.name"}),
        (("name~=|^[ab]$|",), {"a", "b"}),
        (('labels.k=="a,b"',), {"dot.name"}),
        (("  kind == committed , labels.tier == base ",), {"a"}),
        (("nosuchfield",), set()),
        (("nosuchfield!=x",), {"a", "b", "v", "dot.name"}),
    ],
)
def test_matching(filters: tuple[str, ...], expected: set[str]) -> None:
    assert names(*filters) == expected


@pytest.mark.parametrize(
    "bad",
    ["kind==", "kind=", "kind===x", "kind==a b", ",", "kind==a,", '"unterminated', "name~=(",
     "labels.", ".x", "kind==x extra", 'name=="\\q"', "a=~b"],
)
def test_parse_errors_are_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse([bad])
    assert "filters: parse error" in str(err.value)


def test_error_points_at_position() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse(["kind==a b"])
    assert ">|b|<" in str(err.value)

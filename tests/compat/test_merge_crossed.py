"""Matrix cell 3: merges crossed between upstream and us.

OCI layers (whiteouts, opaque directories, hardlinks, files replacing directories and
back; trees.layered_image and the merge property tests' random layers) are built one
by one as converters do (``--whiteout-spec none``: whiteouts stay entries for the merge
to apply), by upstream's ``nydus-image create -t tar-rafs`` or by ``pynydus image build``,
and merged by the other side's merge:

* ours-built layers, ``nydus-image merge``d: served by pynydusd;
* upstream-built layers, ``pynydus image merge``d: served by upstream's nydusd;
* as references, each side's merge of its own layers served by the other's daemon;
* and ours through our drop-in ``nydus-image create``/``merge`` (upstream's command
  lines, "ours-cli"), served by upstream's nydusd.

The served tree must equal the OCI layer application computed on its own
(``tests/harness/rafs_layers.expected_listing``): type, mode, owner, size, mtime,
xattrs, symlink target, device, nlink, content and hardlink groups per path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.rafs_layers import Ent, expected_listing, mount_listing

from .conftest import ServeFn
from .test_upstream_to_ours import UpstreamBug, upstream_bug
from .trees import T1, T2, layered_image, random_image, write_layers
from .upstream import check_view, nydus_image
from .views import NYDUS_IMAGE, assert_reader_agrees, ours


def dropin(*args: str | Path) -> object:
    """Our ``nydus-image`` with upstream's command line."""
    return ours(*args, exe=NYDUS_IMAGE)


LAYER_SETS = {
    "layered": layered_image,
    "random-seed7": lambda: random_image(7),
}

# (who builds the layers, who merges, who serves)
DIRECTIONS = [
    ("ours", "upstream", "pynydusd"),
    ("upstream", "ours", "nydusd"),
    ("ours", "ours", "nydusd"),
    ("upstream", "upstream", "pynydusd"),
    ("ours-cli", "ours-cli", "nydusd"),
]


def build_layers(who: str, tars: list[Path], work: Path) -> tuple[list[Path], Path]:
    """Per-layer bootstraps, each named ``<its blob id>.boot``: upstream's merge (run,
    as converters run it, without access to the blobs) names each layer's blob after its
    bootstrap file, so converters save them under the blob's digest."""
    blob_dir = work / "blobs"
    blob_dir.mkdir(parents=True, exist_ok=True)
    boots = []
    for i, tar in enumerate(tars):
        own = work / f"blobs{i}"  # the layer's own blob (two layers may write the same)
        own.mkdir()
        boot = work / f"layer{i}.boot"
        if who in ("upstream", "ours-cli"):
            (nydus_image if who == "upstream" else dropin)(
                "create", "-t", "tar-rafs", "--whiteout-spec", "none",
                "--compressor", "zstd", "-B", boot, "-D", own, tar)
        else:
            ours("image", "build", "--type", "tar-rafs", "--whiteout-spec", "none",
                 "--compressor", "zstd", "--progress", "quiet", "--bootstrap", boot,
                 "--blob-dir", own, tar)
        for blob in own.iterdir():  # none for a layer without file data
            boot = boot.rename(work / f"{blob.name}.boot")
            blob.replace(blob_dir / blob.name)
        boots.append(boot)
    return boots, blob_dir


def merge_layers(who: str, boots: list[Path], out: Path) -> None:
    if who in ("upstream", "ours-cli"):
        (nydus_image if who == "upstream" else dropin)("merge", "-B", out, *boots)
    else:
        ours("image", "merge", "--bootstrap", out, *boots)


def crossed(layers: list[list[Ent]], builder: str, merger: str, daemon: str, work: Path,
            serve: ServeFn) -> None:
    tars = write_layers(layers, work / "tars")
    boots, blob_dir = build_layers(builder, tars, work)
    merged = work / "merged.boot"
    merge_layers(merger, boots, merged)
    up = check_view(merged, blob_dir, workdir=work)  # upstream accepts the merged image
    assert_reader_agrees(merged, up)  # and sees it as we do
    mnt = serve(daemon, merged, blob_dir)
    got = mount_listing(mnt)
    want = expected_listing(layers, data="sha256")
    want["/"] = got["/"]  # nydusd serves a synthesized root; the layers have none
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))[:10]
    diffs = [(p, want[p], got[p]) for p in sorted(want) if want[p] != got[p]]
    assert not diffs, "\n".join(f"{p}:\n  expected {w}\n  served   {g}" for p, w, g in diffs[:6])


@pytest.mark.parametrize("layers", sorted(LAYER_SETS))
@pytest.mark.parametrize(("builder", "merger", "daemon"), DIRECTIONS,
                         ids=[f"{b}-layers-{m}-merge-{d}" for b, m, d in DIRECTIONS])
def test_crossed_merge_serves_the_applied_layers(layers: str, builder: str, merger: str,
                                                 daemon: str, workdir: Path,
                                                 serve: ServeFn) -> None:
    crossed(LAYER_SETS[layers](), builder, merger, daemon, workdir, serve)


def cross_layer_hardlink() -> list[list[Ent]]:
    """A hardlink in layer 2 whose target is a file of layer 1 (OCI allows it: the link
    names a path of the lower layers)."""
    return [
        [Ent("dir", "data", mode=0o755, mtime=T1),
         Ent("file", "data/base", data=b"base file\n" * 100, mtime=T1,
             xattrs={"user.l": b"1"})],
        [Ent("dir", "data", mode=0o755, mtime=T2),
         Ent("hardlink", "data/link-to-lower", link="data/base", mtime=T2)],
    ]


HARDLINK_EVIDENCE = "unknown target /data/base for hardlink /data/link-to-lower"


@pytest.mark.xfail(raises=UpstreamBug, strict=True, reason=(
    "nydus-image 2.2 refuses a tar layer with a hardlink to a file of a lower layer "
    "(containerd and docker apply such layers; OCI leaves them open, image-spec issue "
    "#1204): 'unknown target /data/base for hardlink /data/link-to-lower'"))
def test_upstream_builds_a_hardlink_to_a_lower_layer(workdir: Path, serve: ServeFn) -> None:
    with upstream_bug(HARDLINK_EVIDENCE):
        crossed(cross_layer_hardlink(), "upstream", "ours", "nydusd", workdir, serve)


def test_our_hardlink_to_a_lower_layer_merged_by_us_serves_in_nydusd(
        workdir: Path, serve: ServeFn) -> None:
    """Our layers carry such a link as a marker that our merge binds to its target
    (docs/decisions.md); upstream's merge has no form for it (docs/compat.md), but the
    merged image is plain RAFS that upstream serves."""
    crossed(cross_layer_hardlink(), "ours", "ours", "nydusd", workdir, serve)

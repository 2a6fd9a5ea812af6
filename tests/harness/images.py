"""The e2e test images and the shell check that proves a rootfs was assembled right.

``layered_image()`` is busybox plus three layers that exercise what a snapshotter's
layer stacking must get right: overrides, file and directory whiteouts, opaque
directories, a file deleted and re-added, relative/absolute symlinks, hardlinks (in a
lower and in a middle layer), modes, owners, an executable, a deterministic 1 MiB
binary, an empty file and a long name. ``CHECK_SCRIPT`` runs inside the container
(busybox sh) and prints ``key=value`` lines; ``expected_check_output()`` is what a
correct rootfs prints (containerd's own overlayfs snapshotter is the reference).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pynydus.convert.converter import ConvertOptions, convert

from .oci import Image, Layer, busybox_layer
from .registry import Registry, write_htpasswd

LONG_NAME = "long-" + "n" * 190 + ".txt"


def _big_blob(size: int = 1 << 20) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


BIG = _big_blob()
BIG_SHA = hashlib.sha256(BIG).hexdigest()

# A quick look into a running container of ``layered_image()``: a file of its top layer
# and the digest of the big file; ``assert_quick_check`` judges what it printed.
QUICK_CHECK = "cat /app/v3.txt; sha256sum /app/big.bin"


def assert_quick_check(out: str) -> None:
    lines = out.split("\n")
    assert lines[0] == "three", out
    assert lines[1].split()[0] == BIG_SHA, out


def pause_image() -> Image:
    """What a CRI pod's sandbox container runs: it only has to stay up until stopped."""
    return Image([busybox_layer()], cmd=["/bin/sleep", "inf"])


@contextmanager
def private_nydus_copy(work: Path, src: str, user: str,
                       password: str) -> Iterator[tuple[Registry, str]]:
    """A registry of its own under ``work`` that wants ``user``/``password`` (basic auth),
    holding the Nydus conversion of the OCI image ``src``: (the registry, the Nydus ref)."""
    htpasswd = write_htpasswd(work / "htpasswd", user, password)
    with Registry(work / "reg", htpasswd=htpasswd) as private:
        ref = private.ref("private/layered", "nydus")
        convert(ConvertOptions(source=src, target=ref, source_insecure=True,
                               target_insecure=True, target_auth=f"{user}:{password}"))
        yield private, ref


def layered_image() -> Image:
    l1 = (Layer("app-v1")
          .file("app/hello.txt", "hello v1\n")
          .file("app/keep.txt", "keep\n")
          .file("app/gone.txt", "to be deleted\n")
          .file("app/dir-gone/a.txt", "a\n")
          .file("app/dir-gone/sub/b.txt", "b\n")
          .file("app/opq/old1.txt", "old1\n")
          .file("app/opq/sub/old2.txt", "old2\n")
          .file("app/link-target.txt", "target\n")
          .symlink("app/sym", "link-target.txt")
          .symlink("app/abs-sym", "/app/hello.txt")
          .file("app/hard1.txt", "hardlinked\n")
          .hardlink("app/hard2.txt", "app/hard1.txt")
          .file("app/exec.sh", "#!/bin/sh\necho exec-ok\n", 0o755)
          .file("app/big.bin", BIG)
          .file("app/empty", b"")
          .file("app/readded.txt", "first\n"))
    l2 = (Layer("app-v2")
          .file("app/hello.txt", "hello v2\n")
          .whiteout("app/gone.txt")
          .whiteout("app/dir-gone")
          .opaque("app/opq")
          .file("app/opq/new.txt", "new\n")
          .whiteout("app/readded.txt")
          .symlink("app/dirlink", "opq")
          .file("app/l2/hl-a", "layer2 link\n")
          .hardlink("app/l2/hl-b", "app/l2/hl-a")
          .file("app/ro.txt", "read only\n", 0o400)
          .file("app/owned.txt", "owned\n", uid=1000, gid=1000))
    l3 = (Layer("app-v3")
          .file("app/readded.txt", "second\n")
          .file("app/v3.txt", "three\n")
          .dir("app/private", 0o700)
          .file("app/private/secret", "s3cret\n", 0o600)
          .file(f"app/{LONG_NAME}", "long\n"))
    return Image([busybox_layer(), l1, l2, l3], cmd=["/bin/sh", "-c", "cat /app/hello.txt"])


def small_image(tag_text: str = "small") -> Image:
    """busybox + one tiny layer; for the demo and benchmarks."""
    app = (Layer("app")
           .file("app/hello.sh", f'#!/bin/sh\necho "hello from {tag_text}"\n', 0o755)
           .file("app/data.txt", "data\n"))
    return Image([busybox_layer(), app], cmd=["/bin/sh", "/app/hello.sh"])


# Runs under busybox sh inside the container; one key=value line per property.
CHECK_SCRIPT = r"""
cd /app || exit 1
e() { [ -e "$1" ] || [ -L "$1" ] && echo present || echo absent; }
echo "hello=$(cat hello.txt)"
echo "keep=$(cat keep.txt)"
echo "gone=$(e gone.txt) wh_marker=$(e .wh.gone.txt)"
echo "dirgone=$(e dir-gone)"
echo "opq=$(ls -A opq | tr '\n' ' ')"
echo "opq_marker=$(e opq/.wh..wh..opq)"
echo "sym=$(readlink sym):$(cat sym)"
echo "abssym=$(readlink abs-sym):$(cat abs-sym)"
echo "hard=$(cat hard2.txt):nlink=$(stat -c %h hard1.txt)"
[ "$(stat -c %i hard1.txt)" = "$(stat -c %i hard2.txt)" ] && echo hardino=same || echo hardino=differ
echo "hardl2=$(cat l2/hl-b):nlink=$(stat -c %h l2/hl-a)"
echo "exec=$(./exec.sh)"
echo "big=$(sha256sum big.bin | cut -d' ' -f1) size=$(stat -c %s big.bin)"
echo "empty=$(stat -c %s empty)"
echo "readded=$(cat readded.txt)"
echo "v3=$(cat v3.txt)"
echo "modes=$(stat -c %a ro.txt) $(stat -c %a private) $(stat -c %a private/secret) $(stat -c %a exec.sh)"
echo "owner=$(stat -c %u:%g owned.txt)"
echo "dirlink=$(readlink dirlink):$(ls dirlink | tr '\n' ' ')"
echo "long=$(cat long-nnn*.txt)"
echo "tmp=$(stat -c %a /tmp)"
echo "write=$(echo w >/app/written && cat /app/written)"
echo "check-done"
""".strip()


def expected_check_output() -> str:
    big = BIG_SHA
    return "\n".join([
        "hello=hello v2",
        "keep=keep",
        "gone=absent wh_marker=absent",
        "dirgone=absent",
        "opq=new.txt ",
        "opq_marker=absent",
        "sym=link-target.txt:target",
        "abssym=/app/hello.txt:hello v2",
        "hard=hardlinked:nlink=2",
        "hardino=same",
        "hardl2=layer2 link:nlink=2",
        "exec=exec-ok",
        f"big={big} size={len(BIG)}",
        "empty=0",
        "readded=second",
        "v3=three",
        "modes=400 700 600 755",
        "owner=1000:1000",
        "dirlink=opq:new.txt ",
        "long=long",
        "tmp=1777",
        "write=w",
        "check-done",
    ])

"""dm-verity hash trees for exported block images: the geometry and a streaming builder.

The tree is dm-verity's format 1 with sha256, no salt and no superblock: what upstream's
``nydus-image export --block --verity`` prints as ``--no-superblock --format=1 -s ""
--hash=sha256 --data-block-size=512 --hash-block-size=4096``. Every data block is
hashed; the digests are packed 128 to a 4096-byte hash block (level 0); each level's
blocks are hashed into the next, until a level is one block, whose digest is the root
hash. On disk the levels follow each other from the top (one block) down to level 0,
starting at ``hash_offset`` (the data rounded up to 4 KiB, in the same file). With a
single data block there is no level at all and the root is that block's digest.

Unused digest slots of a hash block are zero, as ``veritysetup format`` writes them and
``veritysetup verify`` requires (upstream fills them with the digest of a zero page,
which the kernel accepts but veritysetup's userspace check does not; docs/decisions.md).

:func:`geometry` is pure; :class:`TreeBuilder` takes data blocks in order and writes
each hash block to its place as soon as it is full, so memory is one block per level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from pynydus.errors import InvalidArgument

__all__ = ["HASH_BLOCK_SIZE", "TreeBuilder", "VerityGeometry", "geometry", "parse_block_info"]

HASH_BLOCK_SIZE = 4096
DIGEST_SIZE = 32  # sha256
_PER_BLOCK = HASH_BLOCK_SIZE // DIGEST_SIZE  # 128 digests per hash block
_MAX_DATA_BLOCKS = 2**32 - 1  # what the block info label (and Kata) accept


@dataclass(frozen=True)
class VerityGeometry:
    """Where the tree of ``data_blocks`` blocks of ``data_block_size`` bytes lies.

    ``level_blocks[i]`` is the number of hash blocks of level ``i`` (0 = the digests of
    the data blocks); ``hash_offset`` is the byte offset of the tree in the file.
    """

    data_block_size: int
    data_blocks: int
    hash_offset: int
    level_blocks: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.level_blocks)

    @property
    def hash_blocks(self) -> int:
        return sum(self.level_blocks)

    @property
    def end(self) -> int:
        """Where the tree ends: the size of the file that holds data and tree."""
        return self.hash_offset + self.hash_blocks * HASH_BLOCK_SIZE

    def level_offset(self, level: int) -> int:
        """Byte offset of ``level``'s first hash block (the top level comes first)."""
        above = sum(self.level_blocks[level + 1:])
        return self.hash_offset + above * HASH_BLOCK_SIZE

    def options(self, root_hash: str) -> str:
        """The veritysetup arguments that open (or verify) this tree, as upstream prints them."""
        return (f'--no-superblock --format=1 -s "" --hash=sha256 '
                f"--data-block-size={self.data_block_size} --hash-block-size={HASH_BLOCK_SIZE} "
                f"--data-blocks {self.data_blocks} --hash-offset {self.hash_offset} {root_hash}")

    def block_info(self, root_hash: str) -> str:
        """The ``nydus-*-block`` label value: ``<data blocks>,<hash offset>,sha256:<root>``."""
        return f"{self.data_blocks},{self.hash_offset},sha256:{root_hash}"


def geometry(data_blocks: int, data_block_size: int = 512, hash_offset: int | None = None) -> VerityGeometry:
    """The tree of ``data_blocks`` blocks; ``hash_offset`` defaults to the data rounded up
    to 4 KiB (where upstream puts it, in the same file). InvalidArgument for a geometry
    dm-verity cannot take."""
    if not 0 < data_blocks <= _MAX_DATA_BLOCKS:
        raise InvalidArgument(f"verity: {data_blocks} data blocks, want 1..{_MAX_DATA_BLOCKS}")
    if data_block_size not in (512, 1024, 2048, 4096):
        raise InvalidArgument(f"verity: data block size {data_block_size}")
    data_end = data_blocks * data_block_size
    if hash_offset is None:
        hash_offset = -(-data_end // HASH_BLOCK_SIZE) * HASH_BLOCK_SIZE
    if hash_offset % HASH_BLOCK_SIZE or hash_offset < data_end:
        raise InvalidArgument(f"verity: hash offset {hash_offset} must be a multiple of "
                              f"{HASH_BLOCK_SIZE} at or after the data's end ({data_end})")
    levels: list[int] = []
    n = data_blocks
    while n > 1:
        n = -(-n // _PER_BLOCK)
        levels.append(n)
    return VerityGeometry(data_block_size, data_blocks, hash_offset, tuple(levels))


def parse_block_info(value: str) -> tuple[int, int, str]:
    """``(data blocks, hash offset, root hash hex)`` of a ``nydus-*-block`` label value
    (InvalidArgument if it is not one)."""
    parts = value.split(",")
    if len(parts) != 3 or not parts[2].startswith("sha256:"):
        raise InvalidArgument(f"block info {value!r}: want <blocks>,<hash offset>,sha256:<hex>")
    root = parts[2][len("sha256:"):]
    if len(root) != 64 or any(c not in "0123456789abcdef" for c in root):
        raise InvalidArgument(f"block info {value!r}: root hash is not 64 hex digits")
    try:
        return int(parts[0]), int(parts[1]), root
    except ValueError:
        raise InvalidArgument(f"block info {value!r}: counts are not numbers") from None


class TreeBuilder:
    """Builds the tree of ``geom`` from data blocks fed in order.

    ``write(offset, block)`` is called once per hash block, at its byte offset in the
    file (level 0 blocks in order as they fill, upper levels as they complete).
    :meth:`finish` writes what is left and returns the root hash (hex).
    """

    def __init__(self, geom: VerityGeometry, write: Callable[[int, bytes], None]) -> None:
        self.geom = geom
        self._write = write
        self._fed = 0  # data blocks hashed so far
        self._pending: list[list[bytes]] = [[] for _ in geom.level_blocks]  # digests per level
        self._written = [0] * geom.levels  # hash blocks written per level
        self._single: bytes | None = None  # the digest when there is no level

    def feed(self, data: bytes | memoryview) -> None:
        """Hash ``data``: whole data blocks, continuing where the last call stopped."""
        bs = self.geom.data_block_size
        if len(data) % bs:
            raise InvalidArgument(f"verity: {len(data)} bytes are not whole {bs}-byte blocks")
        count = len(data) // bs
        if self._fed + count > self.geom.data_blocks:
            raise InvalidArgument(f"verity: more than {self.geom.data_blocks} data blocks")
        view = memoryview(data)
        sha = hashlib.sha256
        digests = [sha(view[i:i + bs]).digest() for i in range(0, len(view), bs)]
        self._fed += count
        if not self.geom.levels:
            self._single = digests[0]
            return
        self._add(0, digests)

    def feed_zeros(self, count: int) -> None:
        """Hash ``count`` data blocks of zeros (a hole) without materialising them."""
        if count <= 0:
            return
        if self._fed + count > self.geom.data_blocks:
            raise InvalidArgument(f"verity: more than {self.geom.data_blocks} data blocks")
        zero = hashlib.sha256(bytes(self.geom.data_block_size)).digest()
        self._fed += count
        if not self.geom.levels:
            self._single = zero
            return
        while count:
            room = _PER_BLOCK - len(self._pending[0])
            take = min(room, count)
            self._add(0, [zero] * take)
            count -= take

    def _add(self, level: int, digests: list[bytes]) -> None:
        pending = self._pending[level]
        pending.extend(digests)
        while len(pending) >= _PER_BLOCK:
            self._emit(level, b"".join(pending[:_PER_BLOCK]))
            del pending[:_PER_BLOCK]

    def _emit(self, level: int, block: bytes) -> None:
        if len(block) < HASH_BLOCK_SIZE:
            block = block + bytes(HASH_BLOCK_SIZE - len(block))
        index = self._written[level]
        if index >= self.geom.level_blocks[level]:
            raise InvalidArgument(f"verity: level {level} overflows its {self.geom.level_blocks[level]} blocks")
        self._write(self.geom.level_offset(level) + index * HASH_BLOCK_SIZE, block)
        self._written[level] = index + 1
        if level + 1 < self.geom.levels:
            self._add(level + 1, [hashlib.sha256(block).digest()])
        else:
            self._root = hashlib.sha256(block).hexdigest()

    def finish(self) -> str:
        """Flush the partly filled blocks; the root hash (hex). InvalidArgument if fewer
        data blocks were fed than the geometry holds."""
        if self._fed != self.geom.data_blocks:
            raise InvalidArgument(f"verity: {self._fed} of {self.geom.data_blocks} data blocks fed")
        if not self.geom.levels:
            assert self._single is not None
            return self._single.hex()
        for level in range(self.geom.levels):
            if self._pending[level]:
                self._emit(level, b"".join(self._pending[level]))
                self._pending[level] = []
        return self._root

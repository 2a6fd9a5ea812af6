"""A gzip layer inflated with the points where inflating may resume: a ZRAN build's input.

A ZRAN (``targz-ref``) image cuts a gzip layer into inflate contexts (spec §2.5): each
begins where a deflate block begins, with the 32 KiB of output before it as the
dictionary. :class:`GzipIndexer` is a readable stream of the layer's tar (hand it to
:class:`~pynydus.rafs.source.TarSource` as a plain tar) that inflates the layer with
``inflate(Z_BLOCK)`` (:mod:`pynydus.rafs.format.libz`), so it stops at every block
end, and notes there a :class:`Checkpoint` (compressed and uncompressed offset, the
bits of the last byte still unread, the window). It also hashes the compressed bytes:
their sha256 is the layer digest, which names the blob.

The tar reader runs on another thread, behind the inflater by what it buffers (a few
MiB). The builder asks, at each chunk it records, for the last checkpoint at or before
the chunk's start (:meth:`checkpoint`) and for the compressed offsets around it
(:meth:`in_at`, :meth:`in_after`); those questions come in increasing order, so what
lies before them is dropped. Windows (32 KiB each) are kept for checkpoints at least
:data:`KEEP_EVERY` bytes of output apart: a stream of tiny blocks (a writer that
flushes often) cannot make the kept windows grow past what the reader buffers divided
by that distance, and a context starts at most that much earlier than it could.

Each kept checkpoint also gets its *lead*: the compressed bytes from its ``in_pos`` on
that inflate to the next 32 KiB of output (or to the member's end), the only output
that can reach back into the window; the builder uses them to find which window bytes
the layer really refers to (:mod:`pynydus.rafs.builder.zranblob`).

Gzip members follow one another (any number, zero padding between allowed, as
:mod:`gzip` allows); each member starts with an empty window. Damage (a bad deflate
stream, trailer, or bytes that are neither padding nor a member) is a FormatError.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from dataclasses import dataclass, field
from typing import BinaryIO

from pynydus.errors import FormatError
from pynydus.rafs.format.libz import (
    DT_BLOCK_END,
    DT_LAST_BLOCK,
    WINDOW,
    Z_BLOCK,
    Z_BUF_ERROR,
    Z_STREAM_END,
    Inflater,
)

__all__ = ["KEEP_EVERY", "Checkpoint", "GzipIndexer"]

#: Kept checkpoints are at least this many bytes of output apart.
KEEP_EVERY = 32 << 10
_READ = 256 << 10
#: Most output per inflate call: the (output, input) positions noted after each call
#: place a chunk's end within this much output, hence its compressed end within a few KiB.
_STEP = 64 << 10
#: Windows kept ahead of the reader before they are thinned (16 MiB of windows).
_MAX_AHEAD = 512
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A point where inflating may resume: at compressed offset ``in_pos`` after priming
    ``bits`` bits (the high bits of ``byte``, the byte before ``in_pos``), with
    ``window`` as the dictionary, producing the tar from ``out_pos`` on."""

    in_pos: int
    out_pos: int
    bits: int
    byte: int
    member: int
    window: bytes
    # the lead (module header), filled once the inflater is 32 KiB of output further
    lead: list[bytes] = field(default_factory=list, compare=False, repr=False)


class GzipIndexer:
    """Readable stream of the tar inside gzip layer ``f``, noting checkpoints as it goes.

    ``read`` is for one thread (the tar reader's); :meth:`checkpoint`, :meth:`in_at`
    and :meth:`in_after` may be called from another, with non-decreasing positions.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._z = Inflater(31)
        self._sha = hashlib.sha256()
        self.size_in = 0  # compressed bytes read from f
        self.out_pos = 0  # tar bytes produced
        self.member = 0
        self.members = 0
        self._state = "member"  # member | between (after a member's trailer) | end
        self._cur = b""  # the current input buffer, fed to the inflater
        self._cur_base = 0  # compressed offset of _cur[0]
        self._prev_byte = 0  # last byte of the buffer before _cur
        self._tail = b""  # last <= 32 KiB of this member's output
        self._lock = threading.Lock()
        # (out_pos, in_pos) after every inflate call: the map for in_at/in_after.
        self._s_out: list[int] = []
        self._s_in: list[int] = []
        self._s_lo = 0
        self._cps: list[Checkpoint] = []
        self._cp_outs: list[int] = []
        self._cp_lo = 0
        self._last_kept: Checkpoint | None = None
        # compressed bytes from _recent_base on (back to the oldest lead not yet taken)
        self._recent = bytearray()
        self._recent_base = 0
        self._leads: list[Checkpoint] = []  # kept checkpoints whose lead is not taken yet

    # ------------------------------------------------------------------ reading
    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` tar bytes (all that is left for ``n < 0``); short only at the end."""
        parts: list[bytes] = []
        got = 0
        while (n < 0 or got < n) and self._state != "end":
            out = self._step(_READ * 4 if n < 0 else n - got)
            if out:
                parts.append(out)
                got += len(out)
        return b"".join(parts)

    def drain(self) -> None:
        """Read to the end of the layer (its digest covers every byte)."""
        while self._state != "end":
            self._step(_READ * 4)

    def hexdigest(self) -> str:
        """sha256 of the compressed bytes read so far (all of them after :meth:`drain`)."""
        return self._sha.hexdigest()

    def _in_pos(self) -> int:
        return self._cur_base + len(self._cur) - self._z.avail_in

    def _refill(self) -> bool:
        data = self._f.read(_READ)
        if not data:
            return False
        data = bytes(data)
        self._sha.update(data)
        if self._cur:
            self._prev_byte = self._cur[-1]
        self._cur_base = self.size_in
        self.size_in += len(data)
        self._cur = data
        self._keep_recent(data, self._cur_base)
        self._z.feed(data)
        return True

    def _keep_recent(self, data: bytes, base: int) -> None:
        if not self._leads:
            self._recent = bytearray(data)
            self._recent_base = base
            return
        if base != self._recent_base + len(self._recent):  # a gap (padding): not needed
            self._recent = bytearray(data)
            self._recent_base = base
            return
        self._recent += data

    def _take_leads(self, in_pos: int, ended: bool) -> None:
        """Give the checkpoints whose next 32 KiB of output is out (or whose member
        ended) their lead: the compressed bytes from theirs to ``in_pos``."""
        while self._leads and (ended or self.out_pos - self._leads[0].out_pos >= WINDOW):
            cp = self._leads.pop(0)
            lo = cp.in_pos - self._recent_base
            if lo >= 0:
                cp.lead.append(bytes(self._recent[lo:in_pos - self._recent_base]))
        keep_from = self._leads[0].in_pos if self._leads else in_pos
        drop = keep_from - self._recent_base
        if drop > (1 << 20):
            del self._recent[:drop]
            self._recent_base = keep_from

    def _step(self, want: int) -> bytes:
        if self._state == "between":
            self._next_member()
            return b""
        if self._z.avail_in == 0 and not self._refill():
            raise FormatError(f"gzip layer: truncated at compressed offset {self.size_in} "
                              f"(member {self.member} not finished)")
        out, rc = self._z.inflate(min(want, _STEP), Z_BLOCK)
        in_pos = self._in_pos()
        if out:
            self.out_pos += len(out)
            self._tail = (self._tail + out)[-WINDOW:]
        if self._leads:
            self._take_leads(in_pos, rc == Z_STREAM_END)
        with self._lock:
            self._s_out.append(self.out_pos)
            self._s_in.append(in_pos)
        if rc == Z_STREAM_END:
            self.members += 1
            self._state = "between"
        elif self._z.data_type & (DT_BLOCK_END | DT_LAST_BLOCK) == DT_BLOCK_END:
            # (at the end of a member's last block zlib stops too, with the "last
            # block" bit: nothing resumes there, the member's trailer follows)
            self._note(in_pos)
        elif rc == Z_BUF_ERROR and not out and self._z.avail_in:
            raise FormatError(f"gzip layer: inflate stuck at compressed offset {in_pos}")
        return out

    def _note(self, in_pos: int) -> None:
        bits = self._z.data_type & 7
        byte = 0
        if bits:
            used = len(self._cur) - self._z.avail_in
            byte = self._cur[used - 1] if used else self._prev_byte
        last = self._last_kept
        if last is not None and last.member == self.member \
                and self.out_pos - last.out_pos < KEEP_EVERY:
            return
        cp = Checkpoint(in_pos, self.out_pos, bits, byte, self.member, self._tail)
        self._last_kept = cp
        if cp.window:
            self._leads.append(cp)
        with self._lock:
            self._cps.append(cp)
            self._cp_outs.append(cp.out_pos)
            if len(self._cps) - self._cp_lo > _MAX_AHEAD:
                self._thin()

    def _thin(self) -> None:
        """Drop every other checkpoint after the oldest one the reader may still ask
        for: the reader is far behind (it asks only at chunks it records), and the
        kept windows must stay bounded."""
        lo = self._cp_lo
        keep = self._cps[lo + 1::2]
        if self._cps[-1] is not keep[-1]:
            keep.append(self._cps[-1])
        self._cps[lo + 1:] = keep
        self._cp_outs[lo + 1:] = [c.out_pos for c in keep]

    def _next_member(self) -> None:
        """After a member's trailer: skip zero padding; the next member or the end."""
        rest = self._z.unused_input()
        base = self._in_pos()
        while True:
            stripped = rest.lstrip(b"\0")
            base += len(rest) - len(stripped)
            rest = stripped
            if len(rest) >= 2:
                break
            more = self._f.read(_READ)
            if not more:
                if rest:
                    raise FormatError(f"gzip layer: stray byte at compressed offset {base}")
                self._state = "end"
                return
            more = bytes(more)
            self._sha.update(more)
            self.size_in += len(more)
            rest += more
        if not rest.startswith(_GZIP_MAGIC):
            raise FormatError(f"gzip layer: bytes at compressed offset {base} are neither "
                              "zero padding nor a gzip member")
        self._z.reset(31)
        self._cur_base = base
        self._cur = rest
        self._keep_recent(rest, base)
        self._z.feed(rest)
        self.member += 1
        self._tail = b""
        self._state = "member"

    # ------------------------------------------------------------------ questions
    def checkpoint(self, out: int) -> Checkpoint:
        """The last kept checkpoint at or before tar offset ``out``; the ones before it
        are dropped (ask with non-decreasing ``out``). FormatError if ``out`` comes
        before every checkpoint still kept."""
        with self._lock:
            cps = self._cps
            i = bisect.bisect_right(self._cp_outs, out, self._cp_lo) - 1
            if i < self._cp_lo:
                raise FormatError(f"gzip layer: no resume point before tar offset {out}")
            self._cp_lo = i
            if i > 1024:
                del cps[:i]
                del self._cp_outs[:i]
                self._cp_lo = 0
            return cps[self._cp_lo]

    def in_at(self, out: int) -> int:
        """Compressed offset at which the output had reached at most ``out``."""
        with self._lock:
            i = max(bisect.bisect_right(self._s_out, out, self._s_lo) - 1, self._s_lo)
            self._s_lo = i
            if i > 4096:
                del self._s_out[:i]
                del self._s_in[:i]
                self._s_lo = i = 0
            return self._s_in[i]

    def in_after(self, out: int) -> int:
        """Compressed offset by which the output had reached at least ``out``."""
        with self._lock:
            i = bisect.bisect_left(self._s_out, out, self._s_lo)
            if i >= len(self._s_out):
                raise FormatError(f"gzip layer: tar offset {out} not produced yet")
            return self._s_in[i]

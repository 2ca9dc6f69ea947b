"""The BPF ring buffer read through its mmap'ed pages, a batch at a time, without a callback
per record (the probes submit without wake-ups; the session drains every few milliseconds)."""

from __future__ import annotations

import mmap
import struct

from cmtrace.record.records import PYTHON_RECORD_MIN_TYPE, TYPE_OFFSET

# The ring's own 8-byte record header (length with BUSY/DISCARD bits) is followed by the payload,
# whose `type` sits at TYPE_OFFSET: both are read in one unpack.
RING_HEADER_SIZE = 8


class RingReader:
    """Consumer of a BPF ring buffer through its mmap'ed pages, without a callback per record.

    The kernel maps the data area twice in a row, so a record that wraps around the end reads
    as one contiguous slice. A drain copies everything between the consumer and producer
    positions in one go, walks the 8-byte record headers (length with BUSY/DISCARD bits), stops
    at the first record still being written, and only then advances the consumer position.

    Only the pages a drain reads are mapped, and only while it reads them: a mapping of the
    ring's data area is resident in full at once (the kernel inserts every page at mmap), and
    the default 32 MiB ring, mapped twice, was 64 MiB of the collector's RSS for as long as it
    ran, though an --aggregate recording moves a few KB a second through it.
    """

    BUSY = 1 << 31
    DISCARD = 1 << 30
    _HEAD = struct.Struct(f"<I{RING_HEADER_SIZE - 4 + TYPE_OFFSET}xH")  # length, payload `type`

    def __init__(self, map_fd: int, size: int):
        page = mmap.PAGESIZE
        self.size = size
        self.mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._fd = map_fd
        self._page = page

    def read(self) -> tuple[bytes, list[int], list[bytes]]:
        """(copy of the new bytes, payload offsets of fd records in it, Python records)."""
        consumer = int.from_bytes(self._consumer[0:8], "little")
        producer = int.from_bytes(self._producer[0:8], "little")
        if producer == consumer:
            return b"", [], []
        buf = self._copy(consumer & self.mask, producer - consumer)
        pos, end = 0, len(buf)
        fd_offsets: list[int] = []
        python_records: list[bytes] = []
        busy, discard, unpack = self.BUSY, self.DISCARD, self._HEAD.unpack_from
        while pos < end:
            header, rtype = unpack(buf, pos)
            if header & busy:
                break
            length = header & ~(busy | discard)
            payload = pos + RING_HEADER_SIZE
            if not header & discard:
                if rtype >= PYTHON_RECORD_MIN_TYPE:
                    python_records.append(buf[payload : payload + length])
                else:
                    fd_offsets.append(payload)
            pos += (length + 15) & ~7  # 8-byte header, payload rounded up to 8
        self._consumer[0:8] = (consumer + pos).to_bytes(8, "little")
        return buf, fd_offsets, python_records

    def _copy(self, start: int, length: int) -> bytes:
        """`length` bytes of the data area from `start` (< size; start + length <= 2 * size, the
        second copy), through a mapping of just their pages (offset: the two position pages)."""
        first = start - start % self._page
        span = start + length - first
        window = mmap.mmap(self._fd, span, mmap.MAP_SHARED, mmap.PROT_READ,
                           offset=2 * self._page + first)  # fmt: skip
        try:
            return window[start - first : start - first + length]
        finally:
            window.close()

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()

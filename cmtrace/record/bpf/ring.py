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
    """

    BUSY = 1 << 31
    DISCARD = 1 << 30
    _HEAD = struct.Struct(f"<I{RING_HEADER_SIZE - 4 + TYPE_OFFSET}xH")  # length, payload `type`

    def __init__(self, map_fd: int, size: int):
        page = mmap.PAGESIZE
        self.size = size
        self.mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(
            map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._page = page

    def read(self) -> tuple[bytes, list[int], list[bytes]]:
        """(copy of the new bytes, payload offsets of fd records in it, Python records)."""
        consumer = int.from_bytes(self._consumer[0:8], "little")
        producer = int.from_bytes(self._producer[0:8], "little")
        if producer == consumer:
            return b"", [], []
        start = self._page + (consumer & self.mask)
        buf = self._producer[start : start + (producer - consumer)]
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

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()

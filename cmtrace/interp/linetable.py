"""Line numbers from a code object's line table and a frame's instruction offset.

Three formats, chosen by `cmtrace.interp.layouts.Layout.lines`:
- "lnotab" (3.8-3.9 `co_lnotab`): pairs (bytecode increment, signed line increment).
- "linetable310" (3.10 `co_linetable`): pairs (bytecode increment, signed line delta), a line
  delta of -128 marking bytecode with no line.
- "locations" (3.11+ `co_linetable`): the location table, one entry per run of code units,
  with varint-coded line deltas.
All offsets here are byte offsets into the bytecode (code units * 2).
"""

from __future__ import annotations

from collections.abc import Iterator

from cmtrace.interp.layouts import LINES_310, LINES_LNOTAB, LINES_LOCATIONS

NO_LINE = -1
CODE_UNIT = 2


def line_for_offset(fmt: str, table: bytes, firstlineno: int, offset: int) -> int:
    """The source line of the instruction at byte `offset`, or NO_LINE."""
    if offset < 0:
        return firstlineno if fmt != LINES_LOCATIONS else NO_LINE
    decoder = {
        LINES_LNOTAB: _lnotab_line,
        LINES_310: _linetable310_line,
        LINES_LOCATIONS: _locations_line,
    }
    try:
        return decoder[fmt](table, firstlineno, offset)
    except IndexError:  # a table read cut short (a varint runs past its end): no line known
        return NO_LINE


def _signed_byte(value: int) -> int:
    return value - 256 if value >= 128 else value


def _lnotab_line(table: bytes, firstlineno: int, offset: int) -> int:
    line, addr = firstlineno, 0
    for i in range(0, len(table) - 1, 2):
        addr += table[i]
        if addr > offset:
            break
        line += _signed_byte(table[i + 1])
    return line


def _linetable310_line(table: bytes, firstlineno: int, offset: int) -> int:
    line, start = firstlineno, 0
    for i in range(0, len(table) - 1, 2):
        end = start + table[i]
        delta = _signed_byte(table[i + 1])
        if delta != -128:
            line += delta
        if start <= offset < end:
            return NO_LINE if delta == -128 else line
        start = end
    return NO_LINE


def _varint(table: bytes, pos: int) -> tuple[int, int]:
    """Unsigned varint of 6-bit groups, bit 6 = more follows."""
    byte = table[pos]
    value, shift = byte & 63, 0
    while byte & 64:
        pos += 1
        byte = table[pos]
        shift += 6
        value |= (byte & 63) << shift
    return value, pos + 1


def _svarint(table: bytes, pos: int) -> tuple[int, int]:
    value, pos = _varint(table, pos)
    return (-(value >> 1) if value & 1 else value >> 1), pos


def _location_entries(table: bytes) -> Iterator[tuple[int, int, bool]]:
    """(length in code units, line delta, has_line) for every entry of a 3.11+ table."""
    pos = 0
    while pos < len(table):
        first = table[pos]
        code, length = (first >> 3) & 15, (first & 7) + 1
        delta, has_line = 0, code != 15
        if code in (13, 14):
            delta, _ = _svarint(table, pos + 1)
        elif code in (10, 11, 12):
            delta = code - 10
        pos += 1
        while pos < len(table) and not table[pos] & 128:
            pos += 1
        yield length, delta, has_line


def _locations_line(table: bytes, firstlineno: int, offset: int) -> int:
    line, start = firstlineno, 0
    for length, delta, has_line in _location_entries(table):
        line += delta
        end = start + length * CODE_UNIT
        if start <= offset < end:
            return line if has_line else NO_LINE
        start = end
    return NO_LINE

"""Layout tables and the _Py_DebugOffsets reader, on the real blobs of live 3.13+ processes."""

from __future__ import annotations

import struct
import subprocess
import time

import pytest
import targets

from cmtrace.interp import discover, layouts

FOUND, _ = targets.discover()
DEBUG_TARGETS = [t for t in FOUND if int(t.name.rsplit(".", 1)[1]) >= 13]


@pytest.fixture(params=DEBUG_TARGETS, ids=[t.name for t in DEBUG_TARGETS])
def debug_blob(request):
    """The first bytes of _PyRuntime of a running 3.13+ discover."""
    proc = subprocess.Popen(
        [request.param.command, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        for _ in range(500):  # the wrappers exec through sh and chroot first
            try:
                found = discover.find_interpreter(proc.pid)
                break
            except discover.NotPython:
                time.sleep(0.01)
        yield discover.read_memory(proc.pid, found.runtime, layouts.DEBUG_OFFSETS_READ_SIZE)
    finally:
        proc.stdin.close()
        proc.wait()


def test_live_debug_offsets_agree_with_what_the_headers_said(debug_blob):
    layout = layouts.parse_debug_offsets(debug_blob)
    assert layout.source == layouts.SOURCE_DEBUG_OFFSETS
    assert layout.frame_code == 0 and layout.frame_previous == 8  # stable since 3.12
    assert layout.unicode_ascii_size == 40 and layout.bytes_data == 32


def test_unknown_minor_is_refused(debug_blob):
    blob = bytearray(debug_blob)
    struct.pack_into("<Q", blob, 8, 0x031F00F0)  # 3.31
    with pytest.raises(layouts.LayoutError, match="unsupported"):
        layouts.parse_debug_offsets(bytes(blob))


def test_free_threaded_build_is_refused(debug_blob):
    blob = bytearray(debug_blob)
    struct.pack_into("<Q", blob, 16, 1)
    with pytest.raises(layouts.LayoutError, match="free-threaded"):
        layouts.parse_debug_offsets(bytes(blob))


def test_garbage_offsets_are_refused(debug_blob):
    blob = bytearray(debug_blob)
    position = layouts.DEBUG_OFFSET_POSITIONS[layouts.parse_debug_offsets(debug_blob).minor][5]
    struct.pack_into("<Q", blob, position, 1 << 40)  # tstate current_frame
    with pytest.raises(layouts.LayoutError, match="implausible"):
        layouts.parse_debug_offsets(bytes(blob))


def test_no_cookie_no_layout():
    with pytest.raises(layouts.LayoutError, match="cookie"):
        layouts.parse_debug_offsets(b"\0" * layouts.DEBUG_OFFSETS_READ_SIZE)


@pytest.mark.parametrize("minor", sorted(layouts.TABLE))
def test_table_layouts_fit_what_the_kernel_walker_reads(minor):
    from cmtrace.record.bpf.targets import check_reach

    check_reach(layouts.table_layout(minor))

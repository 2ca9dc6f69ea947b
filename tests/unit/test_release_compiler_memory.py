"""cmtrace.record.bpf.memory: which mappings are the compiler's."""

from __future__ import annotations

from pathlib import Path

from cmtrace.record.bpf import memory

MAPS = """\
7f0000000000-7f0000001000 r--p 00000000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0000001000-7f0000005000 r-xp 00001000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0000010000-7f0000012000 r-xp 00000000 08:01 12 /lib/x86_64-linux-gnu/libclang-cpp.so.14
7f0000020000-7f0000021000 r-xp 00000000 08:01 13 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f0000030000-7f0000031000 rw-p 00000000 00:00 0
7f0000040000-7f0000041000 r-xp 00000000 08:01 14 /opt/venv/lib/python3.11/site-packages/pyarrow/libarrow.so.1500
"""


def test_only_the_compiler_libraries_are_chosen(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    assert memory.compiler_mappings(maps) == [
        (0x7F0000000000, 0x7F0000001000),
        (0x7F0000001000, 0x7F0000005000),
        (0x7F0000010000, 0x7F0000012000),
    ]

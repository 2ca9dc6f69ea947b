"""One source of truth across C and Python: probes/events.h against every Python mirror of it.

A small C program is compiled against probes/events.h with gcc; it prints the layouts and
constants (sizeof, offsetof, enum values) as JSON, and each test compares one Python mirror with
what the compiler says. No root, no BPF: this needs only gcc (skipped, saying so, without it).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cmtrace.interp import elfnotes
from cmtrace.interp.discover import Interpreter
from cmtrace.interp.layouts import TABLE
from cmtrace.record import records, syscalls
from cmtrace.record.bpf import aggregate, ring, targets
from cmtrace.record.ptrace import wire
from cmtrace.trace import schema

ROOT = Path(__file__).resolve().parents[2]
PROBES = ROOT / "probes"
ENGINE = ROOT / "cmtrace" / "record" / "ptrace" / "engine.c"

FD_EVENT_FIELDS = (
    "ts", "pid", "tid", "type", "nr", "fd", "fd2", "err", "flags", "arg", "stack_id",
    "stack_flags", "datalen",
)  # fmt: skip
STACK_REC_FIELDS = ("ts", "pid", "tid", "type", "nframes", "flags", "stack_id", "generation", "pad")
CODE_REC_FIELDS = (
    "ts", "pid", "tid", "type", "name_len", "qualname_len", "file_len", "code", "generation",
    "checksum", "firstlineno", "flags", "argcount", "name_state", "qualname_state", "file_state",
    "linetable_len", "linetable_total",
)  # fmt: skip
CODE_REC_TAILS = ("name", "qualname", "file", "linetable")
GENS_REC_FIELDS = ("ts", "pid", "tid", "type", "ngens", "pad", "stack_id")
EVENT_KINDS = (
    "EV_BIRTH", "EV_CLOSE", "EV_CLOSE_RANGE", "EV_FAIL", "EV_CLOEXEC", "EV_ADDR", "EV_FORK",
    "EV_EXEC", "EV_EXIT", "EV_CALL",
)  # fmt: skip
STACK_FLAGS = ("TRUNCATED", "NO_PYTHON", "ERROR", "FINALIZING")
READ_SIZES = {"ts": "PY_TSTATE_READ", "frame": "PY_FRAME_READ", "code": "PY_CODE_READ",
              "str": "PY_STR_HEAD"}  # fmt: skip
CALL_ARG_KINDS = {"ARG_REG": "CALL_ARG_REG", "ARG_MEM": "CALL_ARG_MEM",
                  "ARG_CONST": "CALL_ARG_CONST"}  # fmt: skip
CONTROL_KINDS = ("CTL_CONFIG", "CTL_FORGET", "CTL_RESUME", "CTL_STOP", "CTL_HOLD_NEXT")
# --aggregate (cmtrace/record/bpf/aggregate.py mirrors these names as they are)
AGGREGATE_CONSTANTS = (
    "AGG_FROM_LIVE", "AGG_HIST_BUCKETS", "AGG_HIST_MIN_SHIFT", "AGG_PAIR_NEW", "AGG_PAIR_COUNT",
    "AGG_PAIR_SHIP", "AGG_FULL_LIVE", "AGG_FULL_PAIRS",
)  # fmt: skip
CONSTANTS = (
    "PY_REC_STACK", "PY_REC_CODE", "PY_REC_GENS", "PY_MAX_GENS", "PY_GEN_INDEX_SHIFT", "PY_REC_MIN", "PY_NO_OFFSET", "PY_MAX_FRAMES", "DATA_LEN",
    "F_DUPFD_", "F_DUPFD_CLOEXEC_", *READ_SIZES.values(), *CALL_ARG_KINDS.values(),
    *EVENT_KINDS, *(f"PY_STACK_{flag}" for flag in STACK_FLAGS), *CONTROL_KINDS,
    "ENGINE_FRAME_HEADER", *AGGREGATE_CONSTANTS,
)  # fmt: skip
# Syscall numbers the records carry that are not in the syscall table (EV_EXIT's nr).
RECORD_ONLY_SYSCALLS = {"exit"}


def _syscall_names_in_header() -> list[str]:
    """The NR_<name> enumerators of probes/events.h, in order (the enum is the table)."""
    text = (PROBES / "events.h").read_text()
    start = text.index("enum sysnr {")
    return re.findall(r"\bNR_(\w+)\s*=", text[start : text.index("};", start)])


def _c_program() -> str:
    """C source printing every layout and constant as one JSON object."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "events.h"', "int main(void) {",
             '    printf("{");']  # fmt: skip

    def put(key: str, expr: str) -> None:
        lines.append(f'    printf("\\"{key}\\": %lld, ", (long long)({expr}));')

    for struct_name, fields in (("fd_event", FD_EVENT_FIELDS), ("py_stack_rec", STACK_REC_FIELDS),
                                ("py_code_rec", CODE_REC_FIELDS + CODE_REC_TAILS),
                                ("py_gens_rec", GENS_REC_FIELDS + ("gens", "codes"))):  # fmt: skip
        put(f"sizeof {struct_name}", f"sizeof(struct {struct_name})")
        for name in fields:
            put(f"{struct_name}.{name}", f"offsetof(struct {struct_name}, {name})")
    put("py_stack_rec.frames", "offsetof(struct py_stack_rec, frames)")
    put("sizeof py_frame", "sizeof(struct py_frame)")
    put("sizeof fd_event_data", "sizeof(struct fd_event_data)")
    put("sizeof py_config", "sizeof(struct py_config)")
    for name, _ in wire.PyConfig._fields_:
        put(f"py_config.{name}", f"offsetof(struct py_config, {name})")
    put("sizeof ctl_msg", "sizeof(struct ctl_msg)")
    for name, _ in wire.CtlMsg._fields_:
        put(f"ctl_msg.{name}", f"offsetof(struct ctl_msg, {name})")
    for name in CONSTANTS:
        put(name, name)
    for name in _syscall_names_in_header():
        put(f"NR_{name}", f"NR_{name}")
    lines += ['    printf("\\"end\\": 0}\\n");', "    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header(tmp_path_factory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the C side of the mirrors cannot be compiled")
    work = tmp_path_factory.mktemp("mirrors")
    (work / "mirrors.c").write_text(_c_program())
    build = subprocess.run(
        [gcc, "-std=c11", "-Wall", "-Werror", f"-I{PROBES}", "-o", str(work / "mirrors"),
         str(work / "mirrors.c")],
        capture_output=True, text=True,
    )  # fmt: skip
    if build.returncode:
        pytest.fail(f"probes/events.h does not compile in user space:\n{build.stderr}")
    out = subprocess.run([str(work / "mirrors")], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _struct_offsets(fmt: struct.Struct, names: tuple[str, ...]) -> dict[str, int]:
    """Offsets of the fields of a little-endian struct format without padding codes (x)."""
    codes = fmt.format.lstrip("<")
    assert "x" not in codes and len(codes) == len(names), (fmt.format, names)
    return {name: struct.calcsize("<" + codes[:i]) for i, name in enumerate(names)}


def test_fd_record_header(header):
    dtype = records.RECORD_HEADER
    assert dtype.names == FD_EVENT_FIELDS
    assert {name: dtype.fields[name][1] for name in dtype.names} == {
        name: header[f"fd_event.{name}"] for name in FD_EVENT_FIELDS
    }
    assert records.HEADER_SIZE == dtype.itemsize == header["sizeof fd_event"]


def test_every_record_type_sits_where_the_ring_reader_looks(header):
    # RingReader reads the type 8 bytes (the ring's own record header) before the payload's
    # `type`; Symbolizer.on_record reads it at the payload's offset 16.
    ring_type_at = ring.RingReader._HEAD.size - 2 - 8
    for struct_name in ("fd_event", "py_stack_rec", "py_code_rec", "py_gens_rec"):
        assert header[f"{struct_name}.type"] == ring_type_at == 16


def test_record_kinds(header):
    for name in EVENT_KINDS:
        assert getattr(records, name) == header[name], name
    assert records.PYTHON_RECORD_MIN_TYPE == header["PY_REC_MIN"]
    assert records.REC_STACK == header["PY_REC_STACK"]
    assert records.REC_CODE == header["PY_REC_CODE"]
    assert records.REC_GENS == header["PY_REC_GENS"] == records.PYTHON_RECORD_MAX_TYPE
    assert max(header[name] for name in EVENT_KINDS) < header["PY_REC_MIN"]


def test_stack_flags(header):
    for flag in STACK_FLAGS:
        assert getattr(schema, f"STACK_{flag}") == header[f"PY_STACK_{flag}"], flag


def test_stack_record(header):
    assert _struct_offsets(records.STACK_HEAD, STACK_REC_FIELDS) == {
        name: header[f"py_stack_rec.{name}"] for name in STACK_REC_FIELDS
    }
    assert records.STACK_HEAD.size == header["py_stack_rec.frames"]
    assert records.FRAME.size == header["sizeof py_frame"]


def test_code_record(header):
    assert _struct_offsets(records.CODE_HEAD, CODE_REC_FIELDS) == {
        name: header[f"py_code_rec.{name}"] for name in CODE_REC_FIELDS
    }
    tails = (records.NAME_AT, records.QUALNAME_AT, records.FILE_AT,
             records.LINETABLE_AT)  # fmt: skip
    assert tails == tuple(header[f"py_code_rec.{name}"] for name in CODE_REC_TAILS)


def test_generators_record(header):
    assert _struct_offsets(records.GENS_HEAD, GENS_REC_FIELDS) == {
        name: header[f"py_gens_rec.{name}"] for name in GENS_REC_FIELDS
    }
    assert (records.GENS_AT, records.GEN_CODES_AT) == (
        header["py_gens_rec.gens"], header["py_gens_rec.codes"])  # fmt: skip
    assert records.MAX_GENS == header["PY_MAX_GENS"]
    assert records.GEN_INDEX_SHIFT == header["PY_GEN_INDEX_SHIFT"] == schema.GENERATOR_INDEX_SHIFT
    assert records.GEN_CODES_AT + 8 * records.MAX_GENS == header["sizeof py_gens_rec"]


def test_read_limits_are_the_read_sizes_less_one_field(header):
    """The "always 8 less" of records.READ_LIMITS (312/104/152/32 against pystack's
    320/112/160/40): a layout offset is where an 8-byte field starts, and the walker reads the
    field from its buffer of PY_*_READ bytes, so the last usable offset is the size minus 8."""
    field = 8
    derived = {group: header[macro] - field for group, macro in READ_SIZES.items()}
    assert records.READ_LIMITS == derived


def test_no_offset_marker(header):
    assert records.CONFIG_NO_OFFSET == header["PY_NO_OFFSET"]


def test_syscall_numbers(header):
    names = _syscall_names_in_header()
    assert len(names) == len(set(names))
    for name in names:
        if name in RECORD_ONLY_SYSCALLS:
            continue
        assert name in syscalls.BY_NAME, f"NR_{name} is in events.h, not in syscalls.py"
        assert syscalls.BY_NAME[name].nr == header[f"NR_{name}"], name
    missing = set(syscalls.BY_NAME) - set(names)
    assert not missing, f"in syscalls.py, not in events.h: {sorted(missing)}"


def test_fcntl_commands(header):
    assert syscalls.F_DUPFD == header["F_DUPFD_"]
    assert syscalls.F_DUPFD_CLOEXEC == header["F_DUPFD_CLOEXEC_"]


def test_usdt_argument_kinds(header):
    for python_name, c_name in CALL_ARG_KINDS.items():
        assert getattr(elfnotes, python_name) == header[c_name], python_name


def test_walker_config_layout(header):
    """wire.PyConfig (the engine's copy of the BPF map's leaf) field by field; a field missing
    from it would not compile above."""
    assert ctypes.sizeof(wire.PyConfig) == header["sizeof py_config"]
    for name, _ in wire.PyConfig._fields_:
        assert getattr(wire.PyConfig, name).offset == header[f"py_config.{name}"], name


def test_walker_config_is_filled_whole():
    """targets.fill_config sets exactly the fields of struct py_config (a ctypes structure
    takes an unknown attribute silently, so a renamed field would be lost)."""

    class Leaf:
        __slots__ = tuple(name for name, _ in wire.PyConfig._fields_ if name != "pad")

    interp = Interpreter(pid=os.getpid(), path="python", version="3.11", runtime=1 << 20,
                         code_type=2, none=3, layout=TABLE[11])  # fmt: skip
    leaf = Leaf()
    targets.fill_config(leaf, interp, generation=1)
    assert all(hasattr(leaf, name) for name in Leaf.__slots__)


def test_control_messages(header):
    assert ctypes.sizeof(wire.CtlMsg) == header["sizeof ctl_msg"]
    for name, _ in wire.CtlMsg._fields_:
        assert getattr(wire.CtlMsg, name).offset == header[f"ctl_msg.{name}"], name
    for name in CONTROL_KINDS:
        assert getattr(wire, name) == header[name], name
    assert wire.FRAME_HEADER == header["ENGINE_FRAME_HEADER"]
    assert wire.PYTHON_RECORD_MIN_TYPE == header["PY_REC_MIN"]


def test_engine_traces_every_syscall_of_the_table():
    """The engine's table (and so its seccomp filter) has every birth and every syscall the
    probes handle at entry, plus execve for EV_EXEC's path; clone and friends are ptrace events."""
    in_engine = set(re.findall(r"\{NR_(\w+), H_\w+", ENGINE.read_text()))
    wanted = {s.name for s in syscalls.BIRTHS} | set(syscalls.ENTER_ONLY) | {"execve"}
    assert in_engine == wanted


def test_aggregate_constants(header):
    for name in AGGREGATE_CONSTANTS:
        assert getattr(aggregate, name) == header[name], name
    assert aggregate.BIRTH_SIZE == header["DATA_LEN"] + records.HEADER_SIZE
    assert aggregate.AGG_FROM_LIVE & max(getattr(schema, f"STACK_{f}") for f in STACK_FLAGS) == 0
    assert (schema.LIFETIME_HIST_BUCKETS, schema.LIFETIME_HIST_MIN_SHIFT) == (
        header["AGG_HIST_BUCKETS"], header["AGG_HIST_MIN_SHIFT"])  # fmt: skip

"""Line-table decoding checked against each interpreter's own idea of its line numbers.

Every interpreter found compiles a sample and dumps its raw table plus the line CPython gives
each instruction offset (dis); linetable.line_for_offset must agree at every offset.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import targets

from cmtrace.interp import layouts, linetable

FOUND, MISSING = targets.discover()

DUMPER = r'''
import dis, json, sys
src = """
def f(a, b):
    x = [i * 2
         for i in range(a)]

    if a > b:
        return {k: v for k, v in zip(x, x)}
    try:
        y = (a +
             b)
    except Exception:
        y = None
    return y
""" + "\n" * 300 + "def far():\n    return 1\n"
mod = compile(src, "<sample>", "exec")
out = []
for co in [mod] + [c for c in mod.co_consts if hasattr(c, "co_code")]:
    table = co.co_lnotab if sys.version_info < (3, 10) else co.co_linetable
    starts = dict(dis.findlinestarts(co))
    lines, line = {}, None
    for ins in dis.get_instructions(co, show_caches=False) if sys.version_info >= (3, 11) else dis.get_instructions(co):
        line = starts.get(ins.offset, line)
        if sys.version_info >= (3, 11):
            pos = ins.positions.lineno if ins.positions else None
            line = pos if pos is not None else -1
        lines[ins.offset] = line
    out.append({"table": table.hex(), "first": co.co_firstlineno, "lines": lines})
print(json.dumps({"minor": sys.version_info[1], "codes": out}))
'''


@pytest.mark.parametrize("target", FOUND, ids=[t.name for t in FOUND])
def test_lines_match_the_interpreter(target):
    done = subprocess.run(
        [target.command, "-c", DUMPER], capture_output=True, text=True, check=True
    )
    dump = json.loads(done.stdout)
    minor = dump["minor"]
    fmt = (
        layouts.LINES_LNOTAB
        if minor <= 9
        else layouts.LINES_310
        if minor == 10
        else layouts.LINES_LOCATIONS
    )
    checked = 0
    for code in dump["codes"]:
        table = bytes.fromhex(code["table"])
        for offset, expected in code["lines"].items():
            if expected is None or (minor < 11 and expected == -1):
                continue
            got = linetable.line_for_offset(fmt, table, code["first"], int(offset))
            assert got == expected, (offset, code["first"])
            checked += 1
    assert checked > 20

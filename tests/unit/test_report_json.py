"""The JSON report's text (issue 12): written by json's C encoder piece by piece, readable (the
top-level keys one a line, each leak and site on a line of its own) and the same document as
json.dumps writes."""

from __future__ import annotations

import json
import math

import numpy as np

from cmtrace.present.json import readable_json

DOCUMENT = {
    "schema": 1,
    "trace": {"status": "complete", "targets": [{"pid": 7, "cmdline": ["python3", "a b"]}]},
    "leaks": [
        {"pid": np.int64(7), "fd": 3, "path": '/tmp/é\n"x"', "stack": [{"line": 1}]},
        {"pid": 7, "fd": 4, "path": None, "stack": []},
    ],
    "warnings": [],
    "empty": {},
    "ratio": math.inf,
    "lost_events": np.int32(0),
}


def test_the_text_is_the_same_document() -> None:
    expected = json.loads(json.dumps(DOCUMENT, default=lambda v: v.item()))
    assert json.loads(readable_json(DOCUMENT)) == expected


def test_top_level_keys_and_each_leak_are_one_line() -> None:
    lines = readable_json(DOCUMENT).splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert ' "schema": 1,' in lines
    assert '  {"pid": 7, "fd": 4, "path": null, "stack": []}' in lines
    assert ' "warnings": [],' in lines and ' "empty": {},' in lines
    assert '  "status": "complete",' in lines  # a dict one level down: a key a line
    leak = next(line for line in lines if '"fd": 3' in line)
    assert json.loads(leak.rstrip(","))["path"] == '/tmp/é\n"x"'

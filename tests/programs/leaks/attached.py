"""Run a leak program once `cmtrace -p` is attached: say ready, wait for "go", then run it.

    python attached.py PROGRAM [ARGS...]
speaks the tests' JSON line protocol: {"event": "ready", "pid": N} on stdout, "go" on stdin.
"""

import json
import os
import runpy
import sys

print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit("attached.py: expected 'go' on stdin")
sys.argv = sys.argv[1:]
# Keep the program's globals alive until interpreter shutdown, as if it were run directly.
PROGRAM_GLOBALS = runpy.run_path(sys.argv[0], run_name="__main__")

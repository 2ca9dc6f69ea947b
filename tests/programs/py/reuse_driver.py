"""Imports reuse_a, reuse_b, reuse_c in turn. Each module body's code object is freed once it
has run, so the next one may get the same address and run its open at the same offsets, with
the same importlib frames around it: only each frame's f_globals (the module's dict) and the
code record sent for the new object tell them apart.
"""

import gc
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.readline()
for name in ("reuse_a", "reuse_b", "reuse_c"):
    importlib.import_module(name)
    gc.collect()

"""A service leaking one fd every 100 ms at one line, next to healthy churn at another.

    python live_leaker.py [SECONDS]
prints its pid, then runs SECONDS (default: until killed). The live view tests look for the
leaking line (marked LEAK) growing on screen and the churning one (CHURN) staying at 0 live.
"""

import os
import sys
import time

kept = []


def leak():
    kept.append(open(os.devnull))  # LEAK: kept forever


def churn():
    with open(__file__, "rb") as f:  # CHURN: closed at once
        f.read(1)


print(os.getpid(), flush=True)
deadline = time.monotonic() + (float(sys.argv[1]) if len(sys.argv) > 1 else 1e9)
while time.monotonic() < deadline:
    leak()
    for _ in range(5):
        churn()
    time.sleep(0.1)

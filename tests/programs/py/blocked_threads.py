"""Target for the stack walker tests: known frames blocked in syscalls (GIL released).

The main thread blocks in read() inside outer() -> middle() -> inner(); a second thread blocks
in a generator resumed by worker(). Lines to expect carry `# MARK:<name>` comments.
Prints "ready" once both threads are blocked, then waits for stdin to close.
"""

import os
import sys
import threading
import time

started = threading.Event()


def ticker():
    yield started.set()  # MARK:gen-start
    os.read(wake_r, 1)  # MARK:gen-block
    yield


def worker():
    for _ in ticker():  # MARK:worker
        pass


def inner():
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    return sys.stdin.read()  # MARK:inner


def middle():
    return inner()  # MARK:middle


def outer():
    return middle()  # MARK:outer


wake_r, wake_w = os.pipe()
thread = threading.Thread(target=worker, name="worker")
thread.start()
started.wait()
time.sleep(0.05)
outer()  # MARK:module
os.write(wake_w, b"x")
thread.join()

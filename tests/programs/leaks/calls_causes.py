"""Three managers whose __exit__ never closes what they opened, and one that does (clean).

With `--calls` on an interpreter whose USDT probes fire, each leak gets the cause in its
`# CAUSE:` comment; without that evidence all three are `with-exited-without-close`.

    python calls_causes.py [N] [wait]
leaks N fds per site (default 2); `wait` prints {"event": "leaked"} and waits for a line on
stdin before leaving (so a tracer can stop while it lives), else it leaves with os._exit(0).
"""

import json
import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2
WAIT = "wait" in sys.argv[2:]
kept = []


class Transaction:
    """__exit__ raises (from a helper) before it reaches its close."""

    def __enter__(self):
        self.fd = os.open(__file__, os.O_RDONLY)  # CAUSE:exit-raised
        return self

    def __exit__(self, *exc):
        self.flush()
        os.close(self.fd)

    def flush(self):
        raise OSError("flush failed")


class Connection:
    """__enter__ opens, then its handshake raises: the with statement calls no __exit__."""

    def __enter__(self):
        self.fd = os.open(__file__, os.O_RDONLY)  # CAUSE:enter-raised
        self.handshake()
        return self

    def handshake(self):
        raise ConnectionError("handshake refused")

    def __exit__(self, *exc):
        os.close(self.fd)


class Lease:
    """__exit__ runs and returns normally, but forgets the fd."""

    def __enter__(self):
        self.fd = os.open(__file__, os.O_RDONLY)  # CAUSE:with-exited-without-close
        return self

    def __exit__(self, *exc):
        self.released = True


class Clean:
    def __enter__(self):
        self.fd = os.open(__file__, os.O_RDONLY)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def main():
    for _ in range(N):
        try:
            with Transaction() as tx:
                kept.append(tx)
        except OSError:
            pass
        conn = Connection()
        kept.append(conn)
        try:
            with conn:
                pass
        except ConnectionError:
            pass
        with Lease() as lease:
            kept.append(lease)
        with Clean():
            pass
    if WAIT:
        print(json.dumps({"event": "leaked", "pid": os.getpid()}), flush=True)
        sys.stdin.readline()
    os._exit(0)


main()

"""Async managers under `cmtrace --calls`: __aexit__ raises after an await (exit-raised), and
__aexit__ returns without closing (with-exited-without-close), in a coroutine that completes.

    python calls_async.py [N]
Each coroutine method fires a USDT entry at every resume and a return at every suspension;
the analysis must still see one call per `async with`.
"""

import asyncio
import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2
kept = []


class Stream:
    async def __aenter__(self):
        await asyncio.sleep(0)
        self.fd = os.open(__file__, os.O_RDONLY)  # CAUSE:exit-raised
        kept.append(self)
        return self

    async def __aexit__(self, *exc):
        await asyncio.sleep(0)
        raise OSError("flush failed")


class Session:
    async def __aenter__(self):
        self.fd = os.open(__file__, os.O_RDONLY)  # CAUSE:with-exited-without-close
        kept.append(self)
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc):
        await asyncio.sleep(0)


async def main():
    for _ in range(N):
        try:
            async with Stream():
                await asyncio.sleep(0)
        except OSError:
            pass
        async with Session():
            pass


asyncio.run(main())
os._exit(0)

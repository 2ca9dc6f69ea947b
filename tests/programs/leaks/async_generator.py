"""Leak: async generators suspended inside their with block (the FastAPI async-dependency
shape); only the event loop's shutdown closes them, when asyncio.run() ends."""

import asyncio
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 3


async def stream(path):
    with open(path) as f:  # LEAK-SITE
        for line in f:
            yield line


async def main():
    pending = []
    for _ in range(N):
        rows = stream(__file__)
        await rows.__anext__()
        pending.append(rows)  # never aclose()d


asyncio.run(main())

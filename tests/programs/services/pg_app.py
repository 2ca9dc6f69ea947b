"""A FastAPI service on uvicorn with asyncpg against PostgreSQL: issue 13's incident.

`transaction()` is an @asynccontextmanager that checks a connection out of the pool and starts a
transaction; its commit and release follow the `yield` with no try/finally. A route that raises
HTTPException(404) inside `async with transaction()` throws into the generator, which ends at the
yield: the connection is never released and stays "idle in transaction" on the server
(pg_stat_activity says so), and its socket stays open in this process.

Environment: PG_DSN (the server), APP_NAME (application_name of every connection, so the test
counts this service's connections in pg_stat_activity). The pool starts empty (min_size=0) so
every connection of a request is opened by that request, while a tracer watches.
"""

import os
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, HTTPException

pool: asyncpg.Pool | None = None


@asynccontextmanager
async def lifespan(app: FastAPI):
    global pool
    settings = {"application_name": os.environ["APP_NAME"]}
    pool = await asyncpg.create_pool(
        os.environ["PG_DSN"], min_size=0, max_size=100, server_settings=settings
    )
    yield
    pool.terminate()  # leaked checkouts would make pool.close() wait forever


app = FastAPI(lifespan=lifespan)


@asynccontextmanager
async def transaction():
    conn = await pool.acquire()  # LEAK-SITE
    tx = conn.transaction()
    await tx.start()
    yield conn
    await tx.commit()  # skipped when the block raises: no try/finally
    await pool.release(conn)


@app.get("/health")
async def health() -> dict:
    return {"pid": os.getpid()}


@app.get("/items/{item_id}")
async def read_item(item_id: int) -> dict:
    async with transaction() as conn:  # WITH-LINE
        row = await conn.fetchrow("SELECT id, name FROM items WHERE id = $1", item_id)
        if row is None:
            raise HTTPException(status_code=404, detail="no such item")
        return {"id": row["id"], "name": row["name"]}

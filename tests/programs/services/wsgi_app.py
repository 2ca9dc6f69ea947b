"""A pre-fork WSGI app for gunicorn whose routes leak through three standard-library APIs.

- /log    adds a logging.FileHandler per request to a long-lived logger (never removed or closed)
- /spawn  starts a child with subprocess.Popen(stdout=PIPE), reads its first line and keeps the
          Popen for "later" (never waited, its pipe never closed)
- /db     `with sqlite3.connect(...) as db:` commits but does not close; the connection is kept
- /health the worker's pid and its master's

Every leaking route answers with the worker's pid, so a test knows which worker holds what;
the log file and database live in APP_DIR. Each leak stays referenced, so no finalizer closes
it while the worker lives (interpreter shutdown or atexit's logging.shutdown do, at exit).
"""

import json
import logging
import os
import sqlite3
import subprocess

APP_DIR = os.environ["APP_DIR"]
LOG_PATH = os.path.join(APP_DIR, "requests.log")
DB_PATH = os.path.join(APP_DIR, "hits.sqlite")

requests_log = logging.getLogger("requests")
requests_log.setLevel(logging.INFO)
requests_log.propagate = False
children: list[subprocess.Popen] = []  # reaped "later": never
connections: list[sqlite3.Connection] = []  # kept for a stats page that never closes them


def log_request(path: str) -> dict:
    handler = logging.FileHandler(LOG_PATH)  # LEAK-SITE log
    requests_log.addHandler(handler)
    requests_log.info("request %s", path)
    return {"fd": handler.stream.fileno()}


def spawn_child(path: str) -> dict:
    child = subprocess.Popen(["uname", "-r"], stdout=subprocess.PIPE)  # LEAK-SITE spawn
    first_line = child.stdout.readline().decode().strip()
    children.append(child)
    return {"fd": child.stdout.fileno(), "child": child.pid, "line": first_line}


def record_hit(path: str) -> dict:
    with sqlite3.connect(DB_PATH) as db:  # LEAK-SITE db
        db.execute("CREATE TABLE IF NOT EXISTS hits (path TEXT)")
        db.execute("INSERT INTO hits VALUES (?)", (path,))
    connections.append(db)
    return {}


def health(path: str) -> dict:
    return {"master": os.getppid()}


ROUTES = {"/log": log_request, "/spawn": spawn_child, "/db": record_hit, "/health": health}


def app(environ, start_response):
    route = ROUTES.get(environ["PATH_INFO"])
    if route is None:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    body = json.dumps({"pid": os.getpid(), **route(environ["PATH_INFO"])}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]

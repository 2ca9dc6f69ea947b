"""What `pytest --cmtrace` must say about this suite: each `# LEAK:<label>` line of a suite file
opens one fd described here, each `# WARN:<label>` line one fd a finalizer closes during its
test. tests/integration/test_pytest_plugin.py joins these with the marked lines."""

# label -> the leak's owner and the JSON fields the plugin must give it. "test" is a test's
# name within its file (the nodeid without the file), "fixture_scope" marks a wider-scoped
# fixture's leak (listed under "fixtures", not under a test).
LEAKS = {
    "body": {"test": "test_body_leaks", "phase": "call", "kind": "file", "api": "open",
             "cause": "no-context-manager", "fixture": None, "allowed": False},
    "function_fixture": {"test": "test_function_fixture_leaks", "phase": "setup",
                         "kind": "file", "api": "open", "cause": "no-context-manager",
                         "fixture": "leaky_fixture", "allowed": False},
    "generator": {"test": "test_generator_left_suspended", "phase": "call", "kind": "file",
                  "api": "open", "cause": "suspended-generator", "fixture": None,
                  "allowed": False},
    "popen": {"test": "test_popen_never_waited", "phase": "call", "kind": "pipe",
              "api": "subprocess.Popen", "cause": "no-context-manager", "fixture": None,
              "allowed": False},
    "parametrised": {"test": "test_parametrised[leaks]", "phase": "call", "kind": "file",
                     "api": "open", "cause": "no-context-manager", "fixture": None,
                     "allowed": False},
    "allowed": {"test": "test_allowed_one", "phase": "call", "kind": "file", "api": "open",
                "cause": "no-context-manager", "fixture": None, "allowed": True},
    "not_checked": {"test": "test_not_checked", "phase": "call", "kind": "file", "api": "open",
                    "cause": "no-context-manager", "fixture": None, "allowed": True},
    "module_log": {"fixture_scope": "module", "fixture_name": "module_log", "phase": "setup",
                   "kind": "file", "api": "open", "cause": "no-context-manager",
                   "fixture": None, "allowed": False},
}  # fmt: skip

WARNINGS = {"finalizer": {"test": "test_finalizer_closes", "count": 1}}

# Tests that fail under --cmtrace-fail: those with a leak no marker allows.
FAIL_UNDER_GATE = sorted({v["test"] for v in LEAKS.values() if "test" in v and not v["allowed"]})

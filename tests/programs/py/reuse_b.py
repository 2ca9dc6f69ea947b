"""Module body for the code-address-reuse test (see reuse_driver.py)."""

import os

try:
    os.close(os.open("/nonexistent/cmtrace-mark-reuse-b", os.O_RDONLY))  # MARK:reuse-b
except OSError:
    pass

import sys

from cmtrace.cli import main

sys.exit(main())

"""Fd-table ground truth for the lifetimes model: dup2 onto a live fd, pipes, fork, child exit.

Prints one JSON line with the fd numbers it used, then exits normally.
"""

import json
import os

r, w = os.pipe()
f = os.open(__file__, os.O_RDONLY)
os.dup2(r, f)  # ends the file lifetime of f with death dup2; f is now the pipe's read end
kept = os.open(__file__, os.O_RDONLY)  # never closed: leaks at process exit
child = os.fork()
if child == 0:
    os.close(w)  # the child closes its inherited copy of w
    leaked_in_child = os.open(__file__, os.O_RDONLY)
    os._exit(0)  # inherited fds die here: not leaks; leaked_in_child is one
os.waitpid(child, 0)
os.close(r)
os.close(w)
os.close(f)
print(json.dumps({"r": r, "w": w, "f": f, "kept": kept, "child": child, "pid": os.getpid()}))

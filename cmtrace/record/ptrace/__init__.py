"""The ptrace recording backend: engine.c (the stop loop, in C) and its Python side."""

"""BPF C sources of cmtrace (compiled by bcc at run time)."""

"""Peak open fds per process from hand-built lifetimes, against the soft RLIMIT_NOFILE in force
at the peak (cmtrace.analysis.limits)."""

from __future__ import annotations

import pandas as pd

from cmtrace.analysis.limits import fd_peaks, headroom_text, process_limits, soft_limit_at


def lifetimes(rows: list[tuple[int, int, int | None]]) -> pd.DataFrame:
    pid, born, died = zip(*rows)
    return pd.DataFrame({"pid": pid, "born_ns": born, "died_ns": pd.array(died, dtype="Float64")})


FDS = lifetimes(
    [
        (1, -1, None),  # pre-existing, open throughout
        (1, 5, 10),
        (1, 10, None),  # born as the one above dies: never both open
        (1, 10, 20),
        (2, 0, 4),
        (2, 3, None),
    ]
)


def test_peak_counts_preexisting_births_and_deaths_deaths_first():
    peaks = fd_peaks(FDS).set_index("pid")
    assert peaks.loc[1].tolist() == [3, 10]  # pre-existing + two born at 10 (one died then)
    assert peaks.loc[2].tolist() == [2, 3]


def test_soft_limit_at_follows_changes():
    limit = {"soft": 64, "hard": 128, "changes": [{"t_ns": 8, "soft": 32, "hard": 128}]}
    assert soft_limit_at(limit, 7) == 64
    assert soft_limit_at(limit, 8) == 32


def test_process_limits_and_the_headroom_line():
    meta = {
        "targets": [{"pid": 1, "comm": "python3"}],
        "rlimit_nofile": {
            "1": {"soft": 64, "hard": 128, "t_ns": 0,
                  "changes": [{"t_ns": 8, "soft": 4, "hard": 128}]},
        },
    }  # fmt: skip
    (entry,) = process_limits(FDS, meta)  # pid 2 is neither a target nor limited
    assert entry["peak_fds"] == 3 and entry["soft_at_peak"] == 4
    assert entry["peak_fraction"] == 0.75
    assert headroom_text(entry) == "peak 3 of 4 fds (75%); soft limit 64 -> 4"
    assert entry["rlimit_nofile"] == {"soft": 64, "hard": 128, "changes": [
        {"t_ns": 8, "soft": 4, "hard": 128}]}  # fmt: skip

"""Outputs of real traces: HTML in headless Chromium, PNG plot, diff of a fix, Perfetto JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TARGET_PYTHON, run_cmtrace

pytestmark = pytest.mark.usefixtures("bpf_ready")
PROGRAM = Path(__file__).parents[1] / "programs" / "leaks" / "no_context_manager.py"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("outputs")
    out = {}
    for name, args in (("leaking", ["5"]), ("fixed", ["5", "fixed"])):
        out[name] = base / name
        result = run_cmtrace("run", "-o", str(out[name]), "--", TARGET_PYTHON, str(PROGRAM), *args)
        assert result.returncode == 0, result.stderr
    return out


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        print("skipping browser check: no chromium (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def test_html_renders_in_chromium(traces, tmp_path: Path) -> None:
    browser = chromium()
    page = tmp_path / "report.html"
    result = run_cmtrace("report", str(traces["leaking"]), "--format", "html", "-o", str(page))
    assert result.returncode == 0, result.stderr
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    profile = tmp_path / "profile"
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
         "--v=0", "--window-size=1200,800", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.stat().st_size > 10_000, run.stderr
    console = [ln for ln in run.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert '<table class="sortable" id="sites">' in dom
    assert dom.count("<tr>") >= 2  # header and at least the leaking site
    stripped = run_cmtrace(
        "report", str(traces["leaking"]), "--format", "html", "--strip-source"
    ).stdout
    assert "class='src'" not in stripped
    if "no Python stacks" not in html:  # with stacks, the opening line's source is shown
        assert "LEAK-SITE" in html


def test_html_table_sorts_on_header_click(tmp_path: Path) -> None:
    """A click on the "opened" header in Chromium orders the sites by opened fds, numerically,
    moving whole rows; a second click reverses the order."""
    browser = chromium()
    trace, page = tmp_path / "trace", tmp_path / "report.html"
    # 12 fds at the leak site, fewer than 10 at the others: a text sort would put 12 first.
    result = run_cmtrace("run", "-o", str(trace), "--", TARGET_PYTHON, str(PROGRAM), "12")
    assert result.returncode == 0, result.stderr
    result = run_cmtrace("report", str(trace), "--format", "html", "-o", str(page))
    assert result.returncode == 0, result.stderr
    before = site_rows(dom_after_clicks(browser, page, []))
    opened = [row[2] for row in before]
    assert len(set(opened)) > 1 and opened != sorted(opened), before  # something to reorder
    assert sorted(opened) != sorted(opened, key=lambda n: str(int(n))), opened
    once = site_rows(dom_after_clicks(browser, page, ["opened"]))
    assert [row[2] for row in once] == sorted(opened), once
    assert sorted(once) == sorted(before)  # rows moved whole, none lost
    twice = site_rows(dom_after_clicks(browser, page, ["opened", "opened"]))
    assert [row[2] for row in twice] == sorted(opened, reverse=True), twice


def dom_after_clicks(browser: str, page: Path, headers: list[str]) -> str:
    """The page's DOM after a script clicks the named column headers in turn (in Chromium,
    through the page's own click handlers), read back with --dump-dom; no script errors."""
    clicks = "".join(
        "Array.prototype.find.call(document.querySelectorAll('#sites th'),"
        f"function(th){{return th.textContent === {json.dumps(header)};}})"
        ".dispatchEvent(new MouseEvent('click', {bubbles: true, cancelable: true}));"
        for header in headers
    )
    head, _, tail = page.read_text().rpartition("</body>")
    clicked = page.with_name(f"clicked-{len(headers)}.html")
    clicked.write_text(f"{head}<script>{clicks}</script></body>{tail}")
    run = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={page.parent / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", clicked.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [ln for ln in run.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not errors, errors
    return run.stdout


def site_rows(dom: str) -> list[tuple]:
    """(site, leaked, opened, closed, leaks/s) of each row of the sites table, in page order."""
    body = dom.split('<table class="sortable" id="sites">', 1)[1].split("</tbody>", 1)[0]
    rows = []
    for row in re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>", 1)[1], re.S):
        site = re.search(r'<td data-v="([^"]*)"', row).group(1)
        numbers = [float(n) for n in re.findall(r'<td class="n">([^<]*)</td>', row)]
        rows.append((site, *numbers))
    return rows


def test_plot_png_is_not_trivial(traces, tmp_path: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    out = tmp_path / "plot.png"
    result = run_cmtrace("plot", str(traces["leaking"]), "-o", str(out))
    assert result.returncode == 0, result.stderr
    image = mpimg.imread(out)
    assert image.shape[0] > 800 and image.shape[1] > 800
    colours = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # panels, legends and curves, not a blank canvas
    svg = tmp_path / "plot.svg"
    assert run_cmtrace("plot", str(traces["leaking"]), "-o", str(svg)).returncode == 0
    assert svg.read_text().lstrip().startswith("<?xml")
    assert (
        run_cmtrace("plot", str(traces["leaking"]), "-o", str(tmp_path / "x.gif")).returncode == 1
    )


def test_diff_proves_the_fix(traces) -> None:
    result = run_cmtrace("diff", str(traces["leaking"]), str(traces["fixed"]), "--format", "json")
    assert result.returncode == 0, result.stderr
    diff = json.loads(result.stdout)
    assert diff["schema"] == 1
    fixed = [s for s in diff["sites"] if s["before"] == 5 and s["after"] == 0]
    assert len(fixed) == 1, diff
    assert set(fixed[0]) >= {"file", "line", "function", "cause", "before", "after"}
    assert not [s for s in diff["sites"] if s["after"] > 0]
    text = run_cmtrace("diff", str(traces["leaking"]), str(traces["fixed"])).stdout
    assert "fixed" in text


def test_perfetto_export_is_well_formed(traces, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    result = run_cmtrace("export", str(traces["leaking"]), "--format", "perfetto", "-o", str(out))
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    events = doc["traceEvents"]
    begins = {(e["cat"], e["id"]): e for e in events if e["ph"] == "b"}
    ends = {(e["cat"], e["id"]): e for e in events if e["ph"] == "e"}
    assert begins and begins.keys() == ends.keys()
    for key, begin in begins.items():
        end = ends[key]
        assert begin["name"] == end["name"] and begin["pid"] == end["pid"]
        assert isinstance(begin["ts"], (int, float)) and end["ts"] >= begin["ts"]
        assert isinstance(begin["id"], str) and begin["id"].startswith("0x")
    names = {e["name"] for e in events if e["ph"] == "M"}
    assert {"process_name", "thread_name"} <= names
    leaked = [b for b in begins.values() if b["args"]["leak"]]
    assert len([b for b in leaked if b["args"]["path"] == str(PROGRAM)]) == 5

"""The package points at nothing outside the repository and uses no private API that issue 19
has already replaced (the remaining ones are listed there, to go with the stream redesign)."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ffc_ray"
FORBIDDEN = {
    "a document outside the repository": r"RAY_NOTES|REFERENCE_FFC_PFC|ARCHITECTURE\.md",
    "Ray's private worker module": r"ray\._private",
    "Optuna's private membership test": r"\._contains\(",
}


def test_no_pointer_outside_the_repo_and_no_replaced_private_api():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {what}")
    assert not found, "\n".join(found)


def test_cited_reference_sections_exist():
    """Every ``docs/reference.md N.M`` a docstring cites is a heading there."""
    doc = (PACKAGE.parent / "docs" / "reference.md").read_text()
    headings = set(re.findall(r"^###? (\d+(?:\.\d+)?)", doc, re.M))
    cited = set()
    for path in PACKAGE.rglob("*.py"):
        for m in re.finditer(r"docs/reference\.md ([\d.,\- ]+)", path.read_text()):
            cited |= set(re.findall(r"\d+\.\d+", m.group(1)))
    assert cited and cited <= headings, cited - headings


def test_no_private_ray_or_optuna_api_in_the_package():
    """Nothing in ffc_ray/ reaches into Ray's or Optuna's private modules or attributes, which
    change without notice from one release to the next."""
    private = re.compile(
        r"ray\._private|ray\._raylet|\._internal\b|\._topology\b|RAY_GCS_SERVER_PORT"
        r"|\._contains\b|optuna\._|\b_system_config\b"
    )
    users = {
        f"{p.relative_to(PACKAGE.parent)}: {m.group(0)}"
        for p in PACKAGE.rglob("*.py")
        for m in private.finditer(p.read_text())
    }
    assert not users, sorted(users)


def test_benchmarks_page_is_generated_from_the_results():
    """docs/benchmarks.md is what ``benchmarks/report.py`` writes from results/*.json (rerun
    it after saving a new result)."""
    import importlib.util

    repo = PACKAGE.parent
    spec = importlib.util.spec_from_file_location("report", repo / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert (repo / "docs" / "benchmarks.md").read_text() == report.render()

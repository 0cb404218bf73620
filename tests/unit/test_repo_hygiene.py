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


def test_private_ray_data_use_is_only_the_version_guarded_scheduler_throttle():
    """``ray.data._internal`` and the executor's ``_topology`` appear in stream.py alone, and on
    any Ray release but the measured one the throttle is not installed at all."""
    import subprocess
    import sys

    users = {
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*.py")
        if re.search(r"ray\.data\._internal|\._topology\b", p.read_text())
    }
    assert users == {"ffc_ray/data/stream.py"}
    code = (
        "import ray; ray.__version__ = '9.9.9'\n"
        "from ray.data import DataContext\n"
        "import ffc_ray.data.stream as s\n"
        "assert s.QuietScheduler is None, s.QuietScheduler\n"
        "ctx = DataContext.get_current(); before = list(ctx.custom_execution_callback_classes)\n"
        "s.quiet_scheduler(ctx)\n"
        "assert list(ctx.custom_execution_callback_classes) == before\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]

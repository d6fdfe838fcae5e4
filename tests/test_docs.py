"""The generated docs are up to date, and the docs' relative links lead somewhere.

docs/api.md is generated from the proto comments and docs/architecture.md's lifecycle
table from bmi_server/core/lifecycle.py: edit those, then run `make docs`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def check(*argv: str) -> None:
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr + done.stdout


def test_api_reference_is_generated_from_the_current_protos():
    check("tools/gen_api_docs.py", "--check", "docs/api.md")


def test_lifecycle_table_is_generated_from_the_current_code():
    check("tools/gen_state_table.py", "--check", "docs/architecture.md")


def anchors(path: Path) -> set[str]:
    """Explicit <a id> anchors and GitHub-style heading slugs."""
    text = path.read_text()
    found = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_relative_links_resolve(page):
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        file, _, fragment = target.partition("#")
        path = (DOCS / file) if file else DOCS / page
        assert path.exists(), f"{page}: link to missing {target}"
        if fragment and path.suffix == ".md":
            assert fragment in anchors(path), f"{page}: no anchor for {target}"


def test_architecture_names_every_port():
    """The map of the code lists every port of core/ports.py (a Protocol), each in
    backquotes, as the ports table does."""
    import inspect
    from typing import Protocol

    from bmi_server.core import ports

    names = {name for name, value in vars(ports).items()
             if inspect.isclass(value) and Protocol in value.__mro__[1:]
             and value.__module__ == ports.__name__}  # fmt: skip
    text = (DOCS / "architecture.md").read_text()
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"docs/architecture.md: list these ports of core/ports.py: {missing}"


def test_operator_guide_shows_the_current_schema_head():
    """Upgrading's example of `admin db current` names this release's head revision."""
    from bmi_server.adapters.sql.migrate import head

    text = (DOCS / "operator-guide.md").read_text()
    assert f"{head()} (head)" in text, f"docs/operator-guide.md (Upgrading): {head()} (head)"

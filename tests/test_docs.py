"""The front door stays true: the README's quick start is what CI runs, every link in the README
and the guides leads somewhere, the README stays short, and no page points at a tracker a
reader cannot see."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_quick_start_is_two_commands_and_the_second_is_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    demo, tests = _bash_blocks(quick)
    assert "\n" not in demo and "\n" not in tests, "each quick-start command is one line"
    assert demo.endswith("scripts/demo.py") and "pip install -e ." in demo
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines(), ".ci/run must run the README's test command, as written"


def test_every_link_in_the_readme_and_the_guides_leads_somewhere():
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"(?m)^#+ (.+)$", file.read_text(encoding="utf-8"))
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_a_front_door_not_a_manual():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail to docs/"
    text = "\n".join(lines)
    for guide in (
        "docs/data.md",
        "docs/training.md",
        "docs/evaluation.md",
        "docs/inference.md",
        "docs/export.md",
        "docs/reliability.md",
        "docs/results.md",
    ):
        assert f"({guide})" in text, f"the README does not link {guide}"
    assert "scripts/predict.py" in text.split("## Results")[0], "predict must be on the README's first screens"


def test_no_page_points_at_an_issue_tracker_the_reader_cannot_see():
    for page in PAGES:
        found = re.findall(r"\b[Ii]ssue \d+\b", page.read_text(encoding="utf-8"))
        assert not found, f"{page.name}: {found}"

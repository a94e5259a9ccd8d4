"""Citations of the repository's own documents: every `docs/<name>.md` that code, tests, scripts or
docs cite exists and has the section cited (`docs/daraja.md §2`, `docs/design.md, "Payment states"`),
and nothing cites notes kept outside the repository. Pure: reads files only.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["services", "tests", "bench", "infra", "docs", "ops", "schemas", "migrations", "README.md", "compose.yaml",
           "Makefile", "Dockerfile", "pyproject.toml"]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".sql", ".yaml", ".yml", ".toml", ".json", ".avsc", ".xml", ".txt", ""}

# docs/<name>.md not inside a URL or another repository's path, then optionally the sections cited:
# `§2`, `§1-§4`, `§2, §4`, or a quoted heading.
CITATION = re.compile(r'(?<![\w/.-])docs/(?P<file>[\w-]+(?:/[\w-]+)*\.md)'
                      r'(?:,?\s*(?P<sections>§\d+(?:\s*(?:[-–,/]|and)\s*§\d+)*)|,?\s*"(?P<heading>[^"\n]+)")?')
# Where the reasoning used to live, outside the repository: a reader with only the repository has none of it.
OUTSIDE_NOTES = re.compile(r"\.\./shared|/work/shared|shared/(?:design|daraja|kafka-local)\.md|design notes?\b",
                           re.IGNORECASE)


def scanned_files() -> list[Path]:
    files: list[Path] = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES
                      and "__pycache__" not in p.parts]
    return files


def headings(document: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in document.read_text().splitlines() if line.startswith("#")]


def citation_problems(text: str, docs: Path) -> list[str]:
    """What is wrong with the citations in `text`: a missing file, section or heading."""
    problems = []
    for match in CITATION.finditer(text):
        cited = docs / match["file"]
        if not cited.is_file():
            problems.append(f"docs/{match['file']} does not exist")
            continue
        titles = headings(cited)
        for number in re.findall(r"§(\d+)", match["sections"] or ""):
            if not any(re.match(rf"§{number}\b", title) for title in titles):
                problems.append(f"docs/{match['file']} has no section §{number}")
        heading = match["heading"]
        if heading and not any(heading.lower() in title.lower() for title in titles):
            problems.append(f'docs/{match["file"]} has no section "{heading}"')
    return problems


def test_every_cited_document_and_section_exists():
    problems = [f"{path.relative_to(ROOT)}: {problem}" for path in scanned_files()
                for problem in citation_problems(path.read_text(errors="replace"), ROOT / "docs")]
    assert not problems, "\n".join(problems)


def test_nothing_cites_notes_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in scanned_files()
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if OUTSIDE_NOTES.search(line) and path != Path(__file__)]  # not this file's pattern
    assert not found, "\n".join(found)


def test_a_broken_citation_is_caught(tmp_path):
    """The check can fail: a missing file, a missing numbered section, a missing heading."""
    (tmp_path / "guide.md").write_text("# Guide\n\n## §1 Tokens\n\n## §2 Pushes\n\n## Payment states\n")
    doc = "docs/" + "guide.md"
    assert citation_problems(f'see {doc} §1-§2 and {doc}, "Payment states"', tmp_path) == []
    assert citation_problems(f"see {doc} §3", tmp_path) == [f"{doc} has no section §3"]
    assert citation_problems(f"see {doc} §1, §12", tmp_path) == [f"{doc} has no section §12"]
    assert citation_problems(f'see {doc}, "Payment rules"', tmp_path) == [f'{doc} has no section "Payment rules"']
    missing = "docs/" + "nowhere.md"
    assert citation_problems(f"see {missing}", tmp_path) == [f"{missing} does not exist"]
    # Other sites' and repositories' docs/ paths are not ours.
    assert citation_problems("https://example.org/docs/" + "nowhere.md, owner/repo/docs/" + "x.md", tmp_path) == []

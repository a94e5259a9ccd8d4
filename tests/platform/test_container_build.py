"""The container build, read without Docker: `.dockerignore` keeps secrets and local state out of the build
context while letting in everything the Dockerfile copies; the Dockerfile installs dependencies before the
code and the package from its wheel; compose.yaml builds one image and every service of ours reuses it.
Pure: reads files only (and `git ls-files`)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, pattern) per line, in order. Docker's syntax: Go's filepath.Match plus `**` for any
    number of directories, `!` for an exception (https://docs.docker.com/build/concepts/context/#dockerignore-files)."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex = "".join("(?:.*/)?" if part == "**/" else ".*" if part == "**" else "[^/]*" if part == "*"
                        else "[^/]" if part == "?" else re.escape(part)
                        for part in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern))
        rules.append((exception, re.compile(f"{regex}$")))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for exception, pattern in rules:
        if any(pattern.match(candidate) for candidate in candidates):
            verdict = not exception
    return verdict


RULES = dockerignore_rules((ROOT / ".dockerignore").read_text())


def instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


DOCKERFILE = instructions((ROOT / "Dockerfile").read_text())
FINAL_STAGE = DOCKERFILE[max(i for i, line in enumerate(DOCKERFILE) if line.startswith("FROM ")):]


@pytest.mark.parametrize("path", [
    ".local/secrets/pgpass", ".local/kafka/tls/ca.key", ".local/secrets/kafka-admin.password", ".env",
    ".venv/bin/python", ".git/HEAD", "integrations/vendure/node_modules/x/index.js",
    "integrations/vendure/dist/index.js", "dist/mpesa_pipeline-0.1.0-py3-none-any.whl", "build/lib/services/cli.py",
    ".pytest_cache/README.md", ".mypy_cache/3.11/x.json", ".ruff_cache/x", ".hypothesis/examples/x",
    "services/common/__pycache__/avro.cpython-311.pyc", "mpesa_pipeline.egg-info/PKG-INFO",
])
def test_secrets_local_state_and_caches_stay_out_of_the_build_context(path):
    assert ignored(path, RULES)


def test_everything_the_dockerfile_copies_is_in_the_build_context():
    sources = [word for line in DOCKERFILE if line.startswith("COPY ") and "--from=" not in line
               for word in line.split()[1:-1]]
    assert {"pyproject.toml", "services", "schemas", "migrations"} <= set(sources)
    tracked = subprocess.run(["git", "ls-files", "--", *sources], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert len(tracked) > len(sources)
    assert [path for path in tracked if ignored(path, RULES)] == []


def test_the_matcher_reads_docker_patterns_as_docker_does():
    rules = dockerignore_rules("*\n!services\n**/__pycache__\nnotes/*.md\n!notes/keep.md\n")
    assert ignored("README.md", rules) and not ignored("services/cli.py", rules)
    assert ignored("services/a/__pycache__/x.pyc", rules) and ignored("__pycache__/x.pyc", rules)
    assert not ignored("notes/keep.md", dockerignore_rules("notes/*.md\n!notes/keep.md"))
    assert ignored("notes/a/b.md", dockerignore_rules("notes")) and not ignored("notes/a/b.md", rules[3:4])


def test_dependencies_are_installed_from_pyproject_alone_before_the_code_is_copied():
    install = next(i for i, line in enumerate(FINAL_STAGE) if "pip install" in line and " -r " in line)
    copied_before = [line for line in FINAL_STAGE[:install] if line.startswith("COPY ")]
    assert copied_before == ["COPY pyproject.toml /tmp/pyproject.toml"]
    copied_after = [line for line in FINAL_STAGE[install:] if line.startswith("COPY ")]
    assert copied_after == ["COPY --from=wheel /wheels /wheels"]


def test_the_image_installs_the_built_wheel_not_an_editable_checkout():
    assert not [line for line in DOCKERFILE if re.search(r"pip install .*(?:\s-e\s|--editable)", line)]
    assert any(re.search(r"pip install --no-cache-dir --no-deps /wheels/\*\.whl", line) for line in FINAL_STAGE)
    assert not [line for line in FINAL_STAGE if line.startswith("COPY services")]  # no source tree to shadow it


def compose_services() -> dict[str, str]:
    """Each service's block of compose.yaml, by name (two-space keys under `services:`)."""
    text = (ROOT / "compose.yaml").read_text()
    body = re.search(r"^services:\n(.*?)(?=^\S)", text, re.S | re.M)
    assert body
    blocks = re.split(r"^  (?=[\w-]+:)", body.group(1), flags=re.M)
    return {block.split(":", 1)[0]: block for block in blocks if block.strip() and not block.startswith(" ")}


def test_compose_builds_one_image_and_every_service_of_ours_reuses_it_by_name():
    text = (ROOT / "compose.yaml").read_text()
    assert len(re.findall(r"^\s*build:", text, re.M)) == 1
    anchor = re.search(r"^x-image: &image\n((?:  .*\n)+)", text, re.M)
    assert anchor and anchor.group(1).split() == ["image:", "mpesa-pipeline:local", "build:", ".", "pull_policy:",
                                                  "build"]
    ours, theirs = [], []
    for name, block in compose_services().items():
        if re.search(r"^    <<: \*(?:image|service)$", block, re.M):
            ours.append(name)
        else:
            image = re.search(r"^    image: (\S+)$", block, re.M)
            assert image and not image.group(1).startswith("mpesa-pipeline"), f"{name}: neither our image nor another"
            theirs.append(name)
    assert {"migrate", "kafka-init", "kafka-setup", "ledger", "ingress", "stk-worker", "notifier"} <= set(ours)
    assert {"kafka", "postgres"} <= set(theirs)

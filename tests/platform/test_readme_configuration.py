"""README's configuration table against the settings each service declares, so that neither drifts.

Each program's settings list (the one it hands to config.load_into) is read here, and the README's
table must list every variable with its default and exactly the programs that read it, and nothing
that no program reads. A new service adds its list to READERS. Pure: no broker or database.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from services import cli
from services.channels import cli as channels_cli, settings as channels_settings
from services.common import config
from services.daraja_sandbox import settings as sandbox_settings
from services.ingress import bootstrap as ingress
from services.ledger import __main__ as ledger, anchors
from services.notifier import settings as notifier
from services.operations import settings as operations
from services.privacy import settings as privacy
from services.stk_worker import __main__ as stk_worker
from services.webhook_consumer import settings as gateway

README = Path(__file__).resolve().parents[2] / "README.md"

# The name each program has in the table's "used by" column, and the settings it reads.
SERVICES: dict[str, list[config.Setting]] = {
    "ingress": ingress.SETTINGS,
    "stk_worker": stk_worker.SETTINGS,
    "gateway": gateway.SETTINGS,
    "ledger": ledger.SETTINGS,
    "onboarding API": [*channels_settings.API_SETTINGS, *privacy.API_PAYERS_SETTINGS],
    "audit anchoring": anchors.SETTINGS,
    "notifier": notifier.NOTIFIER_SETTINGS,
    "privacy": privacy.SETTINGS,
}
READERS: dict[str, list[config.Setting]] = {
    # run_service reads LOG_LEVEL for every service it starts, before the service's own list.
    **{name: [*settings, config.LOG_LEVEL] for name, settings in SERVICES.items()},
    "Daraja sandbox": sandbox_settings.SETTINGS,
    "commands": [*cli.MIGRATE_SETTINGS, *cli.AUDIT_VERIFY_SETTINGS, *cli.ANCHOR_KEY_SETTINGS, *cli.RUN_SETTINGS,
                 *channels_settings.ONBOARDING_SETTINGS, *channels_cli.VAULT_SETTINGS, *operations.PAYMENTS_SETTINGS,
                 *privacy.PAYERS_SETTINGS],
}
EVERY_SERVICE = "every service"  # the table's shorthand: every reader but the commands

# Rows for variables that are not a Setting: read by librdkafka/libpq or the infra scripts.
NOT_SETTINGS = {"KAFKA_CLIENT_<NAME>", "KAFKA_CLIENT_<NAME>_FILE", "PGPASSFILE", "KAFKA_PORT",
                "KAFKA_CONTROLLER_PORT", "KAFKA_DIR", "PGPORT", "PG_STOP_MODE", "TEST_STOPPABLE_KAFKA_PORT",
                "TEST_STOPPABLE_KAFKA_CONTROLLER_PORT", "PROMETHEUS_PORT", "PROMETHEUS_DIR"}


def table_rows() -> dict[str, tuple[str, str]]:
    """{variable: (default cell, used-by cell)} from the table under "## Configuration"; a row naming
    several variables (`A` / `B`) gives each its part of the default cell."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) != 4:
            continue
        names = [n.strip().strip("`") for n in cells[0].split(" / ")]
        defaults = cells[1].split(" / ") if len(names) > 1 else [cells[1]]
        assert len(defaults) == len(names), f"the row of {cells[0]} needs one default per variable"
        for name, default in zip(names, defaults, strict=True):
            assert name not in rows, f"{name} has two rows"
            rows[name] = (default.strip(), cells[2])
    return rows


def readers_in(cell: str) -> set[str]:
    """The programs a "used by" cell names; remarks in parentheses are for people only."""
    names = {n.strip() for n in re.sub(r"\([^)]*\)", "", cell).split(",")}
    if EVERY_SERVICE in names:
        names = (names - {EVERY_SERVICE}) | (set(READERS) - {"commands"})
    return names


def shown(value: Any) -> str:
    """A default as the table writes it: 5.0 as 5, a path as its text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def declared() -> dict[str, tuple[set[str], list[config.Setting]]]:
    """{variable: (the programs that read it, each program's Setting for it)}."""
    found: dict[str, tuple[set[str], list[config.Setting]]] = {}
    for reader, settings in READERS.items():
        for setting in settings:
            readers, declarations = found.setdefault(setting.env, (set(), []))
            readers.add(reader)
            declarations.append(setting)
    return found


def default_matches(cell: str, settings: list[config.Setting]) -> bool:
    """A concrete default is the cell's first `value`, where `<role>` stands for any word (a
    DATABASE_URL's default differs by each service's role); a required setting's cell says so; an
    empty or unset default is described in words, never shown as a value."""
    missing = [s for s in settings if s.default is config._MISSING]
    if missing:
        return len(missing) == len(settings) and "required" in cell
    if all(s.default is None or s.default in ({}, (), "") for s in settings):
        return not cell.startswith("`")
    value = re.match(r"`([^`]*)`", cell)
    if not value:
        return False
    pattern = re.sub(r"<\w+>", r"\\w+", re.escape(value.group(1)).replace(r"\<", "<").replace(r"\>", ">"))
    return all(re.fullmatch(pattern, shown(s.default)) for s in settings)


def test_every_variable_a_program_reads_is_in_the_table_with_its_readers_and_default():
    rows = table_rows()
    problems = []
    for env, (readers, settings) in sorted(declared().items()):
        if env not in rows:
            problems.append(f"{env} (read by {sorted(readers)}) has no row")
            continue
        default_cell, used_by = rows[env]
        if readers_in(used_by) != readers:
            problems.append(f"{env}: the table says {sorted(readers_in(used_by))}, the code {sorted(readers)}")
        if not default_matches(default_cell, settings):
            problems.append(f"{env}: the table's default {default_cell!r}, the code's "
                            f"{sorted({shown(s.default) for s in settings})}")
    assert not problems, "\n".join(problems)


def test_the_table_lists_no_variable_that_nothing_reads():
    assert set(table_rows()) - set(declared()) - NOT_SETTINGS == set()


def test_the_variables_read_outside_the_settings_lists_are_still_listed():
    assert NOT_SETTINGS <= set(table_rows())


def test_every_service_started_by_run_service_has_its_list_here():
    """A new service (a module calling run_service) must join SERVICES, or its variables go unchecked."""
    sources = Path(__file__).resolve().parents[2] / "services"
    starters = {str(p.relative_to(sources.parent)) for p in sources.rglob("*.py")
                if re.search(r"^\s*run_service\(", p.read_text(), re.MULTILINE)}
    assert starters == {"services/ingress/__main__.py", "services/stk_worker/__main__.py",
                        "services/webhook_consumer/__main__.py", "services/ledger/__main__.py",
                        "services/channels/__main__.py", "services/ledger/anchors.py",
                        "services/notifier/__main__.py", "services/privacy/__main__.py"}


def test_a_drifted_table_is_caught():
    """The checks above can fail: a wrong reader, a wrong default, a stale row."""
    assert readers_in("ingress, ledger (and the infra scripts)") == {"ingress", "ledger"}
    port = config.Setting("X_PORT", config.port, 8080)
    assert default_matches("`8080`", [port]) and not default_matches("`8081`", [port])
    assert not default_matches("empty", [port])
    url = [config.database_url("ledger"), config.database_url("ingress")]
    assert default_matches("`postgresql://<role>@127.0.0.1:5433/mpesa`", url)
    assert not default_matches("`postgresql://<role>@127.0.0.1:5432/mpesa`", url)
    assert not default_matches("`x`", [config.Setting("SECRET", str, secret=True)])

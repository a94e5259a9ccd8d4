"""PostgreSQL: connection pools and the project's schema migrations (migrations/NNNN_*.sql).

Migrations are applied by the schema's owner (`mpesa-pipeline migrate`), never by a service: a
service logs in as a role that can neither create nor alter tables (docs/database-roles.md) and
only checks at start that the schema is at the version its code needs.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from services.common.runtime import StartupRefused

# Package data (services/migrations links to the repository's migrations/), so an installed wheel carries it.
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
_MIGRATION_LOCK = 7_262_021  # advisory lock id: one migrator at a time across services

log = logging.getLogger(__name__)


class SchemaNotReady(StartupRefused):
    """The database cannot serve this code yet; the message says why and what to run."""


class DatabaseUnreachable(Exception):
    """PostgreSQL did not let us in. The message is one line naming where (host and port, never the
    user or password) and why, as a command-line tool prints it."""

    def __init__(self, database_url: str, error: Exception):
        super().__init__(f"cannot reach PostgreSQL at {server_of(database_url)} ({reason_of(error)})")


def server_of(database_url: str) -> str:
    """host:port of a connection URL (libpq's defaults when absent), for messages."""
    try:
        params = conninfo_to_dict(database_url)
    except psycopg.ProgrammingError:
        return "(an unreadable DATABASE_URL)"
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"


_LIBPQ_PREFIX = re.compile(r'^(connection failed: )?connection to server (at|on) .*?failed: ', re.IGNORECASE)


def reason_of(error: Exception) -> str:
    """libpq's reason, without its preamble and hints: 'Connection refused', 'password authentication
    failed for user "x"', 'timeout expired'..."""
    lines = str(error).strip().splitlines()
    first = lines[0].strip() if lines else type(error).__name__
    return _LIBPQ_PREFIX.sub("", first).strip() or type(error).__name__


def migrate(database_url: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Applies every migration not yet applied, each in its own transaction; returns their names."""
    applied_now = []
    try:
        conn = psycopg.connect(database_url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise DatabaseUnreachable(database_url, exc) from None
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         "name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for path in sorted(migrations_dir.glob("*.sql")):
                if path.name in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied_now.append(path.name)
                log.info("applied migration %s", path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied_now


def pending_migrations(conn: psycopg.Connection, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Names of this code's migrations not applied to the database yet (all of them on an empty one)."""
    try:
        with conn.transaction():
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    except psycopg.errors.UndefinedTable:
        done = set()
    return [path.name for path in sorted(migrations_dir.glob("*.sql")) if path.name not in done]


def require_schema(database_url: str, migrations_dir: Path = MIGRATIONS_DIR) -> None:
    """Raises SchemaNotReady unless every migration this code ships was applied. A schema further
    ahead is fine: migrations only add what older code does not read. Warns when the service logs
    in as the schema's owner, which can rewrite the audit trail."""
    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
            missing = pending_migrations(conn, migrations_dir)
            owner = conn.execute("SELECT pg_has_role(current_user, tableowner, 'MEMBER') FROM pg_tables"
                                 " WHERE schemaname = current_schema() AND tablename = 'schema_migrations'").fetchone()
    except psycopg.OperationalError as exc:
        raise SchemaNotReady(str(DatabaseUnreachable(database_url, exc))) from None
    except psycopg.errors.InsufficientPrivilege:
        raise SchemaNotReady("this role may not read schema_migrations: run `mpesa-pipeline migrate` "
                             "(as the migration role) to apply migrations/0009_roles.sql") from None
    if missing:
        raise SchemaNotReady(f"the database schema lacks {len(missing)} migration(s) this code needs "
                             f"(first: {missing[0]}): run `mpesa-pipeline migrate` as the migration role")
    if owner and owner[0]:
        log.warning("DATABASE_URL logs in as the schema's owner, which may alter and truncate every table; "
                    "give this service its own role (docs/database-roles.md)")


async def open_pool(database_url: str, *, min_size: int = 1, max_size: int = 10,
                    autocommit: bool = False) -> AsyncConnectionPool:
    """autocommit saves the COMMIT round trip for single statements; transaction() still works.
    A connection broken by a PostgreSQL restart fails its next query (callers treat that as
    transient and retry) and the pool discards it on return. Raises DatabaseUnreachable at once,
    saying why, when PostgreSQL does not let a first connection in (the pool alone would retry for
    30 s and then say only that it timed out)."""
    try:
        probe = await psycopg.AsyncConnection.connect(database_url, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise DatabaseUnreachable(database_url, exc) from None
    await probe.close()
    pool = AsyncConnectionPool(database_url, min_size=min_size, max_size=max_size, open=False,
                               kwargs={"autocommit": autocommit})
    await pool.open(wait=True, timeout=30)
    return pool


async def every(interval_s: float, stop: asyncio.Event, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Runs step, then again interval_s later, until stop is set. PostgreSQL being unreachable is
    logged and tried again at the next turn: the step's transaction rolled back, nothing half done."""
    while not stop.is_set():
        try:
            await step()
        except psycopg.OperationalError as exc:
            log.warning("%s: %s; retrying", what, exc)
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass

"""The package works outside an editable install: a wheel built from a clean checkout, installed into a
fresh virtual environment, migrates a database and decodes messages with nothing but its own package
data (services/schemas and services/migrations, links to the repository's schemas/ and migrations/).

Slow-ish (a build and an install, dependencies from pip's cache or PyPI), so it runs in `make test` only:
it needs PostgreSQL anyway.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from tests.platform.test_schemas import SCHEMA_NAMES, comparable, load_sample

ROOT = Path(__file__).resolve().parents[2]

# Run inside the fresh environment, from an empty directory: reads {schema name: hex message} on stdin and
# prints where `services` was imported from and what the installed codec decoded.
DECODE = """
import json, sys
from datetime import datetime
import services
from services.common.avro import Codec
codec = Codec()
def plain(value):
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else value.decode()
decoded = {name: codec.decode(bytes.fromhex(data)) for name, data in json.load(sys.stdin).items()}
print(json.dumps({"package": services.__file__, "decoded": decoded}, default=plain))
"""


def copy_checkout(to: Path) -> Path:
    """What a clean clone holds (tracked files and new ones not ignored, edits included), links kept as links."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, to / name
        if not source.is_symlink() and not source.exists():
            continue  # deleted, not yet committed
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return to


def single_object_message(name: str) -> bytes:
    """A sample as a producer writes it without a registry (Avro single-object encoding), made here with
    fastavro from the repository's schema so the installed codec has to find that schema in its own data."""
    schema = parse_schema(json.loads((ROOT / "schemas" / f"{name}.avsc").read_text()))
    body = io.BytesIO()
    schemaless_writer(body, schema, load_sample(name))
    return b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")) + body.getvalue()


def with_search_path(database_url: str, schema: str) -> str:
    return f"{database_url}{'&' if '?' in database_url else '?'}options=-csearch_path%3D{schema}"


@pytest.fixture
def fresh_schema(database_url, unique):
    """A schema of its own in the tests' database, as the migration role (which owns the database)."""
    name = f"wheel_{unique}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold pip cache downloads every dependency
def test_the_wheel_installed_in_a_fresh_venv_migrates_and_decodes(tmp_path, database_url, fresh_schema):
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkout = copy_checkout(tmp_path / "checkout")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels),
                    str(checkout)], check=True, capture_output=True)
    [wheel] = wheels.glob("mpesa_pipeline-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    str(wheel)], check=True, capture_output=True)
    # Nothing of the repository on the path: an empty working directory, no PYTHONPATH.
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "PGPASSFILE": os.environ.get("PGPASSFILE", ""),
           "DATABASE_URL": with_search_path(database_url, fresh_schema)}

    migrated = subprocess.run(["mpesa-pipeline", "migrate"], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=120)
    shipped = sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith(f"applied {len(shipped)} migration(s)"), migrated.stdout
    with psycopg.connect(database_url) as conn:
        applied = [row[0] for row in conn.execute(f"SELECT name FROM {fresh_schema}.schema_migrations ORDER BY name")]
    assert applied == shipped

    messages = {name: single_object_message(name).hex() for name in SCHEMA_NAMES}
    run = subprocess.run([str(venv / "bin" / "python"), "-c", DECODE], cwd=elsewhere, env=env,
                         input=json.dumps(messages), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert Path(result["package"]).is_relative_to(venv), result["package"]
    for name in SCHEMA_NAMES:
        decoded_name, record = result["decoded"][name]
        assert decoded_name == name
        assert record == json.loads(json.dumps(comparable(load_sample(name)), default=bytes.decode))

"""Anchors of the audit chain: the head (row, hash, time) signed with Ed25519 by a key the ledger
does not hold, so a rewritten trail shows even if every hash after the edit was recomputed.

The ledger's role may only append to audit_log; the schema's owner (or a superuser) could still
rewrite it and recompute the chain. This job, `python -m services.ledger.anchors`, logs in as the
auditor role (read audit_log, append to audit_anchors, nothing else), checks the rows added since its
last anchor and signs the new head. `mpesa-pipeline audit verify` then checks every anchor's
signature with the public key and that its row still has the anchored hash. Each anchor is also
logged, a copy outside the database. docs/database-roles.md has the reasoning.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from prometheus_client import Counter, Gauge
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.common import config
from services.common.db import every, open_pool, require_schema
from services.common.observability import DatabaseCheck, Health, serve_ops
from services.common.runtime import StartupRefused, run_service
from services.ledger.store import verify_audit

log = logging.getLogger(__name__)

ANCHORS = Counter("audit_anchors_total", "Anchoring steps by result: anchored, or chain_broken (nothing signed)",
                  ["result"])
CHECKED = Gauge("audit_anchor_checked_timestamp_seconds",
                "When the chain was last found intact up to its head (and anchored, if it had grown)")

KEY_FILE = config.Setting("AUDIT_ANCHOR_KEY_FILE", Path, Path(".local/audit/anchor-key.pem"),
                          help="Ed25519 private key that signs anchors (0600); only where the anchoring job runs")
PUBLIC_KEY_FILE = config.Setting("AUDIT_ANCHOR_PUBLIC_KEY_FILE", Path, Path(".local/audit/anchor-key.pub.pem"),
                                 help="public keys that `audit verify` accepts for anchors (PEM, one or more)")
SETTINGS = [config.database_url("auditor"), KEY_FILE, config.METRICS_HOST,
            config.Setting("AUDIT_ANCHOR_METRICS_PORT", config.port, 9104,
                           help="port of /metrics, /healthz and /readyz"),
            config.Setting("AUDIT_ANCHOR_INTERVAL_S", config.positive_float, 60.0,
                           help="how often the chain's head is anchored (rows after the newest anchor are "
                                "protected by their hashes only)")]


class ChainBroken(Exception):
    """The rows since the last anchor do not verify: nothing is signed."""


@dataclass(frozen=True)
class Anchor:
    audit_seq: int
    audit_hash: str
    anchored_at: datetime
    key_id: str
    signature: bytes

    def message(self) -> bytes:
        """What is signed; the time in UTC with microseconds, as PostgreSQL keeps it."""
        at = self.anchored_at.astimezone(timezone.utc).isoformat(timespec="microseconds")
        return f"mpesa-pipeline audit anchor v1\n{self.audit_seq}\n{self.audit_hash}\n{at}\n{self.key_id}".encode()

    def verifies(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(self.signature, self.message())
            return True
        except InvalidSignature:
            return False


@dataclass(frozen=True)
class AnchorReport:
    checked: int
    newest: Anchor | None
    problem: str | None


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, audit_seq: int, audit_hash: str, at: datetime) -> Anchor:
    unsigned = Anchor(audit_seq, audit_hash, at.astimezone(timezone.utc), key_id(key.public_key()), b"")
    return Anchor(audit_seq, audit_hash, unsigned.anchored_at, unsigned.key_id, key.sign(unsigned.message()))


# --- Keys: PEM files; the private one 0600 from its first byte --------------------------------------

def public_key_path(key_file: Path) -> Path:
    return key_file.with_name(key_file.name.removesuffix(".pem") + ".pub.pem")


def create_key(key_file: Path) -> bool:
    """Makes the key pair unless the private key exists; True if made. Never overwrites a key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=key_file.parent, prefix=".anchor-", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        try:
            os.link(temporary, key_file)  # fails if the file appeared meanwhile
        except FileExistsError:
            return False
    finally:
        os.unlink(temporary)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public_key_path(key_file).write_bytes(public)
    return True


def load_signing_key(key_file: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except FileNotFoundError:
        raise StartupRefused(f"no anchor key at {key_file}"
                             " (run `mpesa-pipeline audit anchor-key` to make one)") from None
    except ValueError:
        raise StartupRefused(f"{key_file} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise StartupRefused(f"{key_file} is not an Ed25519 key")
    return key


def load_public_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM file (keep an old key there while its anchors matter)."""
    keys = {}
    for block in path.read_text().split("-----END PUBLIC KEY-----")[:-1]:
        key = serialization.load_pem_public_key((block.strip() + "\n-----END PUBLIC KEY-----\n").encode())
        if isinstance(key, Ed25519PublicKey):
            keys[key_id(key)] = key
    return keys


# --- Anchoring and verifying ---------------------------------------------------------------------

_ANCHOR_COLUMNS = "audit_seq, audit_hash, anchored_at, key_id, signature"


def _anchor(row: tuple[Any, ...]) -> Anchor:
    return Anchor(row[0], row[1], row[2], row[3], bytes(row[4]))


async def anchor_head(conn: AsyncConnection, key: Ed25519PrivateKey) -> Anchor | None:
    """Signs the chain's head after checking the rows since this key's newest anchor; None when the
    head has not moved. Call inside a REPEATABLE READ transaction: the rows checked and the head
    signed are one snapshot. Raises ChainBroken instead of anchoring a broken chain."""
    own = key_id(key.public_key())
    row = await (await conn.execute(f"SELECT {_ANCHOR_COLUMNS} FROM audit_anchors WHERE key_id = %s"
                                    " ORDER BY audit_seq DESC, id DESC LIMIT 1", (own,))).fetchone()
    last = _anchor(row) if row else None
    head = await (await conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")).fetchone()
    if last is not None:
        if not last.verifies(key.public_key()):
            raise ChainBroken(f"the newest anchor (row {last.audit_seq}) does not verify: forged")
        anchored = await (await conn.execute("SELECT hash FROM audit_log WHERE seq = %s",
                                             (last.audit_seq,))).fetchone()
        if anchored is None or anchored[0] != last.audit_hash:
            raise ChainBroken(f"row {last.audit_seq} no longer has the hash anchored at {last.anchored_at}")
        if head is None:
            raise ChainBroken(f"the audit trail is empty, though row {last.audit_seq} was anchored")
        if head[0] == last.audit_seq:
            return None
    elif head is None:
        return None
    # verify_audit trusts the row before from_seq: the anchored row just checked, or the genesis.
    _, problem = await verify_audit(conn, 1 if last is None else last.audit_seq + 1)
    if problem:
        raise ChainBroken(problem)
    anchor = sign(key, head[0], head[1], datetime.now(timezone.utc))
    await conn.execute(f"INSERT INTO audit_anchors ({_ANCHOR_COLUMNS}) VALUES (%s, %s, %s, %s, %s)",
                       (anchor.audit_seq, anchor.audit_hash, anchor.anchored_at, anchor.key_id, anchor.signature))
    return anchor


async def verify_anchors(conn: AsyncConnection, public_keys: dict[str, Ed25519PublicKey]) -> AnchorReport:
    """Checks every anchor: signed by a known key, and its row still has the anchored hash. With the
    chain verified (store.verify_audit), every row up to the newest anchor is then as anchored."""
    checked, newest = 0, None
    async with conn.cursor("verify_anchors") as cur:
        cur.itersize = 5000
        await cur.execute("SELECT a.audit_seq, a.audit_hash, a.anchored_at, a.key_id, a.signature, l.hash"
                          " FROM audit_anchors a LEFT JOIN audit_log l ON l.seq = a.audit_seq"
                          " ORDER BY a.audit_seq, a.id")
        async for row in cur:
            anchor, now_hash = _anchor(row), row[5]
            key = public_keys.get(anchor.key_id)
            if key is None:
                return AnchorReport(checked, newest, f"the anchor of row {anchor.audit_seq} is signed by key "
                                                     f"{anchor.key_id}, which is not among the public keys")
            if not anchor.verifies(key):
                return AnchorReport(checked, newest, f"the anchor of row {anchor.audit_seq} does not verify: forged")
            if now_hash is None:
                return AnchorReport(checked, newest, f"row {anchor.audit_seq}, anchored at {anchor.anchored_at}, "
                                                     "is missing: the trail was cut")
            if now_hash != anchor.audit_hash:
                return AnchorReport(checked, newest, f"row {anchor.audit_seq} no longer has the hash anchored at "
                                                     f"{anchor.anchored_at}: the trail was rewritten")
            checked, newest = checked + 1, anchor
    return AnchorReport(checked, newest, None)


class Anchorer:
    def __init__(self, pool: AsyncConnectionPool, key: Ed25519PrivateKey, interval_s: float):
        self.pool, self.key, self.interval_s = pool, key, interval_s

    async def run(self, stop: asyncio.Event) -> None:
        await every(self.interval_s, stop, self.anchor_once, "audit anchoring")

    async def anchor_once(self) -> Anchor | None:
        try:
            async with self.pool.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                anchor = await anchor_head(conn, self.key)
        except ChainBroken as exc:
            ANCHORS.labels("chain_broken").inc()
            log.error("audit chain does not verify, nothing anchored: %s", exc)
            return None
        CHECKED.set_to_current_time()
        if anchor is not None:
            ANCHORS.labels("anchored").inc()
            # The log is a copy of every anchor outside the database.
            log.info("anchored audit row %d hash %s at %s key %s signature %s", anchor.audit_seq,
                     anchor.audit_hash, anchor.anchored_at.isoformat(), anchor.key_id, anchor.signature.hex())
        return anchor


async def main(cfg: dict[str, Any], stop: asyncio.Event) -> None:
    key = load_signing_key(cfg["AUDIT_ANCHOR_KEY_FILE"])
    require_schema(cfg["DATABASE_URL"])
    pool = await open_pool(cfg["DATABASE_URL"], max_size=1)
    health = Health()
    health.add("database", DatabaseCheck(pool))
    runner = await serve_ops(health, cfg["METRICS_HOST"], cfg["AUDIT_ANCHOR_METRICS_PORT"])
    log.info("anchoring the audit chain every %.0f s with key %s", cfg["AUDIT_ANCHOR_INTERVAL_S"],
             key_id(key.public_key()))
    try:
        await Anchorer(pool, key, cfg["AUDIT_ANCHOR_INTERVAL_S"]).run(stop)
    finally:
        await runner.cleanup()
        await pool.close()


if __name__ == "__main__":
    run_service("audit-anchor", SETTINGS, main, background=True)

"""The notifier's PostgreSQL adapter: endpoints, sealed secrets, deliveries and their leases, attempts.

A delivery row is the durable truth of a webhook (docs/webhooks.md §4); a process holds one in
memory only while its lease (`leased_by`, `leased_until`) says so, and every write of a result is
conditional on that lease, so a process that lost it (stalled past it, another took the row over)
cannot overwrite what the new holder wrote.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from services.channels.vault import SealedCredentials
from services.notifier.deliveries import Delivery, Endpoint, NewDelivery

ACTOR = "notifier"  # credential_audit.actor of what the notifier does on its own

# A failing run is continuous while no two failures are further apart than this: twice the longest
# back-off (an hour) and a little, so an endpoint whose only delivery is being retried stays in its run.
FAILURE_GAP_S = 2 * 3600.0 + 300.0

_DELIVERY = "id, webhook_id, endpoint_id, payment_id, occurred_at, body, attempts, created_at"


@dataclass(frozen=True)
class Enqueued:
    """A delivery just inserted, leased to this process, and the pending deliveries of the same
    (endpoint, payment) that came before it (by occurred_at, then id) and were already there."""
    delivery: Delivery
    earlier_ids: tuple[int, ...]


@dataclass(frozen=True)
class SealedSecret:
    version: int
    sealed: SealedCredentials
    expires_at: datetime | None


@dataclass(frozen=True)
class AttemptRecord:
    delivery_id: int
    at: datetime
    http_status: int | None
    latency_ms: float
    error: str | None
    outcome: str


@dataclass(frozen=True)
class Finished:
    """What an attempt (or a decision not to attempt) changes in a delivery row."""
    delivery_id: int
    state: str                        # 'pending' (retried), 'delivered' or 'parked'
    attempts: int
    next_attempt_at: datetime | None  # pending: when to try again
    at: datetime
    http_status: int | None
    error: str | None
    attempt: AttemptRecord | None     # None when nothing was sent (the secret could not be opened)


@dataclass(frozen=True)
class EndpointHealth:
    """An endpoint's attempts in one write, in order: `reset` if one succeeded (its failing run
    ended), `failing_since` the first failure after the last success (None: the last one succeeded),
    `last_failure` the last of those failures."""
    endpoint_id: str
    reset: bool
    failing_since: datetime | None
    last_failure: datetime | None = None


class NotifierStore:
    def __init__(self, pool: AsyncConnectionPool, owner: str):
        self.pool = pool
        self.owner = owner

    async def endpoints_of(self, channel_ids: Sequence[str]) -> dict[str, list[Endpoint]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT endpoint_id, channel_id, url, event_types, created_at FROM webhook_endpoints"
                " WHERE channel_id = ANY(%s) AND status = 'enabled'", (list(channel_ids),))
            rows = await cur.fetchall()
        found: dict[str, list[Endpoint]] = {c: [] for c in channel_ids}
        for endpoint_id, channel_id, url, event_types, created_at in rows:
            found[channel_id].append(Endpoint(endpoint_id, channel_id, url, frozenset(event_types),
                                              created_at=created_at))
        return found

    async def endpoints_by_id(self, endpoint_ids: Sequence[str]) -> dict[str, Endpoint]:
        """Every one of them that exists, enabled or not."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT endpoint_id, channel_id, url, event_types, status FROM webhook_endpoints"
                " WHERE endpoint_id = ANY(%s)", (list(endpoint_ids),))
            rows = await cur.fetchall()
        return {r[0]: Endpoint(r[0], r[1], r[2], frozenset(r[3]), r[4] == "enabled") for r in rows}

    async def enqueue(self, new: Sequence[NewDelivery], lease_s: float) -> list[Enqueued]:
        """Inserts the deliveries leased to this process in one statement; those already there (a
        redelivered event) are skipped, except a pending one this process leased and may not hold:
        its batch committed, but the commit's answer was lost and the batch is handled again. It is
        returned too (its lease renewed) instead of waiting for its lease to run out; the dispatcher
        ignores what it holds already. The earlier pending rows are read by a second statement, in a
        snapshot taken after the insert: an insert that waited for another transaction's row of the
        same event (a batch handled again after a rebalance, its first handler still inserting) must
        see that row among them, or the later delivery would go while the other process sends the
        earlier one. Rows this call returns never count among them (they are handed over together)."""
        new = list({(n.event_id, n.endpoint_id): n for n in new}.values())  # one row is written once a statement
        if not new:
            return []
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "INSERT INTO webhook_deliveries (webhook_id, event_id, endpoint_id, channel_id, payment_id,"
                "  event_type, occurred_at, body, leased_by, leased_until)"
                " SELECT w, e, ep, c, p, t, o, b, %s, now() + make_interval(secs => %s)"
                " FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],"
                "  %b::timestamptz[], %b::text[]) AS n(w, e, ep, c, p, t, o, b)"
                # The endpoints come from a cache seconds old: one deleted since gets nothing (deleting
                # cancelled its pending deliveries; a new one would be sent, or stay pending for ever).
                " WHERE EXISTS (SELECT FROM webhook_endpoints x WHERE x.endpoint_id = n.ep AND x.status <> 'deleted')"
                " ORDER BY o, e"
                " ON CONFLICT (event_id, endpoint_id) DO UPDATE SET leased_until = EXCLUDED.leased_until"
                " WHERE webhook_deliveries.leased_by = EXCLUDED.leased_by AND webhook_deliveries.state = 'pending'"
                f" RETURNING {_DELIVERY}",
                (self.owner, lease_s, [n.webhook_id for n in new], [n.event_id for n in new],
                 [n.endpoint_id for n in new], [n.channel_id for n in new], [n.payment_id for n in new],
                 [n.event_type for n in new], [n.occurred_at for n in new], [n.body for n in new]))
            added = [_delivery(row) for row in await cur.fetchall()]
            if not added:
                return []
            ids = [d.id for d in added]
            cur = await conn.execute(
                "SELECT a.id, ARRAY(SELECT d.id FROM webhook_deliveries d WHERE d.endpoint_id = a.endpoint_id"
                "  AND d.payment_id = a.payment_id AND d.state = 'pending'"
                "  AND (d.occurred_at, d.id) < (a.occurred_at, a.id) AND d.id <> ALL(%s))"
                " FROM webhook_deliveries a WHERE a.id = ANY(%s)", (ids, ids))
            earlier = {row[0]: tuple(row[1]) for row in await cur.fetchall()}
        return [Enqueued(d, earlier[d.id]) for d in added]

    async def claim_due(self, lease_s: float, limit: int, per_endpoint: int, excluded_endpoints: Sequence[str]
                        ) -> list[Delivery]:
        """Due deliveries of enabled endpoints that nobody holds, each the earliest pending one of its
        (endpoint, payment), leased to this process; the most overdue first, and at most `per_endpoint`
        from one endpoint, so that one endpoint's backlog does not hold up the others' retries. Rows
        another poller is claiming are skipped (SKIP LOCKED)."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "WITH due AS ("
                " SELECT c.id FROM webhook_endpoints e CROSS JOIN LATERAL ("
                "  SELECT d.id, d.next_attempt_at FROM webhook_deliveries d"
                "  WHERE d.endpoint_id = e.endpoint_id AND d.state = 'pending' AND d.next_attempt_at <= now()"
                "   AND (d.leased_until IS NULL OR d.leased_until < now())"
                "   AND NOT EXISTS (SELECT FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id"
                "    AND p.payment_id = d.payment_id AND p.state = 'pending'"
                "    AND (p.occurred_at, p.id) < (d.occurred_at, d.id))"
                "  ORDER BY d.next_attempt_at LIMIT %s FOR UPDATE OF d SKIP LOCKED) c"
                " WHERE e.status = 'enabled' AND e.endpoint_id <> ALL(%s)"
                " ORDER BY c.next_attempt_at LIMIT %s)"
                " UPDATE webhook_deliveries w SET leased_by = %s, leased_until = now() + make_interval(secs => %s)"
                f" FROM due WHERE w.id = due.id RETURNING {', '.join('w.' + c.strip() for c in _DELIVERY.split(','))}",
                (per_endpoint, list(excluded_endpoints), limit, self.owner, lease_s))
            return [_delivery(row) for row in await cur.fetchall()]

    async def renew(self, delivery_ids: Sequence[int], lease_s: float) -> set[int]:
        """Extends the leases of the deliveries held in memory; returns the ids still this process's."""
        if not delivery_ids:
            return set()
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE webhook_deliveries SET leased_until = now() + make_interval(secs => %s)"
                " WHERE id = ANY(%s) AND leased_by = %s AND state = 'pending' RETURNING id",
                (lease_s, list(delivery_ids), self.owner))
            return {row[0] for row in await cur.fetchall()}

    async def write(self, finished: Sequence[Finished], released: Sequence[int], health: Sequence[EndpointHealth],
                    retry_window_s: float, failure_gap_s: float = FAILURE_GAP_S) -> list[tuple[str, str]]:
        """Results, released leases and endpoint health in one transaction; returns the endpoints
        this disabled (endpoint_id, channel_id) because they failed for the whole retry window (a
        failing run restarts after `failure_gap_s` without a failure)."""
        async with self.pool.connection() as conn, conn.transaction():
            if finished:
                await _write_finished(conn, finished, self.owner)
            if released:
                # A released delivery cannot go before the earlier pending ones of its payment (the head
                # just written back with its next attempt, above): due no sooner than the latest of them,
                # it stays out of the poller's scan of due rows while it waits (a receiver down for days
                # would otherwise leave every payment's later delivery due, blocked, and walked through
                # at every poll, holding up every other endpoint's claim).
                await conn.execute(
                    "UPDATE webhook_deliveries d SET leased_by = NULL, leased_until = NULL,"
                    " next_attempt_at = GREATEST(d.next_attempt_at, (SELECT max(p.next_attempt_at)"
                    "  FROM webhook_deliveries p WHERE p.endpoint_id = d.endpoint_id AND p.payment_id = d.payment_id"
                    "  AND p.state = 'pending' AND (p.occurred_at, p.id) < (d.occurred_at, d.id)))"
                    " WHERE d.id = ANY(%s) AND d.leased_by = %s", (list(released), self.owner))
            return await _write_health(conn, health, retry_window_s, failure_gap_s) if health else []

    async def secrets_of(self, endpoint_id: str) -> tuple[list[SealedSecret], datetime]:
        """Every version, newest first, and the database's time: a rotation writes the overlap's end
        in database time, so that is the clock to compare it with."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT version, key_id, wrapped_key, nonce, ciphertext, expires_at, now() FROM webhook_secrets"
                " WHERE endpoint_id = %s ORDER BY version DESC", (endpoint_id,))
            rows = await cur.fetchall()
        if not rows:
            return [], datetime.now(timezone.utc)  # no version: the time compares nothing
        return ([SealedSecret(r[0], SealedCredentials(r[1], bytes(r[2]), bytes(r[3]), bytes(r[4])), r[5])
                 for r in rows], rows[0][6])

    async def audit(self, action: str, endpoint_id: str, channel_id: str | None, detail: str) -> None:
        async with self.pool.connection() as conn:
            await _audit(conn, action, endpoint_id, channel_id, detail)

    async def sample(self) -> tuple[float, int]:
        """(age in seconds of the oldest pending delivery of an enabled endpoint, endpoints disabled)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(o.created_at)), 0)::float8"
                " FROM webhook_endpoints e CROSS JOIN LATERAL (SELECT min(d.created_at) AS created_at"
                "  FROM webhook_deliveries d WHERE d.endpoint_id = e.endpoint_id AND d.state = 'pending') o"
                " WHERE e.status = 'enabled'")
            oldest = (await cur.fetchone() or (0.0,))[0]
            cur = await conn.execute("SELECT count(*) FROM webhook_endpoints WHERE status = 'disabled'")
            disabled = (await cur.fetchone() or (0,))[0]
        return float(oldest), int(disabled)


def _delivery(row: Iterable[Any]) -> Delivery:
    return Delivery(*row)


async def _write_finished(conn: AsyncConnection, finished: Sequence[Finished], owner: str) -> None:
    await conn.execute(
        "UPDATE webhook_deliveries d SET state = u.state, attempts = u.attempts,"
        " next_attempt_at = COALESCE(u.next_at, d.next_attempt_at),"
        " finished_at = CASE WHEN u.state = 'pending' THEN NULL ELSE u.at END,"
        " last_http_status = u.http_status, last_error = u.error, leased_by = NULL, leased_until = NULL"
        " FROM unnest(%b::bigint[], %b::text[], %b::int[], %b::timestamptz[], %b::timestamptz[], %b::int[],"
        "  %b::text[]) AS u(id, state, attempts, next_at, at, http_status, error)"
        " WHERE d.id = u.id AND d.state = 'pending' AND d.leased_by = %s",
        ([f.delivery_id for f in finished], [f.state for f in finished], [f.attempts for f in finished],
         [f.next_attempt_at for f in finished], [f.at for f in finished], [f.http_status for f in finished],
         [_bounded(f.error) for f in finished], owner))
    retried = [f for f in finished if f.state == "pending" and f.next_attempt_at is not None]
    if retried:
        # The deliveries behind one to retry cannot go before it: due no sooner, they stay out of the
        # poller's scan of due rows at each of its retries (see `write`'s released).
        await conn.execute(
            "UPDATE webhook_deliveries f SET next_attempt_at = u.next_at"
            " FROM unnest(%b::bigint[], %b::timestamptz[]) AS u(id, next_at) JOIN webhook_deliveries h ON h.id = u.id"
            " WHERE h.state = 'pending' AND h.next_attempt_at = u.next_at"  # written just above, by this process
            "  AND f.endpoint_id = h.endpoint_id AND f.payment_id = h.payment_id AND f.state = 'pending'"
            "  AND (f.occurred_at, f.id) > (h.occurred_at, h.id) AND f.next_attempt_at < u.next_at",
            ([f.delivery_id for f in retried], [f.next_attempt_at for f in retried]))
    attempts = [f.attempt for f in finished if f.attempt is not None]
    if attempts:
        # Logged even where the row was taken over meanwhile: the attempt did happen.
        await conn.execute(
            "INSERT INTO webhook_attempts (delivery_id, at, http_status, latency_ms, error, outcome)"
            " SELECT * FROM unnest(%b::bigint[], %b::timestamptz[], %b::int[], %b::float8[], %b::text[], %b::text[])",
            ([a.delivery_id for a in attempts], [a.at for a in attempts], [a.http_status for a in attempts],
             [max(a.latency_ms, 0.0) for a in attempts], [_bounded(a.error) for a in attempts],
             [a.outcome for a in attempts]))


async def _write_health(conn: AsyncConnection, health: Sequence[EndpointHealth], retry_window_s: float,
                        failure_gap_s: float) -> list[tuple[str, str]]:
    # After a success in the batch the run of failures starts again (at its first failure since,
    # or none); with failures only, it goes on from when it began, unless the endpoint's previous
    # failure is over `failure_gap_s` older (a quiet spell is not failing: a new run begins). The time
    # of the latest failure is written when it moved by a minute; unchanged rows are not written.
    new_since = ("CASE WHEN u.reset THEN u.since WHEN e.failing_since IS NULL OR e.last_failed_at IS NULL"
                 " OR e.last_failed_at < u.since - make_interval(secs => %(gap)s) THEN u.since"
                 " ELSE e.failing_since END")
    new_last = ("CASE WHEN u.last IS NOT NULL AND (e.last_failed_at IS NULL"
                " OR u.last >= e.last_failed_at + interval '1 minute') THEN u.last ELSE e.last_failed_at END")
    await conn.execute(
        f"UPDATE webhook_endpoints e SET failing_since = {new_since}, last_failed_at = {new_last}"
        " FROM unnest(%(ids)b::text[], %(reset)b::bool[], %(since)b::timestamptz[], %(last)b::timestamptz[])"
        " AS u(id, reset, since, last)"
        f" WHERE e.endpoint_id = u.id AND (e.failing_since IS DISTINCT FROM ({new_since})"
        f"  OR e.last_failed_at IS DISTINCT FROM ({new_last}))",
        {"ids": [h.endpoint_id for h in health], "reset": [h.reset for h in health],
         "since": [h.failing_since for h in health], "last": [h.last_failure for h in health],
         "gap": failure_gap_s})
    failing = [h.endpoint_id for h in health if h.failing_since is not None]
    if not failing:
        return []
    reason = "failed every attempt for the whole retry window; disabled by the notifier"
    cur = await conn.execute(
        "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = %s, updated_at = now()"
        " WHERE endpoint_id = ANY(%s) AND status = 'enabled'"
        "  AND failing_since <= now() - make_interval(secs => %s) RETURNING endpoint_id, channel_id",
        (reason, failing, retry_window_s))
    disabled = [(r[0], r[1]) for r in await cur.fetchall()]
    for endpoint_id, channel_id in disabled:
        await _audit(conn, "webhook_endpoint_auto_disabled", endpoint_id, channel_id,
                     f"no attempt succeeded for {retry_window_s:.0f} s")
    return disabled


async def _audit(conn: AsyncConnection, action: str, endpoint_id: str, channel_id: str | None, detail: str) -> None:
    await conn.execute("INSERT INTO credential_audit (actor, action, channel_id, webhook_endpoint_id, detail)"
                       " VALUES (%s, %s, %s, %s, %s)", (ACTOR, action, channel_id, endpoint_id, detail))


def _bounded(error: str | None) -> str | None:
    return None if error is None else error[:500]  # last_error's and webhook_attempts.error's CHECK

"""The retention of payers' data: the cost of one full pass over 100,000 payments due.

Bulk-inserts N final payments (each with a raw callback body and an ingress record, as the pipeline
leaves them) in a fresh channel as the schema's owner, then times one `Retention.run_once` as the
privacy role, in chunks of PRIVACY_RETENTION_CHUNK. Prints the time with and without the pauses between
chunks, and the machine's load (bench/host.py). Then removes what it inserted.

    export DATABASE_URL=postgresql://mpesa@127.0.0.1:$PGPORT/mpesa PGPASSFILE=$PWD/.local/secrets/pgpass
    .venv/bin/python -m bench.privacy_retention_bench --payments 100000
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

from psycopg_pool import AsyncConnectionPool

from bench.host import HostLoad
from services.common.pseudonyms import Pseudonyms
from services.devstack import role_url
from services.privacy.retention import Retention

_PAYMENTS = """
INSERT INTO payments (payment_id, channel_id, state, amount, phone, account_reference, description, order_reference,
    metadata, checkout_request_id, mpesa_receipt, result_code, requested_at, final_at)
SELECT %(c)s || '-' || i, %(c)s, 'Settled', 100, '2547' || lpad((i %% 100000000)::text, 8, '0'), 'Jane Doe', 'for Jane',
    'order of 07' || lpad((i %% 100000000)::text, 8, '0'), '{"name": "Jane Doe"}', 'ws_CO_' || %(c)s || i,
    'B' || upper(substr(%(c)s, 7)) || i, '0', now() - interval '3 days', now() - interval '2 days'
FROM generate_series(1, %(n)s) AS i
"""
_BODIES = """
INSERT INTO callback_bodies (event_id, payment_id, received_at, verdict, body)
SELECT gen_random_uuid(), %(c)s || '-' || i, now() - interval '2 days', 'applied', repeat('x', 700)
FROM generate_series(1, %(n)s) AS i
"""
_INGRESS = """
INSERT INTO ingress_requests (channel_id, idempotency_key, body_sha256, payment_id, event_id, occurred_at, api_key_id,
    amount, account_reference, order_reference)
SELECT %(c)s, 'k' || i, sha256(i::text::bytea), %(c)s || '-' || i, gen_random_uuid(), now(), 'key', 100, 'Jane Doe',
    'order'
FROM generate_series(1, %(n)s) AS i
"""


async def main(payments: int, chunk: int, pause_s: float) -> None:
    owner_url = os.environ["DATABASE_URL"]
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    async with AsyncConnectionPool(owner_url, min_size=1, max_size=1, open=False) as owner:
        async with owner.connection() as conn:
            await conn.execute("INSERT INTO channels (channel_id, display_name, shortcode_type, business_shortcode,"
                               " environment, payer_data_retention_days) VALUES (%s, 'Bench', 'paybill', '174379',"
                               " 'sandbox', 1)", (channel,))
            for sql in (_PAYMENTS, _BODIES, _INGRESS):
                await conn.execute(sql, {"c": channel, "n": payments})
            await conn.execute("ANALYZE payments; ANALYZE callback_bodies; ANALYZE ingress_requests")
        try:
            async with AsyncConnectionPool(role_url(owner_url, "privacy"), min_size=1, max_size=2, open=False) as pool:
                job = Retention(pool, Pseudonyms(os.urandom(32)), 90, chunk=chunk, pause_s=pause_s)
                load = HostLoad()
                started = time.perf_counter()
                report = await job.run_once()
                elapsed = time.perf_counter() - started
            pauses = pause_s * (report.payments // chunk)
            print(f"{report.payments} payments pseudonymised ({report.callback_bodies} callback bodies,"
                  f" {report.ingress_requests} ingress records) in {elapsed:.1f} s, {elapsed - pauses:.1f} s without"
                  f" the {pauses:.0f} s of pauses; chunk {chunk}; {load.describe()}")
        finally:
            async with owner.connection() as conn:
                for table in ("callback_bodies", "ingress_requests", "payments"):
                    await conn.execute(f"DELETE FROM {table} WHERE payment_id LIKE %s", (f"{channel}-%",))
                await conn.execute("DELETE FROM channels WHERE channel_id = %s", (channel,))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--pause-s", type=float, default=0.2)
    args = parser.parse_args()
    asyncio.run(main(args.payments, args.chunk, args.pause_s))

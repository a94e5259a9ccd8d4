"""Cost of erasing payers' data (a benchmark, not a test): seeds --payments payments over --payers payers
(each with one raw callback, as a settled payment has) as the schema's owner, then erases --erase
payers one request at a time through services/privacy/payers.py as the privacy role, as the `payers
erase` command does. Reports milliseconds per payment erased and per 100,000, with the host's load.

    .venv/bin/python bench/erasure_bench.py [--payments 100000] [--payers 10000] [--erase 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from psycopg_pool import AsyncConnectionPool  # noqa: E402

from bench.host import HostLoad  # noqa: E402
from services.common import pseudonyms  # noqa: E402
from services.common.pseudonyms import Pseudonyms  # noqa: E402
from services.devstack import role_url  # noqa: E402
from services.privacy.payers import PayerRequest, Payers  # noqa: E402

DB = os.environ.get("DATABASE_URL", "postgresql://mpesa@127.0.0.1:5433/mpesa")  # password: PGPASSFILE
KEY_FILE = Path(os.environ.get("PSEUDONYM_KEY_FILE", ROOT / ".local" / "secrets" / "pseudonym.key"))


async def seed(owner: AsyncConnectionPool, payments: int, payers: int, run: str) -> list[str]:
    base = secrets.randbelow(10 ** 7)
    phones = [f"2541{(base + i) % 10 ** 8:08d}" for i in range(payers)]
    async with owner.connection() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO payments (payment_id, channel_id, state, amount, phone, account_reference, order_reference,"
            " metadata, checkout_request_id, mpesa_receipt, result_code, requested_at)"
            " SELECT %(run)s || '-' || i, 'bench-erase', 'Settled', 100 + i %% 900,"
            " (%(phones)s::text[])[1 + i %% %(n)s], 'INV' || i %% 1000, 'ord-' || i, '{\"k\": \"v\"}',"
            " %(run)s || '-ck-' || i, upper(%(run)s) || i, '0', now()"
            " FROM generate_series(0, %(payments)s - 1) AS i",
            {"run": run, "phones": phones, "n": payers, "payments": payments})
        await conn.execute(
            "INSERT INTO callback_bodies (event_id, payment_id, received_at, verdict, body)"
            " SELECT gen_random_uuid(), payment_id, now(), 'applied',"
            " '{\"Body\":{\"stkCallback\":{\"CallbackMetadata\":{\"Item\":"
            "[{\"Name\":\"PhoneNumber\",\"Value\":' || phone || '}]}}}}'"
            " FROM payments WHERE channel_id = 'bench-erase' AND payment_id LIKE %s", (run + "-%",))
        await conn.execute("ANALYZE payments")
    return phones


async def main(args: argparse.Namespace) -> None:
    pseudonyms.create_key(KEY_FILE)
    run = "be" + secrets.token_hex(4)
    async with AsyncConnectionPool(DB, min_size=1, max_size=1, open=False) as owner:
        started = time.perf_counter()
        phones = await seed(owner, args.payments, args.payers, run)
        seconds = time.perf_counter() - started
    print(f"seeded {args.payments} payments over {args.payers} payers in {seconds:.1f} s")
    async with AsyncConnectionPool(role_url(DB, "privacy"), min_size=1, max_size=1, open=False) as pool:
        payers = Payers(pool, Pseudonyms.from_file(KEY_FILE))
        host, erased = HostLoad(), 0
        started = time.perf_counter()
        for phone in phones[:args.erase]:
            answer = await payers.erase(PayerRequest("erase", phone, None, "bench", "benchmark"), "bench via cli")
            erased += answer["erased"]["payments"]
        elapsed = time.perf_counter() - started
    print(f"erased {args.erase} payers ({erased} payments, {erased} raw callbacks) in {elapsed:.1f} s: "
          f"{1000 * elapsed / erased:.2f} ms per payment, {elapsed / erased * 100_000:.0f} s per 100,000 payments; "
          f"{host.describe()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=100_000)
    parser.add_argument("--payers", type=int, default=10_000)
    parser.add_argument("--erase", type=int, default=1_000)
    asyncio.run(main(parser.parse_args()))

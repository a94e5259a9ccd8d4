"""Cost of reading a channel's credentials (a benchmark, not a test).

  decryption      one unseal: HPKE unwrap of the data key (X25519) + AES-256-GCM open, in memory
  cold get        CredentialStore.get with an empty cache: channel query, row read, decryption and
                  the audit insert, against the real PostgreSQL (what a worker pays once per version)
  refresh get     after the TTL: the channel query only, no decryption
  cached get      CredentialStore.get within the TTL: what every payment pays

Writes one bench channel and one audit row per cold get to DATABASE_URL.

    .venv/bin/python bench/vault_bench.py [--iterations 20000] [--cold 50]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.host import HostLoad  # noqa: E402
from services.channels.credentials import CredentialStore  # noqa: E402
from services.channels.onboarding import Onboarding  # noqa: E402
from services.channels.vault import LocalKeyFileProvider, public_key_path, seal, unseal  # noqa: E402
from services.common.db import migrate, open_pool  # noqa: E402
from services.daraja.models import AppCredentials  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://mpesa@127.0.0.1:5433/mpesa"  # password: PGPASSFILE


class SteppingClock:
    """Lets the benchmark expire the store's TTL without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def per_call_us(function, iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        function()
    return (time.perf_counter() - started) / iterations * 1e6


async def per_await_us(function, iterations: int) -> list[float]:
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        await function()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def in_memory(provider: LocalKeyFileProvider, app: AppCredentials, iterations: int) -> None:
    sealed = seal(app, "bench", 1, provider)
    seal_us = per_call_us(lambda: seal(app, "bench", 1, provider), iterations)
    unseal_us = per_call_us(lambda: unseal(sealed, "bench", 1, provider), iterations)
    print(f"seal (new data key, AES-GCM, HPKE wrap):   {seal_us:8.1f} µs")
    print(f"decryption (HPKE unwrap + AES-GCM open):   {unseal_us:8.1f} µs")


async def with_database(database_url: str, provider: LocalKeyFileProvider, key_file: Path, app: AppCredentials,
                        iterations: int, cold: int) -> None:
    migrate(database_url)
    pool = await open_pool(database_url, max_size=2)
    try:
        channel_id = f"bench-{secrets.token_hex(5)}"
        onboarding = Onboarding(pool, public_key_file=public_key_path(key_file))
        await onboarding.create_channel({"channelId": channel_id, "displayName": "Bench", "shortcodeType": "paybill",
                                         "businessShortcode": "174379", "environment": "sandbox"}, "bench")
        await onboarding.set_credentials(channel_id, {"consumerKey": app.consumer_key,
                                                      "consumerSecret": app.consumer_secret,
                                                      "passkey": app.passkey}, "bench")
        cold_us = await per_await_us(lambda: CredentialStore(pool, provider, actor="bench").get(channel_id), cold)
        print(f"cold get (query + decrypt + audit), median: {statistics.median(cold_us):8.1f} µs  (n={cold})")
        clock = SteppingClock()
        store = CredentialStore(pool, provider, actor="bench", ttl_s=30, clock=clock)
        await store.get(channel_id)

        async def refresh():
            clock.now += 31
            await store.get(channel_id)
        refresh_us = await per_await_us(refresh, cold)
        print(f"refresh get (channel query only), median:  {statistics.median(refresh_us):8.1f} µs  (n={cold})")
        cached_us = await per_await_us(lambda: store.get(channel_id), iterations)
        print(f"cached get, median:                        {statistics.median(cached_us):8.2f} µs  "
              f"(n={iterations}, decryptions by this store: {store.decryptions})")
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--cold", type=int, default=50, help="cold gets (each writes one audit row)")
    args = parser.parse_args()
    host = HostLoad()
    app = AppCredentials("ck" + secrets.token_hex(12), "cs" + secrets.token_hex(12), secrets.token_hex(32))
    with tempfile.TemporaryDirectory() as directory:
        key_file = Path(directory) / "kek.json"
        provider = LocalKeyFileProvider.open(key_file, create=True)
        in_memory(provider, app, args.iterations)
        asyncio.run(with_database(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL), provider, key_file, app,
                                  args.iterations, args.cold))
    print(host.describe())


if __name__ == "__main__":
    main()

"""Building the notifier from its settings; `python -m services.notifier` and the tests share it.

Every dependency is a keyword argument; what is not given is built here for production.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg_pool import AsyncConnectionPool

from services.channels.vault import KeyProvider, LocalKeyFileProvider
from services.common.ids import new_id
from services.notifier.destinations import DestinationPolicy
from services.notifier.dispatcher import Dispatcher, Sender, SigningSecrets, utc_now
from services.notifier.poller import Poller
from services.notifier.schedule import RetryPolicy
from services.notifier.sender import Sender as HttpSender
from services.notifier.service import EndpointCache, Enqueuer
from services.notifier.settings import NotifierConfig
from services.notifier.signing import CachedSigningSecrets
from services.notifier.store import NotifierStore
from services.notifier.writer import ResultWriter


@dataclass(frozen=True)
class Notifier:
    instance_id: str            # leased_by of the deliveries this process holds
    store: NotifierStore
    enqueuer: Enqueuer          # entry point 1: the consumer loop's batches
    poller: Poller              # entry point 2: the timers
    dispatcher: Dispatcher
    writer: ResultWriter
    sender: Sender
    drain_timeout_s: float

    async def run(self, stop: asyncio.Event) -> None:
        """The timers and the writer, until `stop`. The consumer loop runs beside it (it feeds the
        enqueuer); once both returned, `close` ends what is in hand."""
        await asyncio.gather(self.poller.run(stop), self.poller.beat(stop), self.writer.run(stop))

    async def close(self) -> None:
        """After the consumer and the timers stopped (nothing is handed over any more): the attempts in
        flight finish, what is still held is released for another process, every result is written."""
        await self.dispatcher.drain(self.drain_timeout_s)
        await self.writer.flush_until_written(stopping=True)


def build(pool: AsyncConnectionPool, cfg: NotifierConfig, *, sender: Sender | None = None,
          secrets: SigningSecrets | None = None, key_provider: KeyProvider | None = None,
          clock: Callable[[], datetime] = utc_now, instance_id: str | None = None) -> Notifier:
    instance_id = instance_id or f"notifier-{new_id()}"
    store = NotifierStore(pool, instance_id)
    if sender is None:
        sender = HttpSender(DestinationPolicy(cfg.webhook_allowed_networks),
                            connect_timeout_s=cfg.notifier_connect_timeout_s,
                            read_timeout_s=cfg.notifier_read_timeout_s)
    if secrets is None:
        provider = key_provider or LocalKeyFileProvider.open(cfg.notifier_vault_key_file)
        secrets = CachedSigningSecrets(store, provider, cfg.notifier_secret_cache_ttl_s)
    policy = RetryPolicy(window=timedelta(seconds=cfg.notifier_retry_window_s),
                         first_backoff_s=cfg.notifier_first_backoff_s, max_backoff_s=cfg.notifier_max_backoff_s)
    # A failing run goes on while failures come at least every two longest back-offs (store.FAILURE_GAP_S).
    writer = ResultWriter(store, cfg.notifier_retry_window_s, failure_gap_s=2 * cfg.notifier_max_backoff_s + 300)
    dispatcher = Dispatcher(sender, secrets, writer, policy, concurrency=cfg.notifier_endpoint_concurrency,
                            queue_max=cfg.notifier_endpoint_queue_max, clock=clock)
    poller = Poller(store, dispatcher, interval_s=cfg.notifier_poll_interval_s, batch=cfg.notifier_poll_batch,
                    lease_s=cfg.notifier_lease_s)
    enqueuer = Enqueuer(store, EndpointCache(store, cfg.notifier_endpoint_cache_ttl_s), dispatcher,
                        cfg.notifier_lease_s)
    drain_timeout_s = cfg.notifier_connect_timeout_s + cfg.notifier_read_timeout_s + 1
    return Notifier(instance_id, store, enqueuer, poller, dispatcher, writer, sender, drain_timeout_s)

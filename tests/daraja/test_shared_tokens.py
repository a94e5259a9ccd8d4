"""Daraja's tokens shared by several STK worker processes (services/stk_worker/tokens.py) against the
sandbox, which, as Daraja does, invalidates an app's token whenever it issues a newer one: two clients
(two workers) pushing side by side mint one token between them, a refused token is replaced once for
both, the token is stored sealed, and without the store a worker still gets a token of its own."""
from __future__ import annotations

import asyncio

import pytest

from services.channels.vault import LocalKeyFileProvider
from services.daraja.client import DarajaClient, DarajaTimeouts
from services.stk_worker.tokens import SharedTokens, app_ref
from tests.daraja.conftest import push_request
from tests.daraja.test_client_contract import tokens_issued

TIMEOUTS = DarajaTimeouts(connect_s=2, read_s=5, write_s=2, pool_s=2)


@pytest.fixture
async def workers(sandbox, pool, app_credentials, tmp_path):
    """Two clients sharing the token store, as two worker processes do, over a store emptied of this app."""
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM daraja_tokens WHERE app = %s", (app_ref(app_credentials),))
    vault = LocalKeyFileProvider.open(tmp_path / "kek.json", create=True)
    clients = [DarajaClient(sandbox.base_url, timeouts=TIMEOUTS, shared_tokens=SharedTokens(pool, vault))
               for _ in range(2)]
    yield clients
    for client in clients:
        await client.aclose()


async def _push_from_both(clients, app, paybill, receiver, reference: str, each: int = 10) -> None:
    url = receiver.new_url()
    await asyncio.gather(*(client.push(app, paybill, push_request(url, reference=reference))
                           for _ in range(each) for client in clients))


async def test_two_workers_pushing_side_by_side_mint_one_token(workers, sandbox, receiver, app_credentials,
                                                               paybill):
    before = tokens_issued(sandbox)
    for round_ in range(3):  # each worker in turn: alone, each would invalidate the other's token
        await _push_from_both(workers, app_credentials, paybill, receiver, f"BOTH{round_}")
    assert tokens_issued(sandbox) == before + 1
    assert sandbox.all_pushes(status="rejected") == []
    assert len(sandbox.accepted_pushes()) == 60


async def test_a_token_refused_is_replaced_once_for_every_worker(workers, sandbox, receiver, app_credentials,
                                                                 paybill):
    await _push_from_both(workers, app_credentials, paybill, receiver, "FIRST", each=1)
    outsider = DarajaClient(sandbox.base_url, timeouts=TIMEOUTS)  # onboarding's --validate, say: not shared
    await outsider.fetch_token(app_credentials)
    await outsider.aclose()
    before = tokens_issued(sandbox)
    await _push_from_both(workers, app_credentials, paybill, receiver, "AFTER")
    assert tokens_issued(sandbox) == before + 1  # both refused, one of them minted, the other took it
    assert {p["errorCode"] for p in sandbox.all_pushes(status="rejected")} == {"404.001.03"}
    assert len(sandbox.accepted_pushes(AccountReference="AFTER")) == 20


async def test_the_stored_token_is_sealed(workers, sandbox, receiver, app_credentials, paybill, pool):
    await _push_from_both(workers, app_credentials, paybill, receiver, "SEALED", each=1)
    token = sandbox.state.apps[app_credentials.consumer_key].token
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT app, ciphertext, wrapped_key FROM daraja_tokens WHERE app = %s",
                                        (app_ref(app_credentials),))).fetchone()
    assert token and row is not None
    assert token.encode() not in bytes(row[1]) + bytes(row[2])
    assert app_credentials.consumer_key not in row[0] and app_credentials.consumer_secret not in row[0]


async def test_without_the_store_a_worker_mints_its_own(sandbox, receiver, app_credentials, paybill, database_url,
                                                        tmp_path):
    from services.common.db import open_pool
    away = await open_pool(database_url, max_size=1)
    await away.close()  # every connection refused, as with PostgreSQL down
    client = DarajaClient(sandbox.base_url, timeouts=TIMEOUTS, shared_tokens=SharedTokens(
        away, LocalKeyFileProvider.open(tmp_path / "kek.json", create=True)))
    try:
        accepted = await client.push(app_credentials, paybill, push_request(receiver.new_url()))
    finally:
        await client.aclose()
    assert accepted.checkout_request_id


async def test_short_lived_tokens_are_shared_too(workers, sandbox, receiver, app_credentials, paybill):
    """A token living less than twice the refresh margin (300 s) is refreshed half-way through its life,
    as the client does with its own: shared until then, not minted anew by each worker."""
    sandbox.state.update_settings({"token_ttl_s": 120})  # reset() for the next test brings 3599 back
    before = tokens_issued(sandbox)
    for round_ in range(3):
        await _push_from_both(workers, app_credentials, paybill, receiver, f"SHORT{round_}", each=3)
    assert tokens_issued(sandbox) == before + 1
    assert sandbox.all_pushes(status="rejected") == []

"""The STK worker: pushes each payment request to Daraja at most once and answers the ledger's STK
queries; a push whose outcome is unknown is reconciled by callback and STK query, never pushed
again (docs/stk-worker.md).

Shape: `worker.py` holds the Pusher and Querier, which depend only on the ports in `ports.py`
(Claims, Daraja, Channels, Publisher, Clock). The adapters are `claims.PostgresClaims` (the durable
claim and the process heartbeat), `services.daraja.client.DarajaClient`, `channels.VaultChannels`
and the Kafka `EventProducer`; `throttle.py` paces calls per shortcode and `errors.py` classifies
failures by what the consumer loop should do. `bootstrap.build` wires them from `WorkerSettings`;
`__main__` and the tests (with the fakes of tests/stk_worker/fakes.py) both use it.
"""

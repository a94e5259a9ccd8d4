"""The notifier: delivers each payment's status changes to its channel's webhook endpoints, signed
as the Standard Webhooks specification describes (docs/webhooks.md).

Shape:
- `events.py`: pure. Which status event becomes which webhook event type, and the JSON body.
- `destinations.py`: pure apart from DNS. Which URLs and addresses a delivery may go to (SSRF).
- `secrets.py`: signing secrets: made here, sealed by the vault to the notifier's key, opened
  only by the notifier.
- `settings.py`: the notifier's and the endpoint management's configuration.

The process (`python -m services.notifier`, docs/webhooks.md §4):
- `deliveries.py`: pure. Which status events become which deliveries; hostile ones refused.
- `service.py`: the consumer's batches in, delivery rows written (leased to this process) in one
  transaction, then handed to the dispatcher.
- `dispatcher.py`: per endpoint a lane (bounded in flight and in memory), per payment a chain
  attempted in order; `sender.py` makes each attempt, `schedule.py` decides what follows it.
- `writer.py`: results written in batches, endpoint health, automatic disabling.
- `poller.py`: due retries and orphaned deliveries claimed, leases renewed, backlog gauges.
- `signing.py`: an endpoint's signing secrets, opened and kept briefly; `store.py`: PostgreSQL.
- `bootstrap.py`: builds it all for `__main__` and the tests.
"""

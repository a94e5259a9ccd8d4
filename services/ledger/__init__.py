"""The ledger: the one writer of payment state (docs/design.md, "Payment states").

Pure domain, no I/O (kept to `mypy --strict`):
  state_machine.py  every payment rule: `decide(payment, fact, owners)` returns a Decision whose
                    `Changes` (a frozen value, one field per column) say what it writes
  deadlines.py      when a payment is queried or reviewed next, from a decision and a given time
  record.py         a payment's row as a typed value; facts.py the ledger's own input
                    (`LedgerInput`) and the translation of consumed events into it
  callbacks.py, phones.py  Daraja's callback body and phone forms, parsed and compared
Ports: ports.py (the unit of work, the clock, as Protocols).
Application service: application.py `LedgerService`, entered two ways:
  service.py        the consumer's adapter: Kafka's ConsumedEvent becomes a LedgerInput at the edge
  reconciler.py     the timer: payments due get STK queries, or Review at their deadline
Adapters: postgres.py (the unit of work over store.py's SQL); relay.py publishes the outbox;
retention.py forgets old processed-event ids; anchors.py signs the audit chain's head.
Wiring: bootstrap.py `build` (what __main__ and tests share), settings.py, __main__.py.
"""

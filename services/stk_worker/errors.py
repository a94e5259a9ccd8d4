"""The worker's failures, classified by what its caller should do next (docs/stk-worker.md)."""
from __future__ import annotations

from services.common.kafka import PublishError, Transient
from services.stk_worker.claims import PushOutcome, database_unavailable


class Interrupted(Transient):
    """The worker is stopping and sent nothing for this payment: its claim was released (or never
    taken), so whoever consumes the event next pushes it. Transient: the event must not be committed."""


class OwnerBusy(Transient):
    """Another live worker holds this payment's claim and has not recorded its answer yet: the
    event is retried later, when that answer will be there to report."""


class AnswerNotRecorded(Transient):
    """Daraja answered but the answer could not be stored before the worker had to stop. The claim
    stays 'claimed' by this process; once its heartbeat stops it is reconciled as outcome unknown.
    Transient: the event must stay uncommitted (never dead-lettered), for the next owner to judge.
    `outcome` is the answer, still to be reported."""

    def __init__(self, payment_id: str, outcome: PushOutcome):
        super().__init__(payment_id)
        self.outcome = outcome


def is_transient(exc: Exception) -> bool:
    """For per_event: a failure of a dependency (retry the batch), not of the event (dead-letter)."""
    return isinstance(exc, (Transient, PublishError)) or database_unavailable(exc)

"""The push path and the querier through the worker's own bootstrap, with a scripted Daraja, an
in-memory claims store and a fake clock: no broker, database or simulator."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from services.channels.vault import VaultError
from services.common import config
from services.common.kafka import ConsumedEvent, PublishError, Transient
from services.common.topics import PAYMENT_REQUESTED, STK_PUSH_RESULT, STK_QUERY_REQUESTED, STK_QUERY_RESULT
from services.daraja.errors import ErrorKind
from services.daraja.models import QueryResult, QueryStatus
from services.stk_worker.bootstrap import SETTINGS, Worker, WorkerSettings, build
from services.stk_worker.claims import ClaimStatus
from services.stk_worker.errors import AnswerNotRecorded, Interrupted, OwnerBusy, is_transient
from services.stk_worker.throttle import ShortcodeThrottle
from services.stk_worker.worker import SPIKE_ARREST, OwnerWatch, PushSettings
from tests.platform.kafka_helpers import sample_request
from tests.stk_worker.fakes import (
    ClaimRow,
    FakeChannels,
    FakeClaims,
    FakeClock,
    RecordingPublisher,
    ScriptedDaraja,
    accepted,
    daraja_error,
)

WORKER_SETTINGS = config.load_into(WorkerSettings, SETTINGS, {"WEBHOOK_TOKEN_SECRETS": "s" * 32})
RETRYABLE, PERMANENT, UNKNOWN = ErrorKind.RETRYABLE, ErrorKind.PERMANENT, ErrorKind.OUTCOME_UNKNOWN


@dataclass
class Rig:
    """One worker built from fakes, and what it did."""
    daraja: ScriptedDaraja
    claims: FakeClaims = field(default_factory=FakeClaims)
    channels: FakeChannels = field(default_factory=FakeChannels)
    publisher: RecordingPublisher = field(default_factory=RecordingPublisher)
    clock: FakeClock = field(default_factory=FakeClock)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    worker: Worker | None = None

    async def start(self, rate_per_s: float = 1000.0, **push: Any) -> Rig:
        self.channels.add("shop")
        throttle = ShortcodeThrottle(rate_per_s, burst=max(int(rate_per_s), 1), clock=self.clock.monotonic)
        self.worker = await build(WORKER_SETTINGS, claims=self.claims, daraja=self.daraja, publisher=self.publisher,
                                  channels=self.channels, throttle=throttle, clock=self.clock, stop=self.stop,
                                  push_settings=PushSettings("https://gw.example", b"s" * 32, **push))
        return self

    async def push(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.worker is not None
        await self.worker.pusher.handle(ConsumedEvent(PAYMENT_REQUESTED.name, 0, 0, b"shop", "r", request))
        return self.results()[-1]

    def results(self) -> list[dict[str, Any]]:
        return self.publisher.records(STK_PUSH_RESULT)


def a_request(**changes: Any) -> dict[str, Any]:
    return {**sample_request("shop", str(uuid.uuid4())), **changes}


async def rig(*answers: Any, **push: Any) -> Rig:
    return await Rig(ScriptedDaraja(list(answers))).start(**push)


class TestPush:
    async def test_an_accepted_push_is_recorded_then_reported(self):
        r = await rig(accepted(1))
        request = a_request()
        result = await r.push(request)
        assert (result["outcome"], result["checkout_request_id"], result["attempts"]) == ("ACCEPTED", "ws_CO_1", 1)
        row = r.claims.rows[request["payment_id"]]
        assert row.status is ClaimStatus.ACCEPTED and row.outcome is not None
        assert row.outcome.checkout_request_id == "ws_CO_1"
        assert len(r.daraja.pushes) == 1

    async def test_a_retryable_answer_is_pushed_again_after_a_back_off(self):
        r = await rig(daraja_error(RETRYABLE, "500.001.1001"), accepted(2), backoff_s=1.0)
        result = await r.push(a_request())
        assert (result["outcome"], result["checkout_request_id"], result["attempts"]) == ("ACCEPTED", "ws_CO_2", 2)
        assert len(r.daraja.pushes) == 2
        assert 0.5 <= sum(r.clock.sleeps) <= 1.5  # one jittered back-off

    async def test_daraja_s_retry_after_is_the_back_off(self):
        r = await rig(daraja_error(RETRYABLE, "500.001.1001", retry_after_s=60.0), accepted(2))
        await r.push(a_request())
        assert r.clock.sleeps == [60.0]

    async def test_a_permanent_refusal_is_not_retried(self):
        r = await rig(daraja_error(PERMANENT, "400.002.02"))
        result = await r.push(a_request())
        assert (result["outcome"], result["error_code"], result["attempts"]) == ("REFUSED", "400.002.02", 1)
        assert len(r.daraja.pushes) == 1

    async def test_retries_run_out_as_a_refusal(self):
        r = await rig(*[daraja_error(RETRYABLE, "503")] * 3, max_attempts=3)
        result = await r.push(a_request())
        assert (result["outcome"], result["attempts"]) == ("REFUSED", 3)
        assert len(r.daraja.pushes) == 3

    async def test_an_unknown_outcome_is_reported_and_never_pushed_again(self):
        r = await rig(daraja_error(UNKNOWN))
        request = a_request()
        result = await r.push(request)
        assert result["outcome"] == "OUTCOME_UNKNOWN"
        assert r.claims.rows[request["payment_id"]].status is ClaimStatus.UNKNOWN
        await r.push(request)  # redelivered
        assert len(r.daraja.pushes) == 1

    async def test_an_error_the_client_did_not_classify_is_an_unknown_outcome(self):
        r = await rig(RuntimeError("connection reset after the request was written"))
        result = await r.push(a_request())
        assert (result["outcome"], result["error_code"]) == ("OUTCOME_UNKNOWN", "RuntimeError")

    async def test_a_redelivered_request_whose_claim_finished_is_reported_not_pushed(self):
        r = await rig(accepted(7))
        request = a_request()
        await r.push(request)
        again = await r.push(request)
        assert (again["outcome"], again["checkout_request_id"]) == ("ACCEPTED", "ws_CO_7")
        assert len(r.daraja.pushes) == 1

    async def test_concurrent_duplicates_in_one_process_share_one_push(self):
        r = await rig(accepted(3))
        request = a_request()
        await asyncio.gather(*(r.push(request) for _ in range(3)))
        assert len(r.daraja.pushes) == 1
        assert {x["checkout_request_id"] for x in r.results()} == {"ws_CO_3"}

    @pytest.mark.parametrize("channel, change, code", [
        ({"active": False}, {}, "CHANNEL_SUSPENDED"),
        ({}, {"amount": 5001}, "AMOUNT_ABOVE_CHANNEL_LIMIT"),
        ({}, {"channel_id": "elsewhere"}, "CHANNEL_UNKNOWN"),
    ])
    async def test_a_channel_refusal_is_invalid_and_never_claimed(self, channel, change, code):
        r = await rig()
        r.channels.add("shop", **channel)
        request = a_request(**change)
        result = await r.push(request)
        assert (result["outcome"], result["error_code"]) == ("INVALID", code)
        assert r.daraja.pushes == [] and r.claims.rows == {}

    @pytest.mark.parametrize("channel_now", [{"active": False}, {"max_amount": 5}, None, VaultError("key file gone")])
    async def test_a_redelivered_request_reports_its_push_whatever_its_channel_allows_now(self, channel_now):
        # Pushed and recorded, its result not acknowledged by Kafka, and the channel suspended (its limit
        # lowered, its credentials unreadable, itself removed) before the batch's retry: the customer is
        # being prompted, so the ledger must hear ACCEPTED, not a refusal that fails the payment.
        r = await rig(accepted(6))
        request = a_request()
        r.publisher.refusals = 1
        with pytest.raises(PublishError):
            await r.push(request)
        if isinstance(channel_now, dict):
            r.channels.add("shop", **channel_now)
        else:
            r.channels.channels.pop("shop")
            if channel_now is not None:
                async def unreadable(channel_id: str) -> None:
                    raise channel_now
                r.channels.current = unreadable  # type: ignore[method-assign]  # the test scripts the vault
        again = await r.push(request)
        assert (again["outcome"], again["checkout_request_id"]) == ("ACCEPTED", "ws_CO_6")
        assert len(r.daraja.pushes) == 1

    async def test_a_refusal_after_a_push_given_back_unsent_is_recorded_on_its_claim(self):
        r = await rig()
        request = a_request()
        r.claims.rows[request["payment_id"]] = ClaimRow("shop", "worker-gone", 1, ClaimStatus.RELEASED)
        r.channels.add("shop", active=False)
        result = await r.push(request)
        assert (result["outcome"], result["error_code"]) == ("INVALID", "CHANNEL_SUSPENDED")
        assert r.claims.rows[request["payment_id"]].status is ClaimStatus.INVALID and r.daraja.pushes == []

    @pytest.mark.parametrize("change", [{"amount": 0}, {"phone": "0712345678"}, {"account_reference": "bad;ref"}])
    async def test_an_invalid_event_is_invalid_and_never_claimed(self, change):
        r = await rig()
        result = await r.push(a_request(**change))
        assert (result["outcome"], result["error_code"]) == ("INVALID", "INVALID_REQUEST")
        assert r.daraja.pushes == [] and r.claims.rows == {}


class TestThrottle:
    async def test_spike_arrest_pauses_the_shortcode_before_the_next_push(self):
        r = await rig(daraja_error(RETRYABLE, SPIKE_ARREST), accepted(1), backoff_s=0.01)
        result = await r.push(a_request())
        assert result["outcome"] == "ACCEPTED"
        assert sum(r.clock.sleeps) == pytest.approx(2.0)  # the throttle's penalty, not only the 10 ms back-off

    async def test_pushes_are_paced_at_the_shortcode_rate(self):
        r = await Rig(ScriptedDaraja([accepted(i) for i in range(6)])).start(rate_per_s=2.0)
        for _ in range(6):
            await r.push(a_request())
        # A burst of 2, then one push every half second.
        assert r.clock.now - 1000.0 == pytest.approx(2.0)

    def test_a_channel_s_own_lower_limit_wins_and_queries_keep_it(self):
        clock = FakeClock()
        throttle = ShortcodeThrottle(100.0, burst=100, clock=clock.monotonic)
        assert throttle.take("174379", 1.0) == 0
        assert throttle.take("174379", 1.0) == pytest.approx(1.0)
        assert throttle.take("174379") == pytest.approx(1.0)  # a query of the same shortcode

    def test_spike_arrest_empties_the_bucket(self):
        clock = FakeClock()
        throttle = ShortcodeThrottle(10.0, burst=10, penalty_s=2.0, clock=clock.monotonic)
        throttle.spike_arrested("174379")
        assert throttle.take("174379") == pytest.approx(2.0)
        clock.now += 2.0
        assert throttle.take("174379") == 0  # refilled during the pause at 10/s
        assert throttle.take("174379") == 0 and throttle.take("other") == 0


class TestDarajasAnswerIsNeverForgotten:
    async def test_a_failure_to_record_the_answer_is_retried_with_the_same_answer(self):
        r = await rig(accepted(4))
        r.claims.fail_finishes = 5
        request = a_request()
        result = await r.push(request)
        assert (result["outcome"], result["checkout_request_id"]) == ("ACCEPTED", "ws_CO_4")
        assert r.claims.finish_calls == 6 and len(r.daraja.pushes) == 1
        outcome = r.claims.rows[request["payment_id"]].outcome
        assert outcome is not None and outcome.checkout_request_id == "ws_CO_4"

    async def test_an_answer_the_database_cannot_take_is_reported_at_once_and_still_recorded(self):
        """Held only in memory, the answer would die with the process; on Kafka it reaches the ledger."""
        r = await rig(accepted(7))
        r.claims.fail_finishes = 3
        request = a_request()
        claim_when_published: list[ClaimStatus | None] = []
        publish = r.publisher.publish

        async def noting_the_claim(topic, record):
            row = r.claims.rows.get(request["payment_id"])
            claim_when_published.append(row.status if row else None)
            await publish(topic, record)
        r.publisher.publish = noting_the_claim  # type: ignore[method-assign]  # the test scripts what this step does
        await r.push(request)
        assert [(x["outcome"], x["checkout_request_id"]) for x in r.results()] == [("ACCEPTED", "ws_CO_7")]
        assert claim_when_published == [ClaimStatus.CLAIMED]  # before the record, and not again after it
        assert r.claims.finish_calls == 4 and len(r.daraja.pushes) == 1

    async def test_an_answer_whose_record_does_not_come_back_is_reported_without_waiting_for_it(self):
        """A pool waiting for a connection to a database that is down neither fails nor returns."""
        r = await rig(accepted(9), report_early_after_s=0.01)
        r.claims.finishes_wait_for = answers = asyncio.Event()
        request = a_request()
        pushing = asyncio.ensure_future(r.push(request))
        for _ in range(300):  # 3 s at most
            if r.results():
                break
            await asyncio.sleep(0.01)
        assert [(x["outcome"], x["checkout_request_id"]) for x in r.results()] == [("ACCEPTED", "ws_CO_9")]
        assert not pushing.done()  # still recording
        answers.set()
        await pushing
        assert len(r.results()) == 1 and r.claims.rows[request["payment_id"]].status is ClaimStatus.ACCEPTED

    async def test_an_answer_recorded_at_the_first_try_is_reported_once(self):
        r = await rig(accepted(8))
        await r.push(a_request())
        assert len(r.results()) == 1

    async def test_the_answer_is_held_through_a_long_database_outage(self):
        r = await rig(accepted(5))

        def outage() -> None:
            r.claims.down = True
            asyncio.get_running_loop().call_later(0.05, setattr, r.claims, "down", False)
        r.daraja.during_push = outage
        result = await r.push(a_request())
        assert result["checkout_request_id"] == "ws_CO_5"
        assert r.clock.sleeps and max(r.clock.sleeps) <= 15.0  # capped back-off, tried again and again

    async def test_a_batch_retried_by_the_same_process_reports_the_recorded_answer(self):
        r = await rig(accepted(6))
        request = a_request()
        r.publisher.refusals = 1
        with pytest.raises(PublishError):
            await r.push(request)
        again = await r.push(request)  # the batch's retry
        assert (again["outcome"], again["checkout_request_id"]) == ("ACCEPTED", "ws_CO_6")
        assert len(r.daraja.pushes) == 1

    async def test_a_claim_that_cannot_be_taken_pushes_nothing_and_is_retried(self):
        r = await rig(accepted(1))
        r.claims.down = True
        request = a_request()
        with pytest.raises(psycopg.OperationalError) as raised:
            await r.push(request)
        assert is_transient(raised.value) and r.daraja.pushes == []
        r.claims.down = False
        assert (await r.push(request))["outcome"] == "ACCEPTED" and len(r.daraja.pushes) == 1

    async def test_its_own_claim_left_before_pushing_is_pushed_by_the_same_process(self):
        # The claim's INSERT committed but its answer was lost with the connection: nothing was sent.
        r = await rig(accepted(8))
        request = a_request()
        r.claims.rows[request["payment_id"]] = ClaimRow("shop", r.claims.owner, 1)
        result = await r.push(request)
        assert result["outcome"] == "ACCEPTED" and len(r.daraja.pushes) == 1

    async def test_a_claim_held_by_a_live_worker_reports_what_that_worker_records(self):
        r = await rig()
        other = r.claims.for_owner("worker-b")
        request = a_request()
        await other.beat()
        await other.claim(request["payment_id"], "shop", 1)
        polls = 0

        async def other_keeps_working(seconds: float) -> None:
            nonlocal polls
            polls += 1
            await other.beat()
            if polls == 40:  # 20 s: longer than owner_silent_s, but it beats
                from services.stk_worker.claims import PushOutcome
                answer = PushOutcome(ClaimStatus.ACCEPTED, "mr-b", "ws_CO_b", attempts=1)
                await other.finish(request["payment_id"], answer)
            r.clock.now += seconds
        r.clock.sleep = other_keeps_working  # type: ignore[method-assign]  # the test scripts what this step does
        result = await r.push(request)
        assert (result["outcome"], result["checkout_request_id"]) == ("ACCEPTED", "ws_CO_b")
        assert r.daraja.pushes == []

    async def test_a_claim_whose_worker_is_gone_is_an_unknown_outcome_after_its_heartbeat_stood_still(self):
        r = await rig(owner_silent_s=15.0)
        other = r.claims.for_owner("worker-b")
        request = a_request()
        await other.beat()
        await other.claim(request["payment_id"], "shop", 1)
        result = await r.push(request)
        assert result["outcome"] == "OUTCOME_UNKNOWN" and r.daraja.pushes == []
        assert r.clock.now - 1000.0 >= 15.0

    async def test_a_claim_from_before_owners_were_recorded_is_unknown_at_once(self):
        r = await rig()
        request = a_request()
        r.claims.rows[request["payment_id"]] = ClaimRow("shop", None, None)
        result = await r.push(request)
        assert result["outcome"] == "OUTCOME_UNKNOWN" and r.clock.sleeps == []

    async def test_a_live_worker_that_does_not_finish_makes_the_event_wait_for_a_retry(self):
        r = await rig(owner_wait_max_s=30.0)
        other = r.claims.for_owner("worker-b")
        request = a_request()
        await other.claim(request["payment_id"], "shop", 1)

        async def other_beats(seconds: float) -> None:
            await other.beat()
            r.clock.now += seconds
        r.clock.sleep = other_beats  # type: ignore[method-assign]  # the test scripts what this step does
        await other.beat()
        with pytest.raises(OwnerBusy) as raised:
            await r.push(request)
        assert is_transient(raised.value) and r.claims.rows[request["payment_id"]].status is ClaimStatus.CLAIMED

    def test_an_owner_is_gone_only_after_its_beat_was_seen_standing_still(self):
        watch = OwnerWatch(silent_s=10.0)
        assert not watch.gone("b", 7, now=0.0)  # a stale beat after an outage proves nothing yet
        assert not watch.gone("b", 7, now=9.9)
        assert not watch.gone("b", 8, now=9.95)  # it moved: watched afresh
        assert not watch.gone("b", 8, now=19.9)
        assert watch.gone("b", 8, now=19.95)
        assert OwnerWatch(silent_s=10.0).gone("b", None, now=0.0)  # never beat


class TestStopping:
    async def test_a_push_waiting_in_its_back_off_is_released_at_a_stop(self):
        r = await rig(daraja_error(RETRYABLE, "500.001.1001", retry_after_s=60.0))
        request = a_request()

        async def stopped_during_the_wait(seconds: float) -> None:
            r.stop.set()
            await asyncio.Event().wait()  # never ends by itself
        r.clock.sleep = stopped_during_the_wait  # type: ignore[method-assign]  # the test scripts what this step does
        with pytest.raises(Interrupted) as raised:
            await asyncio.wait_for(r.push(request), 5)
        assert isinstance(raised.value, Transient)
        assert r.claims.rows[request["payment_id"]].status is ClaimStatus.RELEASED
        # The next owner pushes it: Daraja had not acted on the first try.
        nxt = await Rig(ScriptedDaraja([accepted(9)]), claims=r.claims.for_owner("worker-b")).start()
        result = await nxt.push(request)
        assert (result["outcome"], result["checkout_request_id"]) == ("ACCEPTED", "ws_CO_9")

    async def test_a_push_waiting_for_the_throttle_has_no_claim_yet_so_a_stop_or_a_kill_leaves_none(self):
        """Claimed only once its turn came: a worker killed while a burst waits for the shortcode's
        turn leaves no claim of theirs to be judged an unknown outcome."""
        r = await Rig(ScriptedDaraja([accepted(1), accepted(2)])).start(rate_per_s=1.0)
        await r.push(a_request())
        request = a_request()
        r.stop.set()
        with pytest.raises(Interrupted):
            await r.push(request)
        assert len(r.daraja.pushes) == 1
        assert request["payment_id"] not in r.claims.rows

    async def test_a_push_in_flight_at_a_stop_is_finished_and_recorded(self):
        r = await rig(accepted(3))
        r.daraja.during_push = r.stop.set
        request = a_request()
        result = await r.push(request)
        assert result["outcome"] == "ACCEPTED"
        outcome = r.claims.rows[request["payment_id"]].outcome
        assert outcome is not None and outcome.checkout_request_id == "ws_CO_3"

    async def test_an_answer_that_cannot_be_recorded_by_the_stop_s_deadline_is_never_pushed_again_here(self):
        r = await rig(accepted(4), stop_grace_s=20.0)
        request = a_request()

        def stop_with_the_database_down() -> None:
            r.stop.set()
            r.claims.down = True
        r.daraja.during_push = stop_with_the_database_down
        with pytest.raises(AnswerNotRecorded) as raised:
            await r.push(request)
        assert isinstance(raised.value, Transient)  # not dead-lettered: the next owner reconciles it
        assert r.clock.now - 1000.0 >= 20.0
        r.claims.down = False
        with pytest.raises(AnswerNotRecorded):
            await r.push(request)
        assert len(r.daraja.pushes) == 1
        assert r.claims.rows[request["payment_id"]].status is ClaimStatus.CLAIMED

    async def test_an_answer_that_cannot_be_recorded_by_the_stop_s_deadline_still_reaches_the_ledger(self):
        # PostgreSQL down past the stop's grace, Kafka up: the CheckoutRequestID must not live only in
        # a log line, or the payment goes to Review though its query would have settled it.
        r = await rig(accepted(9), stop_grace_s=20.0)
        request = a_request()

        def stop_with_the_database_down() -> None:
            r.stop.set()
            r.claims.down = True
        r.daraja.during_push = stop_with_the_database_down
        with pytest.raises(AnswerNotRecorded):
            await r.push(request)
        assert [(x["outcome"], x["checkout_request_id"]) for x in r.results()] == [("ACCEPTED", "ws_CO_9")]
        assert r.claims.rows[request["payment_id"]].status is ClaimStatus.CLAIMED  # reconciled by the next owner


class TestQuerier:
    async def query(self, r: Rig, checkout_request_id: str | None = "ws_CO_1", channel_id: str = "shop") -> dict:
        assert r.worker is not None
        value = {**sample_request(channel_id, str(uuid.uuid4())), "checkout_request_id": checkout_request_id,
                 "attempt": 1}
        await r.worker.querier.handle(ConsumedEvent(STK_QUERY_REQUESTED.name, 0, 0, b"shop", "q", value))
        return r.publisher.records(STK_QUERY_RESULT)[-1]

    @pytest.mark.parametrize("status, expected", [(QueryStatus.FINAL_SUCCESS, "SUCCESS"),
                                                  (QueryStatus.FINAL_FAILURE, "FAILED"),
                                                  (QueryStatus.STILL_PROCESSING, "PROCESSING")])
    async def test_the_querier_reports_daraja_s_answer(self, status, expected):
        r = await Rig(ScriptedDaraja(queries=[QueryResult(status, "1032", "cancelled by user")])).start()
        result = await self.query(r)
        assert (result["status"], result["result_code"], result["checkout_request_id"]) == (expected, "1032", "ws_CO_1")
        assert r.daraja.queries == ["ws_CO_1"]

    async def test_a_failed_query_is_an_error_result(self):
        r = await Rig(ScriptedDaraja(queries=[daraja_error(RETRYABLE, SPIKE_ARREST)])).start()
        result = await self.query(r)
        assert (result["status"], result["result_code"]) == ("ERROR", SPIKE_ARREST)

    async def test_nothing_is_queried_without_a_checkout_request_id_or_a_channel(self):
        r = await Rig(ScriptedDaraja()).start()
        assert (await self.query(r, checkout_request_id=None))["status"] == "ERROR"
        assert (await self.query(r, channel_id="elsewhere"))["result_desc"] == "unknown channel"
        assert r.daraja.queries == []


@pytest.mark.parametrize("error, transient", [
    (psycopg.OperationalError("server closed the connection"), True),
    (psycopg.InterfaceError("the connection is closed"), True),
    (psycopg.errors.lookup("54000")("program limit exceeded"), False),
    (psycopg.errors.lookup("54001")("statement too complex"), False),
    (psycopg.errors.lookup("57P01")("terminating connection due to administrator command"), True),
    (PublishError("not acknowledged"), True),
    (Interrupted("stopping"), True),
    (KeyError("amount"), False),
])
def test_errors_are_classified_by_what_the_consumer_should_do(error, transient):
    assert is_transient(error) is transient


async def test_the_bootstrap_writes_the_first_heartbeat_before_anything_is_claimed():
    r = await rig()
    assert r.claims.beats == {r.claims.owner: 0}

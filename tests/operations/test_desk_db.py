"""The review desk on the real database (as the onboarding role) and over the admin API: a payment
sent to Review by a contradiction is found, shown with its trail, and instructions get the ledger's
verdict (written here by ScriptedLedger, which stands in for Kafka and the ledger;
tests/operations/test_review_e2e.py runs the real ones)."""
from __future__ import annotations

import json
import uuid

from services.operations.desk import ReviewDesk
from services.operations.model import Action, Instruction, NotFound, Refused, parse_search
from tests.operations.conftest import ADMIN, audit_rows, make_payment, payment_row


def _search(**query):
    search, errors = parse_search(query)
    assert errors == {}
    return search


async def test_a_review_payment_is_found_by_receipt_phone_order_reference_and_checkout_id(desk, ledger, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    local_form = "0" + made.phone[3:]
    for query in ({"receipt": made.receipt.lower()}, {"phone": local_form}, {"phone": "+" + made.phone},
                  {"orderReference": made.order_reference}, {"checkoutRequestId": made.checkout_request_id},
                  {"channel": made.channel_id, "state": "Review"}):
        page = await desk.search(_search(**query))
        assert [p["paymentId"] for p in page["payments"]] == [made.payment_id], query
        shown = page["payments"][0]
        assert (shown["state"], shown["lateMpesaReceipt"]) == ("Review", made.receipt)
        assert shown["phone"] == "*********" + made.phone[-3:]
        assert made.phone[3:] not in json.dumps(page)


async def test_pages_are_newest_first_without_gaps_or_repeats(desk, ledger, unique):
    made = [await make_payment(ledger, f"ch-{unique}", review=False) for _ in range(5)]
    seen, cursor = [], None
    while True:
        page = await desk.search(_search(channel=f"ch-{unique}", limit="2", **({"cursor": cursor} if cursor else {})))
        seen += [p["paymentId"] for p in page["payments"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(m.payment_id for m in made) and len(seen) == 5
    times = [p["requestedAt"] for p in (await desk.search(_search(channel=f"ch-{unique}")))["payments"]]
    assert times == sorted(times, reverse=True)


async def test_showing_a_payment_gives_its_history_audit_and_raw_callbacks_with_the_phone_masked(
        desk, ledger, ledger_pool, unique):
    made = await make_payment(ledger, f"ch-{unique}")  # the ledger keeps both callbacks it decided
    shown = await desk.payment(made.payment_id)
    assert shown["state"] == "Review" and shown["lateMpesaReceipt"] == made.receipt and shown["reviewReason"]
    assert [h["state"] for h in shown["history"]][-2:] == ["Cancelled", "Review"]
    assert shown["audit"] and all(a["fact"] for a in shown["audit"])
    assert shown["callbacksTotal"] == 2 and any(made.receipt in c["body"] for c in shown["callbacks"])
    assert made.phone[3:] not in json.dumps(shown)


async def test_an_unknown_payment_is_not_found(desk):
    try:
        await desk.payment(str(uuid.uuid4()))
        raise AssertionError("expected NotFound")
    except NotFound:
        pass


async def test_a_settlement_the_ledger_applies_answers_with_the_payment_and_the_actor_is_sent(
        desk, ledger, scripted, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    outcome = await desk.instruct(made.payment_id, Instruction(Action.SETTLE, "wanjiku", "SMS seen", made.receipt),
                                  "wanjiku via cli")
    [sent] = scripted.sent
    assert (sent["action"], sent["actor"], sent["reason"], sent["mpesa_receipt"]) == (
        "SETTLE", "wanjiku via cli", "SMS seen", made.receipt)
    assert (sent["channel_id"], sent["payment_id"]) == (made.channel_id, made.payment_id)
    assert outcome.status == "applied" and outcome.event_id == sent["event_id"]
    assert outcome.payment["paymentId"] == made.payment_id


async def test_a_rejection_by_the_ledger_gives_its_reason(desk, ledger, scripted, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    scripted.verdict, scripted.detail = "rejected", "receipt already proves another payment"
    outcome = await desk.instruct(made.payment_id, Instruction(Action.CANCEL, "o", "no money"), "o via cli")
    assert (outcome.status, outcome.detail) == ("rejected", "receipt already proves another payment")


async def test_the_verdict_quoting_the_reason_masks_a_number_the_operator_wrote(desk, ledger, scripted, unique):
    # The ledger's detail quotes the operator's reason as given ("called 0712 345 678, refunded"):
    # the answer masks it as `payments show` does, whether the ledger applied or refused.
    made = await make_payment(ledger, f"ch-{unique}")
    for verdict in ("applied", "rejected"):
        scripted.verdict, scripted.detail = verdict, "called 0712 345 678, refunded"
        outcome = await desk.instruct(made.payment_id, Instruction(Action.CANCEL, "o", "called 0712 345 678"),
                                      "o via cli")
        assert (outcome.status, outcome.detail) == (verdict, "called *********678, refunded")


async def test_a_verdict_not_seen_in_time_is_accepted_not_applied(desk, ledger, scripted, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    scripted.verdict = None
    outcome = await desk.instruct(made.payment_id, Instruction(Action.QUERY, "o", "asks"), "o via cli")
    assert outcome.status == "accepted" and outcome.event_id == scripted.sent[0]["event_id"]


async def test_what_surely_fails_is_refused_before_publishing_and_changes_nothing(
        desk, ledger, scripted, pool, unique):
    review = await make_payment(ledger, f"ch-{unique}")
    cancelled = await make_payment(ledger, f"ch-{unique}", review=False)
    before = {m.payment_id: (await payment_row(pool, m.payment_id), await audit_rows(pool, m.payment_id))
              for m in (review, cancelled)}
    attempts = [
        (cancelled.payment_id, Instruction(Action.CANCEL, "o", "r")),  # not in Review
        (cancelled.payment_id, Instruction(Action.QUERY, "o", "r")),  # final: nothing to query
        (review.payment_id, Instruction(Action.SETTLE, "o", "r", review.receipt.replace("R", "S", 1))),
    ]
    other = await make_payment(ledger, f"ch-{unique}")  # its late receipt proves it, not `review`
    attempts.append((review.payment_id, Instruction(Action.SETTLE, "o", "r", other.receipt)))
    for payment_id, instruction in attempts[:2] + attempts[3:]:
        try:
            await desk.instruct(payment_id, instruction, "o via cli")
            raise AssertionError(f"expected a refusal of {instruction}")
        except Refused as refused:
            assert "nothing was sent" in refused.detail
    try:
        await desk.instruct(str(uuid.uuid4()), Instruction(Action.QUERY, "o", "r"), "o via cli")
        raise AssertionError("expected NotFound")
    except NotFound:
        pass
    assert scripted.sent == []
    for payment_id, (row, audit) in before.items():
        assert await payment_row(pool, payment_id) == row and await audit_rows(pool, payment_id) == audit


async def test_the_database_gone_is_a_clear_unavailable(onboarding_pool, scripted, infra):
    from psycopg_pool import AsyncConnectionPool

    from services.operations.model import Unavailable
    gone = AsyncConnectionPool("postgresql://onboarding@127.0.0.1:9/mpesa", min_size=0, max_size=1, open=False)
    await gone.open(wait=False)
    try:
        await ReviewDesk(gone, scripted).search(_search())
        raise AssertionError("expected Unavailable")
    except Unavailable as error:
        assert "database" in error.detail
    finally:
        await gone.close()


async def test_over_http_an_operator_finds_and_settles_a_review_payment(client, ledger, scripted, unique):
    made = await make_payment(ledger, f"ch-{unique}")
    found = await client.get("/admin/payments", params={"phone": "0" + made.phone[3:]}, headers=ADMIN)
    assert found.status == 200 and [p["paymentId"] for p in (await found.json())["payments"]] == [made.payment_id]
    body = {"outcome": "Settled", "mpesaReceipt": made.receipt, "reason": "customer showed the SMS",
            "operator": "wanjiku"}
    settled = await client.post(f"/admin/payments/{made.payment_id}/resolve", json=body, headers=ADMIN)
    assert settled.status == 200, await settled.text()
    assert scripted.sent[0]["actor"] == "wanjiku via admin-api from 127.0.0.1"

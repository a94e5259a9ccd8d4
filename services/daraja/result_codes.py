"""Daraja's STK ResultCodes (docs/daraja.md §3, "ResultCode catalogue"): the one list the client, the
ledger and the sandbox's tests share. Pure data."""
from __future__ import annotations

SUCCESS = "0"
# Final failure codes and what they mean for the payment. Anything else proves nothing: 4999 is
# the query's in-flight state, and legacy G2 codes are deliberately absent.
FAILURE_MEANINGS = {
    "1": "insufficient balance", "2": "amount below the minimum", "3": "amount above the maximum",
    "4": "daily transfer limit exceeded", "8": "receiver's maximum balance exceeded",
    "17": "rule limited: same amount to the same customer within 2 minutes", "26": "system busy",
    "1001": "a transaction is already in process for the subscriber", "1019": "transaction expired",
    "1025": "error sending the push request", "1032": "cancelled by the customer",
    "1036": "prompt not delivered (SMSC ACK timeout)", "1037": "customer could not be reached or did not respond",
    "1101": "prompt message prefix too long", "1102": "prompt message too long",
    "2001": "wrong M-Pesa PIN", "2028": "not permitted for this shortcode (till/paybill mismatch)",
    "8006": "customer's PIN is locked", "9999": "error sending the push request",
    "SFC_IC0003": "the operator does not exist (till/paybill mismatch)",
}
FINAL_FAILURE_CODES = frozenset(FAILURE_MEANINGS)
STILL_PROCESSING_CODE = "4999"

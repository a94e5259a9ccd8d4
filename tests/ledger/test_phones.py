"""The callback's phone number against the payment's: every form Daraja is known to send."""
import pytest

from services.ledger.phones import PhoneCheck, check_phone

MATCH, MISMATCH, UNVERIFIABLE = PhoneCheck.MATCH, PhoneCheck.MISMATCH, PhoneCheck.UNVERIFIABLE


@pytest.mark.parametrize("payment, seen, expected", [
    ("254708374149", "254708374149", MATCH),      # the documented sample, an integer parsed to text
    ("254708374149", "+254708374149", MATCH),
    ("254708374149", " 254708374149 ", MATCH),
    ("254708374149", "0708374149", MATCH),        # local form
    ("254708374149", "708374149", MATCH),         # subscriber number alone
    ("254708374149", "25470****149", MATCH),      # masked as in C2B confirmations
    ("254708374149", "2547******49", MATCH),      # masked as the status topic does
    ("254110000001", "2541******01", MATCH),      # a 2541... line
    ("254708374149", "*********149", MATCH),
    ("254708374149", "254708374148", MISMATCH),   # a well-formed number that differs
    ("254708374149", "255708374149", MISMATCH),   # another country code is a visible difference
    ("254708374149", "0708374148", MISMATCH),
    ("254708374149", "25470****148", MISMATCH),   # visible digits that differ
    ("254708374149", "2541******49", MISMATCH),
    ("254708374149", None, UNVERIFIABLE),         # no PhoneNumber item
    ("254708374149", "", UNVERIFIABLE),
    ("254708374149", "************", UNVERIFIABLE),
    ("254708374149", "254*********", UNVERIFIABLE),  # only the country code visible
    ("254708374149", "**********49", UNVERIFIABLE),  # two subscriber digits: one forger in a hundred matches
    ("254708374149", "2547*******9", UNVERIFIABLE),
    ("254708374149", "**********48", MISMATCH),      # too few to match, enough to differ
    ("254708374149", "25470837414", UNVERIFIABLE),   # 11 digits, as in a published 2019 sample
    ("254708374149", "2547083741490", UNVERIFIABLE),
    ("254708374149", "254708374149.0", UNVERIFIABLE),
    ("254708374149", "2547 0837 4149", UNVERIFIABLE),
    ("254708374149", "07O8374149", UNVERIFIABLE),   # a letter O
    ("254708374149", True, UNVERIFIABLE),
])
def test_visible_digits_are_compared_position_by_position(payment, seen, expected):
    assert check_phone(payment, seen) is expected


@pytest.mark.parametrize("seen", ["254708374149", "0708374149", "708374149", "2547******49"])
def test_a_payment_whose_number_a_pseudonym_replaced_has_nothing_to_compare(seen):
    # The retention of payers' data (services/privacy) leaves `ph_<32 hex>` where the number was; a
    # late callback for such a payment must be decided, not crash the ledger on the length.
    assert check_phone("ph_" + "0123456789abcdef" * 2, seen) is UNVERIFIABLE

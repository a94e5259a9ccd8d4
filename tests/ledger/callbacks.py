"""Callback bodies in Daraja's shapes (docs/daraja.md §3), for ledger tests."""
import json

OMIT = object()  # leaves an item out of the body


def success(checkout_id: str, amount=100, receipt="NLJ7RT61SV", phone=254712345678, balance_without_value=True,
            amount_as_string=False) -> bytes:
    items = [{"Name": "Amount", "Value": amount if amount is OMIT or isinstance(amount, str)
              else f"{amount}.00" if amount_as_string else float(amount)},
             {"Name": "MpesaReceiptNumber", "Value": receipt},
             {"Name": "TransactionDate", "Value": 20261127102115},
             {"Name": "PhoneNumber", "Value": phone}]
    items = [i for i in items if i["Value"] is not OMIT]
    if balance_without_value:
        items.insert(2, {"Name": "Balance"})
    return _body(checkout_id, 0, "The service request is processed successfully.", {"Item": items})


def failure(checkout_id: str, code, desc="Request cancelled by user") -> bytes:
    return _body(checkout_id, code, desc, None)


def _body(checkout_id, code, desc, metadata) -> bytes:
    stk = {"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": checkout_id, "ResultCode": code,
           "ResultDesc": desc}
    if metadata:
        stk["CallbackMetadata"] = metadata
    return json.dumps({"Body": {"stkCallback": stk}}).encode()

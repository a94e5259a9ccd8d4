"""STK callbacks: pure builders of Daraja's exact bytes, and the sender that delivers them.

The layout is the one real sandbox callbacks have on the wire (docs/daraja.md §3; captured samples in
PatrickNthiwa/Daraja_mpesa_api_C2B CallBackResponse.txt and Deval123/nkap): compact JSON, the
amount with two decimals (`1.00`), a `Balance` item without `Value`, TransactionDate and
PhoneNumber as JSON numbers, and ResultCode an integer except the string "SFC_IC0003".
Delivery is one attempt, no retry, as Daraja does (docs/daraja.md §5 "Retries").
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from services.daraja_sandbox.rawhttp import HttpFailure, RawHttpClient, build_post

log = logging.getLogger(__name__)

CALLBACK_CONTENT_TYPE = "application/json;charset=UTF-8"  # docs/daraja.md §3, as received from Daraja


def success_callback(merchant_request_id: str, checkout_request_id: str, amount: int, receipt: str,
                     transaction_date: str, phone: str, result_desc: str, masked_phone: bool = False) -> bytes:
    """masked_phone: PhoneNumber as a masked string ("25470****149", the C2B confirmations' form)
    instead of a number; the ledger must still settle it."""
    if not (transaction_date.isdigit() and phone.isdigit()) or isinstance(amount, bool) or not isinstance(amount, int):
        raise ValueError("transaction_date and phone must be digits and amount a whole number")
    if masked_phone:
        phone = json.dumps(phone[:5] + "****" + phone[-3:])
    return (
        '{"Body":{"stkCallback":{"MerchantRequestID":%s,"CheckoutRequestID":%s,"ResultCode":0,"ResultDesc":%s,'
        '"CallbackMetadata":{"Item":[{"Name":"Amount","Value":%d.00},{"Name":"MpesaReceiptNumber","Value":%s},'
        '{"Name":"Balance"},{"Name":"TransactionDate","Value":%s},{"Name":"PhoneNumber","Value":%s}]}}}}'
        % (json.dumps(merchant_request_id), json.dumps(checkout_request_id), json.dumps(result_desc), amount,
           json.dumps(receipt), transaction_date, phone)
    ).encode()


def failure_callback(merchant_request_id: str, checkout_request_id: str, result_code: int | str,
                     result_desc: str) -> bytes:
    # No CallbackMetadata on failures (docs/daraja.md §3 "Shape").
    return json.dumps({"Body": {"stkCallback": {
        "MerchantRequestID": merchant_request_id,
        "CheckoutRequestID": checkout_request_id,
        "ResultCode": result_code,
        "ResultDesc": result_desc,
    }}}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class CallbackJob:
    checkout_request_id: str
    url: str
    body: bytes
    business_shortcode: str


# Called with (checkout_request_id, HTTP status or an error name, when the attempt started: epoch
# seconds) once per delivery attempt, when it is over.
DeliveryListener = Callable[[str, "int | str", float], None]


class CallbackSender:
    """Delivers callbacks with a bounded number of workers: plain-http URLs through the lean
    keep-alive client (rawhttp), anything else (https) through one shared aiohttp ClientSession."""

    def __init__(self, *, concurrency: int, timeout_s: float, on_delivery: DeliveryListener):
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._on_delivery = on_delivery
        self._queue: asyncio.Queue[CallbackJob] = asyncio.Queue()
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._next_timer = 0
        self._workers: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._raw = RawHttpClient(timeout_s)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=self._concurrency,
                                         ttl_dns_cache=60, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        self._workers = [asyncio.create_task(self._work(), name=f"callback-sender-{i}")
                         for i in range(self._concurrency)]

    async def close(self) -> None:
        self.cancel_pending()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._raw.close()
        if self._session is not None:
            await self._session.close()

    def send(self, job: CallbackJob, delay_s: float) -> None:
        if delay_s <= 0:
            self._queue.put_nowait(job)
            return
        key = self._next_timer
        self._next_timer += 1
        self._timers[key] = asyncio.get_running_loop().call_later(delay_s, self._release, key, job)

    def cancel_pending(self) -> None:
        """Forgets every callback not yet sent (admin reset)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        while not self._queue.empty():
            self._queue.get_nowait()

    @property
    def pending(self) -> int:
        return len(self._timers) + self._queue.qsize()

    def _release(self, key: int, job: CallbackJob) -> None:
        self._timers.pop(key, None)
        self._queue.put_nowait(job)

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            sent_at = time.time()
            self._on_delivery(job.checkout_request_id, await self._deliver(job), sent_at)

    async def _deliver(self, job: CallbackJob) -> int | str:
        headers = {"Content-Type": CALLBACK_CONTENT_TYPE, "BusinessShortCode": job.business_shortcode}
        plain = build_post(job.url, headers, job.body)
        if plain is not None:
            try:
                return await self._raw.post(*plain)
            except HttpFailure as exc:
                return str(exc)
        assert self._session is not None, "post() before start()"
        try:
            async with self._session.post(job.url, data=job.body, headers=headers) as response:
                await response.read()
                return response.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            # The receiver's problem, not ours: Daraja does not retry either (docs/daraja.md §5).
            return type(exc).__name__

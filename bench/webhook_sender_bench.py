"""Cost of one webhook attempt through services.notifier.sender.Sender (a benchmark, not a test).

A receiver runs as a subprocess on 127.0.0.1 (its own process, so its CPU is not counted here) and
answers every POST with 204 after reading the body. This process sends a realistic event body
(events.webhook_body), signed with one or two secrets, with --concurrency sends in flight, and prints:

  sends/s        attempts completed per second of wall time (bounded by the receiver as well);
  CPU µs/send    this process's CPU time (user + system, all threads: time.process_time) per attempt,
                 which is what the notifier pays per delivery for signing, HTTP and the bounded read,
                 and says more than a rate on a machine shared with other work;
  sign µs        Webhook.sign alone, per signature.

No Kafka, no PostgreSQL. Loopback only.

    .venv/bin/python bench/webhook_sender_bench.py [--sends 20000] [--concurrency 64] [--secrets 1]
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.host import HostLoad  # noqa: E402
from services.notifier.destinations import DestinationPolicy  # noqa: E402
from services.notifier.events import webhook_body  # noqa: E402
from services.notifier.secrets import new_secret  # noqa: E402
from services.notifier.sender import Sender  # noqa: E402

WARMUP_SENDS = 500


def sample_body() -> str:
    moment = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    return webhook_body({
        "event_id": "evt_0190f1c2a3b4c5d6e7f8a9b0c1d2e3f4", "payment_id": "pay_0190f1c2a3b4c5d6e7f8a9b0c1d2e3f4",
        "channel_id": "shop-bench", "order_reference": "ORDER-2026-000123", "amount": 1500,
        "status": "Settled", "previous_status": "Pending", "mpesa_receipt": "TC1ABCDE2F",
        "transaction_time": moment, "result_code": "0", "reason": "The service request is processed successfully.",
        "late_mpesa_receipt": None, "metadata": {"cart": "c-42"}, "occurred_at": moment})


def serve() -> None:
    """The receiver subprocess: prints its port, then answers until stdin closes."""
    from aiohttp import web

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hooks", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    asyncio.run(main())


def sign_us(body: str, secret: str, iterations: int = 20000) -> float:
    from standardwebhooks import Webhook
    signer = Webhook(secret)
    moment = datetime.now(timezone.utc)
    started = time.perf_counter()
    for _ in range(iterations):
        signer.sign("evt_1", moment, body)
    return (time.perf_counter() - started) / iterations * 1e6


async def send_all(sender: Sender, url: str, body: str, secrets: list[str], sends: int, concurrency: int) -> dict:
    left = [sends]
    failures: dict[str, int] = {}

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            result = await sender.send(url, f"evt_{left[0]}", body, secrets)
            if result.http_status != 204:
                key = str(result.http_status or result.error)
                failures[key] = failures.get(key, 0) + 1

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"sends_per_s": round(sends / wall), "cpu_us_per_send": round(cpu / sends * 1e6, 1),
            "wall_s": round(wall, 2), "failures": failures}


async def run(args: argparse.Namespace) -> dict:
    receiver = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
    try:
        assert receiver.stdout is not None
        url = f"http://127.0.0.1:{int(receiver.stdout.readline())}/hooks"
        sender = Sender(DestinationPolicy((ipaddress.ip_network("127.0.0.0/8"),)), connect_timeout_s=5.0,
                        read_timeout_s=10.0)
        body, secrets = sample_body(), [new_secret() for _ in range(args.secrets)]
        try:
            await send_all(sender, url, body, secrets, WARMUP_SENDS, args.concurrency)
            host = HostLoad()
            figures = await send_all(sender, url, body, secrets, args.sends, args.concurrency)
        finally:
            await sender.close()
        return {**figures, "body_bytes": len(body), "secrets": args.secrets, "concurrency": args.concurrency,
                "sign_us": round(sign_us(body, secrets[0]), 1), **host.figures()}
    finally:
        if receiver.stdin is not None:
            receiver.stdin.close()
        receiver.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sends", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--secrets", type=int, default=1, choices=(1, 2))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    figures = asyncio.run(run(args))
    print(f"webhook sender: {figures['sends_per_s']} sends/s, {figures['cpu_us_per_send']} µs CPU per send "
          f"({args.sends} sends, {args.concurrency} in flight, {args.secrets} secret(s), "
          f"{figures['body_bytes']}-byte body); Webhook.sign {figures['sign_us']} µs")
    print(figures)


if __name__ == "__main__":
    main()

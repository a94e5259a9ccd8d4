"""A tiny receiver of the pipeline's status webhooks, as an upstream system would write one.

It uses nothing of this project: aiohttp to listen and the `standardwebhooks` library to verify
(pip install aiohttp standardwebhooks). It answers 2xx only after verifying, deduplicates on
`webhook-id` (deliveries are at least once), and prints one line per new event.

    WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 8099

With several secrets (during a rotation), give them comma-separated: any one that matches verifies.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MAX_BODY_BYTES = 64 * 1024
SEEN_MAX = 100_000


def make_app(secrets: list[str], out=sys.stdout) -> web.Application:
    verifiers = [Webhook(s) for s in secrets]
    seen: dict[str, None] = {}  # webhook-ids already handled, oldest first

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()}
        payload = None
        for verifier in verifiers:
            try:
                payload = verifier.verify(body, headers)
                break
            except WebhookVerificationError:
                continue
        if payload is None:
            return web.Response(status=400, text="signature does not verify")
        webhook_id = request.headers["webhook-id"]
        if webhook_id in seen:
            return web.Response(status=204)  # a redelivery: already handled
        seen[webhook_id] = None
        if len(seen) > SEEN_MAX:
            seen.pop(next(iter(seen)))
        data = payload["data"]
        print(json.dumps({"webhookId": webhook_id, "type": payload["type"], "paymentId": data["paymentId"],
                          "state": data["state"], "mpesaReceipt": data.get("mpesaReceipt")}), file=out, flush=True)
        return web.Response(status=204)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/{tail:.*}", receive)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    secrets = [s.strip() for s in os.environ.get("WEBHOOK_SECRET", "").split(",") if s.strip()]
    if not secrets:
        parser.error("set WEBHOOK_SECRET to the endpoint's signing secret (whsec_...)")
    web.run_app(make_app(secrets), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()

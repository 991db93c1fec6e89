"""A webhook receiver for chargegw: verify, deduplicate, answer fast, work later.

Run it for real::

    pip install standardwebhooks
    WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 8000

and create the subscription with ``"url": "http://<this host>:8000/hooks"``. Without a
secret it runs a self-check: it starts on a free port, sends itself a signed delivery
and a forged one the way chargegw does, and exits 0 when it accepted the first and
refused the second.

What a receiver must do, whatever its language:

- verify ``webhook-signature`` over ``webhook-id.webhook-timestamp.body`` with the
  subscription's secret (the ``standardwebhooks`` package does it, and refuses
  timestamps more than 5 minutes off, which stops replays); during a secret rotation the
  header carries two signatures and either may match;
- deduplicate by ``webhook-id``: delivery is at least once, and a retry or a replay of
  the same event carries the same id;
- answer 2xx within the subscription's timeout, before doing the work: a slow answer is
  a failed attempt and the event comes again;
- expect events of one device in order, events of different devices interleaved.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import http.server
import json
import os
import secrets
import sys
import threading
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

#: webhook-ids seen (a real receiver keeps them in its database, with the work queue)
SEEN: set[str] = set()
RECEIVED: list[dict[str, Any]] = []


def make_handler(secret: str) -> type[http.server.BaseHTTPRequestHandler]:
    verifier = Webhook(secret)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                event = verifier.verify(body, headers)
            except WebhookVerificationError as exc:
                self._answer(400, f"bad signature: {exc}")
                return
            webhook_id = headers["webhook-id"]
            if webhook_id not in SEEN:  # a repeat is answered 2xx, and not done twice
                SEEN.add(webhook_id)
                RECEIVED.append(event)
                print(event["type"], json.dumps(event["data"], ensure_ascii=False))
            self._answer(204, "")

        def _answer(self, status: int, text: str) -> None:
            self.send_response(status)
            self.send_header("content-length", str(len(text.encode())))
            self.end_headers()
            self.wfile.write(text.encode())

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler


def self_check() -> int:
    """Send this receiver a delivery signed as chargegw signs it, and a forged one."""
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(secret))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = json.dumps(
            {
                "type": "order.settled",
                "timestamp": "2026-12-03T08:00:00Z",
                "data": {"id": 42, "order_no": "A1B2C3", "device_id": "04CEAA40", "port": 1},
            }
        )
        now = dt.datetime.now(dt.UTC)
        signature = Webhook(secret).sign("evt_42", now, body)
        good = {
            "webhook-id": "evt_42",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
            "content-type": "application/json",
        }
        statuses = [_post(server.server_address[1], body, good) for _ in range(2)]
        forged = _post(server.server_address[1], body.replace("42", "43"), good)
    finally:
        server.shutdown()
    ok = statuses == [204, 204] and forged == 400 and len(RECEIVED) == 1
    print("self-check", "passed" if ok else "FAILED", statuses, forged, len(RECEIVED))
    return 0 if ok else 1


def _post(port: int, body: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/hooks", body=body.encode(), headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    secret = os.environ.get("WEBHOOK_SECRET")
    if not secret:
        return self_check()
    server = http.server.ThreadingHTTPServer((args.host, args.port), make_handler(secret))
    print(f"receiving on http://{args.host}:{args.port}/", file=sys.stderr)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

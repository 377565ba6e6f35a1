#!/usr/bin/env python3
"""Service A of the demo: a Python app (standard library only) that calls Service B.

GET /        calls http://$SERVICE_B_HOST/ and answers "Service A <- <B's body>",
             or "Service A <- Service B | <error>" when the call fails.
GET /health  answers "UP".

Environment: PORT (default 8080), SERVICE_B_HOST (default service-b:8080).
The app knows nothing about the mesh; it only forwards the tracing headers it
receives, as every app in an Istio mesh must (header propagation).
"""

import os
import signal
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "8080"))
SERVICE_B_HOST = os.environ.get("SERVICE_B_HOST", "service-b:8080")
TIMEOUT_SECONDS = 10

# Headers forwarded to the next hop so that traces join up.
TRACING_HEADERS = (
    "x-request-id",
    "b3",
    "traceparent",
    "tracestate",
)
TRACING_PREFIXES = ("x-b3-",)


def tracing_headers(incoming):
    out = {}
    for name, value in incoming.items():
        lower = name.lower()
        if lower in TRACING_HEADERS or lower.startswith(TRACING_PREFIXES):
            out[lower] = value
    return out


def call_service_b(headers):
    """Returns the text to put after "Service A <- "."""
    request = urllib.request.Request(f"http://{SERVICE_B_HOST}/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:  # non-2xx answer from B
        try:
            body = e.read().decode("utf-8", errors="replace").strip()
        except Exception:
            body = ""
        return f"Service B | HTTP {e.code}: {body or e.reason}"
    except urllib.error.URLError as e:  # connection refused, DNS failure, ...
        return f"Service B | {e.reason}"
    except Exception as e:  # timeouts, resets, malformed answers
        return f"Service B | {e or type(e).__name__}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, with Content-Length on every answer
    server_version = "service-a"
    sys_version = ""

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.reply(200, "Service A <- " + call_service_b(tracing_headers(self.headers)) + "\n")
        elif path == "/health":
            self.reply(200, "UP")
        else:
            self.reply(404, "Page not found")

    def reply(self, status, text):
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # no per-request logging
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog (the default of 5 drops connections under load)


def main():
    # As PID 1 in a container, SIGTERM is ignored unless handled: exit promptly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = Server(("0.0.0.0", PORT), Handler)
    print(f"service-a listening on 0.0.0.0:{PORT}, calling http://{SERVICE_B_HOST}/", flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

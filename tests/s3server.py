"""A real S3 server on loopback for the tests: moto's ThreadedMotoServer, as s3fs's own
test suite uses, behind a small HTTP proxy that can inject the failures real stores
produce. Ray workers are other processes, so an in-process mock would not reach them."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
BAD_KEY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
    b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message>"
    b"</Error>"
)


def free_port() -> int:
    """A port free a moment ago: only for what cannot bind port 0 and report it (the
    ports given to `ray start`) and for an endpoint meant to have nothing listening."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    """Forwards every request to moto; ``fail_next`` answers the next N requests with
    503 SlowDown, ``stall_next`` holds the next N for ``stall_seconds``, and requests
    signed with ``deny_key`` get 403 InvalidAccessKeyId."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.fail_next = 0
        self.fail_every = 0  # with N > 0, every N-th request fails (a retry then succeeds)
        self.failed = 0
        self.deny_key: str | None = None
        self.stall_next = 0  # hold the next N requests this long before answering
        self.stall_seconds = 0.0
        self.stalled = 0
        self.requests = 0
        # Called with the request path before a GET is forwarded: a test's way to change
        # an object between a client's HEAD and its GET.
        self.before_get = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.requests += 1
                    every = proxy.fail_every and proxy.requests % proxy.fail_every == 0
                    fail = proxy.fail_next > 0 or bool(every)
                    if proxy.fail_next > 0:
                        proxy.fail_next -= 1
                    if fail:
                        proxy.failed += 1
                with proxy.lock:
                    stall = proxy.stall_next > 0
                    if stall:
                        proxy.stall_next -= 1
                        proxy.stalled += 1
                if stall:
                    time.sleep(proxy.stall_seconds)  # the client times out and retries
                auth = self.headers.get("Authorization", "")
                if proxy.deny_key and f"Credential={proxy.deny_key}/" in auth:
                    return self._reply(403, BAD_KEY)
                if fail:
                    return self._reply(503, SLOW_DOWN)
                if self.command == "GET" and proxy.before_get is not None:
                    proxy.before_get(self.path)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # HEAD has no body but reports the object's size: pass it through.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _reply(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # the port it bound
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class S3:
    """moto on a loopback port, with a FaultProxy in front of it; ``proxy=False``
    lets clients talk to moto directly (benchmarks: no Python relay in the path)."""

    def __init__(self, proxy: bool = True):
        from moto.server import ThreadedMotoServer

        # Port 0: each server binds a port of its own choosing and is asked which (a port
        # found free and released first could be taken by another process meanwhile).
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        self.moto_port = self.moto.get_host_and_port()[1]
        self.proxy = FaultProxy(self.moto_port) if proxy else None

    @property
    def endpoint(self) -> str:
        return self.proxy.endpoint if self.proxy else f"http://127.0.0.1:{self.moto_port}"

    def options(self, key: str = "testing") -> dict:
        return {
            "key": key,
            "secret": "not-a-real-secret-9f3c",
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": "us-west-2"},  # us-east-1 takes no constraint
        }

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options(), skip_instance_cache=True)

    def stop(self) -> None:
        if self.proxy:
            self.proxy.stop()
        self.moto.stop()

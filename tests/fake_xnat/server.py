"""HTTP front of the fake XNAT: transport, auth, fault injection, request log, admin API.

    python -m tests.fake_xnat.server --port P --state-dir DIR [--config JSON|PATH]
                                     [--host 127.0.0.1] [--port-file FILE]

--port 0 picks a free port; --port-file receives the port once the socket listens.
The admin API under /_fake/ needs no XNAT auth and is never subject to faults.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import html
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .api import SMALL_BODY_CAP, Api, Dropped, Response, json_response
from .state import Auth, XnatError, XnatState
from .uploads import BodyError, BodyReader

FAULT_KEYS = {"path_prefix", "method", "times", "status", "body", "content_type", "headers",
              "delay_seconds", "drop_connection_after_bytes", "process"}


@dataclass
class Fault:
    """One fault switch: matches requests by path prefix (and method), `times` times.

    status: answer this instead (the request is not processed, unless process=true), with
        `body`, `content_type` and extra `headers` (e.g. a Location).
    delay_seconds: wait this long before answering (the request itself is processed).
    drop_connection_after_bytes: read that much of the body, then reset the connection
        without answering (an import keeps the entries read so far, RECEIVING).
    process: handle the request normally, then answer `status` instead of the real answer,
        or, without status, drop the connection: the answer is lost but the work is done.
    times: -1 for every matching request.
    """

    id: int
    path_prefix: str = "/data/"
    method: str | None = None
    times: int = 1
    status: int | None = None
    body: str | None = None
    content_type: str = "text/plain"
    headers: dict[str, str] | None = None
    delay_seconds: float = 0.0
    drop_connection_after_bytes: int | None = None
    process: bool = False
    used: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.times < 0 or self.used < self.times) and path.startswith(
            self.path_prefix) and (self.method is None or self.method.upper() == method)

    def response(self) -> Response:
        status = self.status or 500
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        body = self.body if self.body is not None else f"{status} {reason}"
        return Response(status, body.encode(), self.content_type, dict(self.headers or {}))


class FaultTable:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.faults: list[Fault] = []
        self.next_id = 1

    def add(self, spec: dict[str, Any]) -> Fault:
        unknown = set(spec) - FAULT_KEYS
        if unknown:
            raise XnatError(400, f"unknown fault keys: {sorted(unknown)}")
        with self.lock:
            fault = Fault(id=self.next_id, **spec)
            self.next_id += 1
            self.faults.append(fault)
            return fault

    def take(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.used += 1
                    return fault
            return None

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def to_json(self) -> list[dict[str, Any]]:
        with self.lock:
            return [asdict(f) for f in self.faults]


class RequestLog:
    def __init__(self, size: int = 20000):
        self.lock = threading.Lock()
        self.items: deque[dict[str, Any]] = deque(maxlen=size)
        self.seq = 0

    def add(self, item: dict[str, Any]) -> None:
        with self.lock:
            self.seq += 1
            item["seq"] = self.seq
            self.items.append(item)

    def update(self, item: dict[str, Any], **changes: Any) -> None:
        with self.lock:
            item.update(changes)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()

    def to_json(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(item) for item in self.items]


def normalize(path: str) -> str:
    """XNAT aliases: /REST = /data, /data/archive/projects/... = /data/projects/..."""
    path = re.sub(r"/+", "/", path)
    if path == "/REST" or path.startswith("/REST/"):
        path = "/data" + path[5:]
    if path.startswith("/data/archive/"):
        path = "/data/" + path[len("/data/archive/"):]
    return path.rstrip("/") or "/"


class FakeXnatServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state_dir: Path,
                 config: dict[str, Any] | None):
        self.state = XnatState(config, state_dir)
        self.api = Api(self.state)
        self.faults = FaultTable()
        self.log = RequestLog()
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "FakeXNAT/1.0"
    sys_version = ""
    timeout = 600
    # like Tomcat (tcpNoDelay=true): headers and body go out as separate writes, and Nagle's
    # algorithm would hold the body for the client's delayed ACK (~40 ms per answer)
    disable_nagle_algorithm = True
    server: FakeXnatServer

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request is written by _record instead

    # ---- one request -----------------------------------------------------------------

    def _begin(self) -> None:
        parts = urlsplit(self.path)
        self.raw_path = unquote(parts.path)
        self.raw_query = parts.query
        self.query = dict(parse_qsl(parts.query, keep_blank_values=True))
        self.api_path = normalize(self.raw_path)
        self.fault: Fault | None = None
        self.intercept: Fault | None = None
        self.drop_limit: int | None = None
        self.auth: Auth | None = None
        self.status: int | None = None
        self.bytes_out = 0
        self.dropped = False
        self.logged: dict[str, Any] | None = None

    def _handle(self) -> None:
        self.started = time.monotonic()
        self._begin()
        resp: Response | None
        try:
            self.body = BodyReader(self.rfile, self.headers)
            resp = self._dispatch()
        except Dropped:
            resp = None
        except XnatError as exc:
            resp = self._error(exc)
        except BodyError as exc:
            self.body = BodyReader(self.rfile, {})  # can't find the end of it: answer, close
            self.close_connection = True
            resp = self._error(XnatError(400, str(exc)))
        except OSError:
            self._gone()
            resp = None
        except Exception:
            traceback.print_exc()
            resp = self._error(XnatError(500, "Internal Server Error"))
        if resp is not None:
            try:
                self._respond(resp)
            except (OSError, BodyError):
                self._gone()
        self._record()

    def _dispatch(self) -> Response:
        if self.api_path == "/_fake" or self.api_path.startswith("/_fake/"):
            return self._admin()
        fault = self.server.faults.take(self.command, self.raw_path)
        self.fault = fault
        if fault is not None and fault.drop_connection_after_bytes is not None:
            self.drop_limit = fault.drop_connection_after_bytes
            if not (self.command == "POST" and self.api_path == "/data/services/import"):
                self._drop_after_limit()
        elif fault is not None and fault.process:
            self.intercept = fault
        elif fault is not None and fault.status is not None:
            return fault.response()
        self.server.state.tick()
        self.auth = self._authenticate()
        handler, args = self.server.api.route(self.command, self.api_path)
        resp = handler(self, self.auth, **args)
        self._add_cookie(resp)
        return resp

    def _authenticate(self) -> Auth:
        user = password = None
        header = str(self.headers.get("Authorization", ""))
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            user, _, password = decoded.partition(":")
        sid = None
        try:
            morsel = SimpleCookie(str(self.headers.get("Cookie", ""))).get("JSESSIONID")
            sid = morsel.value if morsel else None
        except CookieError:
            pass
        return self.server.state.authenticate(user, password, sid)

    def _add_cookie(self, resp: Response) -> None:
        if self.auth is not None and self.auth.new_session:
            resp.headers.setdefault("Set-Cookie",
                                    f"JSESSIONID={self.auth.session_id}; Path=/; HttpOnly")

    # ---- Request protocol used by the Api --------------------------------------------

    def read_small(self) -> bytes:
        return self.body.read_all(SMALL_BODY_CAP)

    def drop(self) -> None:
        """Reset the connection without answering (SO_LINGER 0 makes close() send RST)."""
        self._gone()
        self._record()  # before the client can see the reset
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()
        except OSError:
            pass

    def _drop_after_limit(self) -> None:
        left = max(0, (self.drop_limit or 0) - self.body.received)
        if left and not self.body.done:
            for _ in self.body.chunks(left):
                pass
        self.drop()
        raise Dropped("fault: drop connection")

    def _gone(self) -> None:
        self.close_connection = True
        self.dropped = True

    # ---- answers ---------------------------------------------------------------------

    def _error(self, exc: XnatError) -> Response:
        if self.server.state.config.get("error_format") == "html":
            text = html.escape(exc.message)
            body = (f"<html><head><title>Status page</title></head><body><h3>{text}</h3>"
                    f"<p>{exc.status}</p></body></html>")
            resp = Response(exc.status, body.encode(), "text/html", dict(exc.headers))
        else:
            resp = Response(exc.status, exc.message.encode(), "text/plain", dict(exc.headers))
        self._add_cookie(resp)
        return resp

    def _respond(self, resp: Response) -> None:
        if self.drop_limit is not None:
            self._drop_after_limit()
        if not self.body.done:
            self.body.drain()  # keep-alive needs the whole body read before the answer
        if self.fault is not None and self.fault.delay_seconds:
            time.sleep(self.fault.delay_seconds)
        if self.intercept is not None:
            if self.intercept.status is None:
                self.drop()  # the work is done but the answer is lost
                return
            resp = self.intercept.response()
        self.status = resp.status
        self.bytes_out = len(resp.body)
        # Logged before the answer goes out: a client that has its answer finds the request
        # in the log (recording after the write let a quick /_fake/requests miss it).
        self._record()
        self.send_response(resp.status)
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(resp.body)

    def _record(self) -> None:
        """Add this request to the log once, when its outcome is known and before the client
        can learn it (the answer is written, or the connection reset, after this). A write
        that fails afterwards marks the entry dropped. start/end: time.monotonic() of the
        request's first byte read and of its outcome, for spans between requests."""
        if self.api_path.startswith("/_fake"):
            return
        if self.logged is not None:
            if self.dropped and not self.logged["dropped"]:
                self.server.log.update(self.logged, status=None, dropped=True)
            return
        end = time.monotonic()
        body = getattr(self, "body", None)
        item = {
            "time": time.time(), "method": self.command, "path": self.raw_path,
            "query": self.raw_query, "status": self.status,
            "bytes_in": body.received if body else 0, "bytes_out": self.bytes_out,
            "user": self.auth.user if self.auth else None,
            "auth": self.auth.mode if self.auth else None,
            "fault": self.fault.id if self.fault else None, "dropped": self.dropped,
            "duration_ms": round((end - self.started) * 1000, 1),
            "start": self.started, "end": end,
            "body_end": body.done_at if body else None,
        }
        self.logged = item
        self.server.log.add(item)
        print(f"{item['method']} {self.path} -> {item['status'] or 'DROPPED'} "
              f"in={item['bytes_in']} out={item['bytes_out']} {item['duration_ms']}ms",
              file=sys.stderr, flush=True)

    # ---- admin API -------------------------------------------------------------------

    def _json_body(self) -> Any:
        raw = self.read_small()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise XnatError(400, f"bad JSON: {exc}") from exc

    def _admin(self) -> Response:
        srv, path, method = self.server, self.api_path, self.command
        if path == "/_fake/health":
            return Response(200, b"ok")
        if path == "/_fake/state" and method == "GET":
            snap = srv.state.snapshot(digests=self.query.get("digests") == "1")
            snap["faults"] = srv.faults.to_json()
            snap["requests"] = srv.log.to_json() if self.query.get("log") != "0" else []
            return json_response(snap)
        if path == "/_fake/requests" and method == "GET":
            return json_response(srv.log.to_json())
        if path == "/_fake/reset" and method == "POST":
            payload = self._json_body()
            srv.state.reset(payload.get("config") if isinstance(payload, dict) else None)
            srv.faults.clear()
            srv.log.clear()
            return json_response({"reset": True})
        if path == "/_fake/expire_sessions" and method == "POST":
            return json_response({"expired": srv.state.expire_sessions()})
        if path == "/_fake/expire_tokens" and method == "POST":
            return json_response({"expired": srv.state.expire_tokens()})
        if path == "/_fake/faults":
            return self._faults(method)
        raise XnatError(404, f"No admin resource {method} {path}")

    def _faults(self, method: str) -> Response:
        table = self.server.faults
        if method == "GET":
            return json_response(table.to_json())
        if method == "DELETE":
            table.clear()
            return json_response([])
        specs = self._json_body()
        added = []
        for spec in specs if isinstance(specs, list) else [specs]:
            if not isinstance(spec, dict):
                raise XnatError(400, "a fault is a JSON object")
            if spec.pop("expire_sessions", False):
                self.server.state.expire_sessions()
            if spec.pop("expire_tokens", False):
                self.server.state.expire_tokens()
            if spec:
                added.append(asdict(table.add(spec)))
        return json_response(added)


def load_config(value: str | None) -> dict[str, Any] | None:
    """--config takes inline JSON or the path of a JSON file."""
    if not value:
        return None
    text = value if value.lstrip().startswith("{") else Path(value).read_text()
    return json.loads(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fake XNAT REST server for tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--config", help="inline JSON or a JSON file")
    ap.add_argument("--port-file", type=Path, help="write the bound port here when ready")
    args = ap.parse_args(argv)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    server = FakeXnatServer((args.host, args.port), args.state_dir, load_config(args.config))
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file.with_name(args.port_file.name + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    print(f"fake XNAT listening on http://{args.host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

"""Receivers of the daemon's notices, on 127.0.0.1 in the test's own process: a webhook
(http.server) and an SMTP server (aiosmtpd). Each can be stopped and started again on the
same port, to play a receiver that is down for a while."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.peers import HOST, free_port


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """Keeps every POST; answers `status` (200 by default)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.port = 0
        self.posts: list[Post] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/hooks/T0KEN-in-the-path"

    def start(self) -> Self:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.posts.append(Post(self.path, dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, self.port), Handler)  # reuses the address
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def received(self) -> list[Post]:
        with self.lock:
            return list(self.posts)

    def wait_for(self, count: int, timeout: float = 60) -> list[Post]:
        deadline = time.monotonic() + timeout
        while len(self.received()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        posts = self.received()
        assert len(posts) >= count, f"{len(posts)} of {count} POST(s) within {timeout} s"
        return posts


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: EmailMessage

    @property
    def body(self) -> str:
        part = self.message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())


class SmtpServer:
    """A real SMTP server (aiosmtpd). With `tls` (cert, key): STARTTLS required, and a login
    checked against `login` (user, password), only over TLS."""

    def __init__(self, tls: tuple[Path, Path] | None = None,
                 login: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.mails: list[Mail] = []
        self.logins: list[str] = []
        self.lock = threading.Lock()
        options: dict[str, Any] = {}
        if tls is not None:
            import ssl
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            options.update(tls_context=context, require_starttls=True)
        if login is not None:
            options.update(authenticator=self._authenticate(login), auth_require_tls=True)
        self.controller = Controller(self, hostname=HOST, port=self.port, **options)

    def _authenticate(self, login: tuple[str, str]) -> Any:
        def check(server: Any, session: Any, envelope: Any, mechanism: str,
                  data: Any) -> AuthResult:
            ok = isinstance(data, LoginPassword) and \
                (data.login.decode(), data.password.decode()) == login
            if ok:
                with self.lock:
                    self.logins.append(data.login.decode())
            return AuthResult(success=ok)
        return check

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.original_content or envelope.content,
                                     policy=policy.default)
        with self.lock:
            self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos),
                                   message))  # type: ignore[arg-type]
        return "250 OK"

    def start(self) -> Self:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def received(self) -> list[Mail]:
        with self.lock:
            return list(self.mails)

    def wait_for(self, count: int, timeout: float = 60) -> list[Mail]:
        deadline = time.monotonic() + timeout
        while len(self.received()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        mails = self.received()
        assert len(mails) >= count, f"{len(mails)} of {count} mail(s) within {timeout} s"
        return mails


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key), made by openssl: the CA bundle is itself."""
    cert, key = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    return cert, key

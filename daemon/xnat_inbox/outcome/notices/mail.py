"""A notice as a short plain-text email, through the target's SMTP server.

STARTTLS with the server's certificate verified (or against a CA bundle) unless the target
sets starttls: false; a login only with a password from a secret file or a credential.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from ...notifyconfig import NoticeTarget
from ...secrets import Secret, SecretError, read_secret
from .message import NoticeError


class Mail:
    def __init__(self, target: NoticeTarget) -> None:
        assert target.email is not None
        self.target = target
        self.settings = target.email
        self.host = target.host
        self._password: Secret | None = None

    def send(self, to: tuple[str, ...], subject: str, body: str) -> None:
        settings = self.settings
        message = EmailMessage()
        message["From"] = settings.sender
        message["To"] = ", ".join(to)
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=True)
        message["Message-ID"] = make_msgid(domain=settings.domain)
        message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to it
        message.set_content(body)
        try:
            with smtplib.SMTP(settings.smtp_host, settings.smtp_port,
                              timeout=self.target.timeout) as smtp:
                if settings.starttls:
                    smtp.starttls(context=self._tls())
                if settings.username:
                    smtp.login(settings.username, self._secret().reveal())
                smtp.send_message(message)
        except smtplib.SMTPNotSupportedError:
            raise NoticeError(f"{self.host} offers no STARTTLS (set starttls: false only for a "
                              "relay on this host or a trusted network)", False) from None
        except smtplib.SMTPAuthenticationError as exc:
            raise NoticeError(f"{self.host} refused the login of {settings.username} "
                              f"({exc.smtp_code})", False) from None
        except smtplib.SMTPRecipientsRefused as exc:
            codes = {code for code, _ in exc.recipients.values()}
            raise NoticeError(f"{self.host} refused the recipient(s) "
                              f"{', '.join(exc.recipients)} ({', '.join(map(str, codes))})",
                              any(code < 500 for code in codes)) from None
        except smtplib.SMTPResponseException as exc:
            reason = exc.smtp_error.decode("utf-8", "replace") if isinstance(
                exc.smtp_error, bytes) else str(exc.smtp_error)
            raise NoticeError(f"{self.host} answered {exc.smtp_code} {reason}",
                              exc.smtp_code < 500) from None
        except ssl.SSLError as exc:
            raise NoticeError(f"TLS to {self.host} failed ({exc.reason or exc}): set verify_tls "
                              "to the CA bundle that signed its certificate", True) from None
        except (OSError, smtplib.SMTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise NoticeError(f"cannot reach {self.host}: {reason}", True) from None

    def _tls(self) -> ssl.SSLContext:
        verify = self.target.verify_tls
        context = ssl.create_default_context(
            cafile=str(verify) if isinstance(verify, Path) else None)
        if verify is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _secret(self) -> Secret:
        if self._password is None:
            assert self.settings.password_file is not None
            try:
                self._password = read_secret(self.settings.password_file)
            except SecretError as exc:
                raise NoticeError(f"SMTP password: {exc}", True) from None
        return self._password

    def close(self) -> None:
        pass

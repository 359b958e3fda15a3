"""DICOM TLS: the SSL contexts for qrproxy's TLS port and for its associations to `tls: true` nodes.

The profile is the non-downgrading BCP 195 profile of DICOM PS3.15 (Annex B.9): TLS 1.2 and 1.3 only
(1.0 and 1.1 are refused, never negotiated down to), AEAD cipher suites with forward secrecy for
TLS 1.2 (ECDHE with AES-GCM or ChaCha20-Poly1305; no CBC, RC4, 3DES, NULL or anonymous suites),
no TLS compression, no renegotiation. TLS 1.3 suites are all AEAD and left to OpenSSL.

Certificates are checked here, once, when the config is loaded for `serve`/`check` (`problems()`),
so that a missing, unreadable, non-PEM, mismatched or expired file is a config error naming its key
instead of a failure at the first association. Handshake failures at run time are logged as one
`event=tls-handshake-failed` line with the peer and OpenSSL's reason, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qrproxy.logs import kv

log = logging.getLogger("qrproxy.tls")

# TLS 1.2 suites (OpenSSL names): ECDHE key exchange, AEAD only. `!aNULL:!eNULL` is belt and braces.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!RC4:!3DES"
HANDSHAKE_TIMEOUT = 30.0  # s: a peer that opens the TLS port and says nothing is dropped after this


class TlsError(Exception):
    """A certificate or key file cannot be used; `key` is the config key ("cert_file", ...)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    return ctx


def server_context(tls: Any) -> ssl.SSLContext:
    """The context for qrproxy's TLS port: its certificate, and with `tls.ca_file` a required,
    verified client certificate. Raises TlsError naming the bad key."""
    _check_files(tls)
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_identity(ctx, tls)
    if tls.ca_file is not None:
        _load_ca(ctx, tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: Any) -> ssl.SSLContext:
    """The context for associations to `tls: true` nodes: the peer is verified (chain against
    `tls.ca_file`, or the system store when absent, and host name/IP against the node's `host`), and
    qrproxy presents its own certificate for peers that require one."""
    _check_files(tls)
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED, check_hostname on
    _load_identity(ctx, tls)
    if tls.ca_file is not None:
        _load_ca(ctx, tls.ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return ctx


def problems(tls: Any) -> Iterator[tuple[str, str]]:
    """(key, message) for every unusable file of the `tls` section; building both contexts is the
    final proof (OpenSSL may refuse what parsed, e.g. a too-weak key)."""
    found = False
    for check in (_check_identity, _check_ca):
        try:
            check(tls)
        except TlsError as exc:
            found = True
            yield exc.key, str(exc)
    if not found:
        try:
            server_context(tls)
            client_context(tls)
        except TlsError as exc:
            yield exc.key, str(exc)


# --- checks ------------------------------------------------------------------------------------


def _read(key: str, path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsError(key, f"{path}: no such file") from None
    except IsADirectoryError:
        raise TlsError(key, f"{path}: is a directory, not a PEM file") from None
    except OSError as exc:
        raise TlsError(key, f"{path}: cannot read: {exc.strerror or exc}") from None


def _certs(key: str, path: Path) -> list[Any]:
    from cryptography import x509

    data = _read(key, path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsError(key, f"{path}: not a PEM certificate file (no BEGIN CERTIFICATE block)")
    try:
        return list(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise TlsError(key, f"{path}: not a valid PEM certificate: {exc}") from None


def _validity(cert: Any) -> tuple[dt.datetime, dt.datetime]:
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def _check_files(tls: Any) -> None:
    _check_identity(tls)
    _check_ca(tls)


def _check_identity(tls: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    now = dt.datetime.now(dt.timezone.utc)
    cert = _certs("cert_file", tls.cert_file)[0]
    start, end = _validity(cert)
    if end < now:
        raise TlsError("cert_file", f"{tls.cert_file}: certificate expired on {end:%Y-%m-%d %H:%M} UTC "
                                    f"({cert.subject.rfc4514_string()})")
    if start > now:
        raise TlsError("cert_file", f"{tls.cert_file}: certificate not valid before {start:%Y-%m-%d %H:%M} UTC")
    data = _read("key_file", tls.key_file)
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise TlsError("key_file", f"{tls.key_file}: not a PEM private key file (no BEGIN PRIVATE KEY block)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsError("key_file", f"{tls.key_file}: the private key is encrypted; qrproxy runs unattended "
                                   "and needs an unencrypted key (protect it with file permissions)") from None
    except (ValueError, Exception) as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise TlsError("key_file", f"{tls.key_file}: not a valid PEM private key: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise TlsError("key_file", f"{tls.key_file}: the private key does not match the certificate in "
                                   f"{tls.cert_file}")


def _check_ca(tls: Any) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if tls.ca_file is not None:
        cas = _certs("ca_file", tls.ca_file)
        if not any(_validity(c)[0] <= now <= _validity(c)[1] for c in cas):
            raise TlsError("ca_file", f"{tls.ca_file}: no certificate in it is currently valid (all expired "
                                      "or not yet valid)")


def _load_identity(ctx: ssl.SSLContext, tls: Any) -> None:
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except ssl.SSLError as exc:
        raise TlsError("key_file", f"{tls.cert_file} / {tls.key_file}: OpenSSL refuses the pair: "
                                   f"{ssl_reason(exc)}") from None
    except OSError as exc:
        raise TlsError("cert_file", f"{tls.cert_file}: {exc.strerror or exc}") from None


def _load_ca(ctx: ssl.SSLContext, path: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError("ca_file", f"{path}: OpenSSL refuses the CA bundle: {ssl_reason(exc)}") from None


# --- run time ----------------------------------------------------------------------------------


def ssl_reason(exc: BaseException) -> str:
    """OpenSSL's reason in words ("tlsv1 alert protocol version", "certificate verify failed: ...")."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    text = str(exc)
    m = re.search(r"\] (.*?)(?: \(_ssl\.c:\d+\))?$", text)
    if m:
        return m.group(1)
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return text or type(exc).__name__


def server_handshake(sock: Any, peer: Any, timeout: float | None = None) -> bool:
    """Complete the server-side handshake of an accepted TLS socket in the association's own thread
    (not in the accept loop, where one silent peer would stall everyone). False, logged, on failure."""
    addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
    before = sock.gettimeout()
    try:
        sock.settimeout(timeout or HANDSHAKE_TIMEOUT)
        sock.do_handshake()
        sock.settimeout(before)
    except (ssl.SSLError, OSError) as exc:
        reason = "handshake timed out" if isinstance(exc, TimeoutError) else ssl_reason(exc)
        log.warning(kv(event="tls-handshake-failed", peer=addr, reason=reason))
        return False
    log.debug(kv(event="tls-handshake", peer=addr, version=sock.version(), cipher=(sock.cipher() or ("",))[0]))
    return True


_clients: dict[tuple[str, str, str], ssl.SSLContext] = {}


def node_client_context(tls: Any) -> ssl.SSLContext:
    """`client_context(tls)`, built once per process and shared by every outbound association
    (an SSLContext is safe to share between threads; rebuilding it would re-read files per C-STORE)."""
    key = (str(tls.cert_file), str(tls.key_file), str(tls.ca_file))
    ctx = _clients.get(key)
    if ctx is None:
        ctx = _clients.setdefault(key, client_context(tls))
    return ctx


EXPIRY_WARNING_DAYS = 30


def log_certificate_expiry(tls: Any) -> None:
    """At start: say when qrproxy's certificate expires, as a warning within EXPIRY_WARNING_DAYS, so
    that a site running unattended renews it before every TLS peer starts failing."""
    try:
        cert = _certs("cert_file", tls.cert_file)[0]
    except TlsError:
        return  # load_config has already refused it
    end = cert.not_valid_after_utc
    days = (end - dt.datetime.now(dt.timezone.utc)).days
    level = logging.WARNING if days < EXPIRY_WARNING_DAYS else logging.INFO
    log.log(level, kv(event="tls-certificate", subject=cert.subject.rfc4514_string(),
                      expires=f"{end:%Y-%m-%d}", days_left=days))

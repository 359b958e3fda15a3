"""DICOM TLS (BCP 195 non-downgrading profile) in and out, against real peers on loopback.

Certificates are made per session with the `cryptography` package: a CA, a server/client certificate
for qrproxy (SAN 127.0.0.1 and localhost), a modality's client certificate, one signed by another CA,
and an expired one. Inbound peers are DCMTK echoscu/storescu with +tls, Orthanc 1.10 as a TLS SCU,
and Python's ssl module where a forbidden protocol version must be forced; outbound peers are Orthanc
with DicomTlsEnabled. Outcomes are judged by what the peers report (exit codes, Orthanc's REST
API, storescp's files) and by qrproxy's log where the point is that qrproxy logged a refusal.
The two end-to-end store tests run on SQLite and PostgreSQL (``db_url``).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pynetdicom import AE
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

import dicomgen
from peers import LOCALHOST, OrthancHTTPError, OrthancServer, QrproxyProcess, StoreSCP, dcmtk, free_port, run_cli
from support import echoscu, wait_until
from support import proxy_config as base_proxy_config

STORESCU = dcmtk("storescu")


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path            # CA certificate qrproxy trusts
    server_crt: Path    # qrproxy's (and Orthanc's) certificate, SAN 127.0.0.1 / localhost
    server_key: Path
    client_crt: Path    # a modality's certificate signed by the CA
    client_key: Path
    other_ca: Path      # a CA qrproxy does not trust
    other_crt: Path     # a client certificate signed by other_ca
    other_key: Path
    expired_crt: Path   # signed by the CA, expired yesterday
    expired_key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qrproxy tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_key: Any, cn: str, issuer_key: Any, issuer: x509.Name | None, *, ca: bool = False,
          san: bool = False, days: tuple[int, int] = (-1, 365)) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(_name(cn))
         .issuer_name(issuer or _name(cn))
         .public_key(subject_key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now + dt.timedelta(days=days[0]))
         .not_valid_after(now + dt.timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
    else:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    if san:
        import ipaddress

        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(d: Path, stem: str, cert: x509.Certificate, key: Any | None) -> tuple[Path, Path | None]:
    crt = d / f"{stem}.crt"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return crt, None
    kp = d / f"{stem}.key"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    kp.chmod(0o600)
    return crt, kp


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = _key(), _key()
    ca = _cert(ca_key, "qrproxy test CA", ca_key, None, ca=True, days=(-1, 365))
    other_ca = _cert(other_ca_key, "some other CA", other_ca_key, None, ca=True, days=(-1, 365))
    ca_path, _ = _write(d, "ca", ca, None)
    other_ca_path, _ = _write(d, "other-ca", other_ca, None)
    sk, ck, ok, ek = _key(), _key(), _key(), _key()
    server = _write(d, "server", _cert(sk, "qrproxy", ca_key, ca.subject, san=True), sk)
    client = _write(d, "client", _cert(ck, "MODCT", ca_key, ca.subject), ck)
    other = _write(d, "other", _cert(ok, "intruder", other_ca_key, other_ca.subject), ok)
    expired = _write(d, "expired", _cert(ek, "qrproxy", ca_key, ca.subject, san=True, days=(-30, -1)), ek)
    return Pki(d, ca_path, server[0], server[1], client[0], client[1], other_ca_path, other[0], other[1],
               expired[0], expired[1])  # type: ignore[arg-type]


# --- helpers ----------------------------------------------------------------------------------


def _dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def proxy_config(db_url: str, pki: Pki, nodes: dict[str, Any], *, ca: bool = True, **extra: Any) -> dict[str, Any]:
    """support.proxy_config with a TLS port on the test PKI (`ca`: client certificates required)."""
    tls = {"port": free_port(), "cert_file": str(pki.server_crt), "key_file": str(pki.server_key)}
    if ca:
        tls["ca_file"] = str(pki.ca)
    cfg = base_proxy_config(db_url, nodes, tls=tls)
    cfg.update(extra)
    return cfg


def tls_port(proc: QrproxyProcess) -> int:
    return int(proc.config["tls"]["port"])


def wait_tls_listening(proc: QrproxyProcess, timeout: float = 30.0) -> None:
    wait_until(lambda: "tls=true" in proc.log_text(), timeout, f"{proc.name}: no TLS listening line")


def storescu(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORESCU, "-v", "-aet", "MODCT", "-aec", "QRPROXY", *tls, LOCALHOST, str(port),
                           *map(str, files)], capture_output=True, text=True, env=_dcmtk_env(), timeout=120)


def dcmtk_tls(pki: Pki, key: Path | None = None, crt: Path | None = None) -> list[str]:
    return ["+tls", str(key or pki.client_key), str(crt or pki.client_crt), "+cf", str(pki.ca)]


def handshake_failures(proc: QrproxyProcess) -> list[str]:
    return [ln for ln in proc.log_text().splitlines() if "event=tls-handshake-failed" in ln]


def python_tls_echo(port: int, ctx: ssl.SSLContext, timeout: float = 30) -> bool:
    """C-ECHO through pynetdicom with a caller-built SSL context; True when answered Success.
    `timeout` also bounds the TLS handshake (pynetdicom handshakes inside connect)."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(LOCALHOST, port, ae_title="QRPROXY", tls_args=(ctx, LOCALHOST))
    try:
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        return getattr(status, "Status", None) == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def python_tls_find(port: int, ctx: ssl.SSLContext, study_uid: str) -> list[Any]:
    """Study-level C-FIND over TLS for one Study Instance UID; the matches."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = ae.dimse_timeout = 30
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.NumberOfStudyRelatedInstances = ""
    assoc = ae.associate(LOCALHOST, port, ae_title="QRPROXY", tls_args=(ctx, LOCALHOST))
    try:
        assert assoc.is_established, "C-FIND association over TLS failed"
        out = []
        for status, match in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
            if match is not None:
                out.append(match)
        assoc.release()
        return out
    finally:
        ae.shutdown()


def client_ctx(pki: Pki, crt: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.ca))
    if crt is not None:
        ctx.load_cert_chain(str(crt), str(key))
    return ctx


def orthanc_tls(pki: Pki) -> dict[str, Any]:
    return {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.server_crt),
        "DicomTlsPrivateKey": str(pki.server_key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'qrproxy.sqlite3'}"


# --- inbound: DCMTK -----------------------------------------------------------------------------


def test_dcmtk_echo_and_store_over_tls_are_forwarded(db_url: str, pki: Pki, tmp_path: Path,
                                                      qrproxy: Callable[..., QrproxyProcess],
                                                      storescp: StoreSCP) -> None:
    """echoscu/storescu +tls with a CA-signed client certificate reach qrproxy's TLS port; the
    instances are spooled and forwarded to a plain storescp node."""
    nodes = {"PACS": {"ae_title": storescp.aet, "host": storescp.host, "port": storescp.port, "roles": ["store"]}}
    proc = qrproxy(proxy_config(db_url, pki, nodes))
    wait_tls_listening(proc)
    r = echoscu(tls_port(proc), *dcmtk_tls(pki))
    assert r.returncode == 0, r.stdout + r.stderr
    datasets = dicomgen.make_study(1, 3)
    files = dicomgen.write_all(datasets, tmp_path / "in")
    r = storescu(tls_port(proc), files, *dcmtk_tls(pki))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("Received Store Response (Success)") + r.stderr.count("Received Store Response (Success)") == 3
    got = storescp.wait_for_files(3, timeout=60)
    assert sorted(p.name.split(".", 1)[1] for p in got) == sorted(dicomgen.uids(datasets))
    # indexed: a C-FIND over the TLS port finds the study in qrproxy's cache
    matches = python_tls_find(tls_port(proc), client_ctx(pki, pki.client_crt, pki.client_key),
                              datasets[0].StudyInstanceUID)
    assert [m.NumberOfStudyRelatedInstances for m in matches] == [3]
    assert not handshake_failures(proc)


def test_client_certificate_from_another_ca_is_refused(pki: Pki, tmp_path: Path,
                                                       qrproxy: Callable[..., QrproxyProcess]) -> None:
    """With ca_file set, a certificate signed by another CA, or none at all, gets no association;
    a trusted client right after still does."""
    proc = qrproxy(proxy_config(sqlite_url(tmp_path), pki, {}))
    wait_tls_listening(proc)
    port = tls_port(proc)
    r = echoscu(port, *dcmtk_tls(pki, pki.other_key, pki.other_crt))
    assert r.returncode != 0, r.stdout + r.stderr
    assert not python_tls_echo(port, client_ctx(pki))  # no client certificate at all
    fails = wait_until(lambda: len(handshake_failures(proc)) >= 2 and handshake_failures(proc), 60,
                       "two tls-handshake-failed lines")
    assert all("peer=127.0.0.1:" in ln for ln in fails)
    assert any("certificate" in ln for ln in fails), fails
    assert "Traceback" not in proc.log_text()
    assert python_tls_echo(port, client_ctx(pki, pki.client_crt, pki.client_key))
    r = echoscu(port, *dcmtk_tls(pki))
    assert r.returncode == 0, r.stdout + r.stderr


def test_without_ca_file_clients_need_no_certificate(pki: Pki, tmp_path: Path,
                                                     qrproxy: Callable[..., QrproxyProcess]) -> None:
    """No tls.ca_file: TLS for confidentiality only, the client is not asked for a certificate."""
    proc = qrproxy(proxy_config(sqlite_url(tmp_path), pki, {}, ca=False))
    wait_tls_listening(proc)
    assert python_tls_echo(tls_port(proc), client_ctx(pki))
    r = echoscu(tls_port(proc), "+tla", "+cf", str(pki.ca))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_old_protocol_versions_and_weak_ciphers_are_refused(pki: Pki, tmp_path: Path,
                                                            qrproxy: Callable[..., QrproxyProcess]) -> None:
    """A client capped at TLS 1.1, or offering only CBC suites on TLS 1.2, is refused; TLS 1.2 with
    an AEAD suite and TLS 1.3 are accepted, and the server keeps serving throughout."""
    proc = qrproxy(proxy_config(sqlite_url(tmp_path), pki, {}))
    wait_tls_listening(proc)
    port = tls_port(proc)

    old = client_ctx(pki, pki.client_crt, pki.client_key)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL 3 offer TLS 1.1 at all
    assert not python_tls_echo(port, old)
    fails = wait_until(lambda: handshake_failures(proc), 60, "a tls-handshake-failed line")
    assert "version" in fails[-1] or "protocol" in fails[-1], fails

    cbc = client_ctx(pki, pki.client_crt, pki.client_key)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:AES128-SHA256:@SECLEVEL=0")
    assert not python_tls_echo(port, cbc)
    wait_until(lambda: len(handshake_failures(proc)) >= 2, 60, "a second tls-handshake-failed line")

    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ok = client_ctx(pki, pki.client_crt, pki.client_key)
        ok.minimum_version = ok.maximum_version = version
        assert python_tls_echo(port, ok), version
    assert proc.running
    assert "Traceback" not in proc.log_text()


def test_plain_dicom_to_tls_port_fails_and_plain_port_still_works(pki: Pki, tmp_path: Path,
                                                                 qrproxy: Callable[..., QrproxyProcess]) -> None:
    proc = qrproxy(proxy_config(sqlite_url(tmp_path), pki, {}))
    wait_tls_listening(proc)
    r = echoscu(tls_port(proc))
    assert r.returncode != 0, r.stdout + r.stderr
    wait_until(lambda: handshake_failures(proc), 60, "a tls-handshake-failed line")
    r = echoscu(proc.port)
    assert r.returncode == 0, r.stdout + r.stderr
    # and TLS to the plain port is no DICOM either
    r = echoscu(proc.port, *dcmtk_tls(pki))
    assert r.returncode != 0, r.stdout + r.stderr
    r = echoscu(proc.port)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]


def test_silent_peer_does_not_block_the_tls_port(pki: Pki, tmp_path: Path,
                                                 qrproxy: Callable[..., QrproxyProcess]) -> None:
    """A peer that connects and never starts the handshake must not hold up other clients (the
    handshake is not done in the accepting thread)."""
    proc = qrproxy(proxy_config(sqlite_url(tmp_path), pki, {}))
    wait_tls_listening(proc)
    with socket.create_connection((LOCALHOST, tls_port(proc)), timeout=10):
        time.sleep(0.5)  # the silent connection is accepted first
        # qrproxy gives a silent peer acse_timeout (30 s) to handshake; 15 s here would run out
        # if that wait were in the accepting thread
        assert python_tls_echo(tls_port(proc), client_ctx(pki, pki.client_crt, pki.client_key), timeout=15)
        r = echoscu(tls_port(proc), *dcmtk_tls(pki))
        assert r.returncode == 0, r.stdout + r.stderr


# --- Orthanc as TLS peer -----------------------------------------------------------------------


def test_forward_to_orthanc_over_tls(db_url: str, pki: Pki, tmp_path: Path,
                                     qrproxy: Callable[..., QrproxyProcess],
                                     orthanc_factory: Callable[..., OrthancServer]) -> None:
    """A node with tls: true: qrproxy forwards C-STORE to Orthanc's TLS-only DICOM port, presenting
    its own certificate (Orthanc requires one) and verifying Orthanc's against tls.ca_file."""
    orthanc = orthanc_factory(modalities={"QRPROXY": ("QRPROXY", LOCALHOST, 1)}, config_overrides=orthanc_tls(pki))
    nodes = {"PACS": {"ae_title": orthanc.aet, "host": LOCALHOST, "port": orthanc.dicom_port,
                      "roles": ["store"], "tls": True}}
    proc = qrproxy(proxy_config(db_url, pki, nodes))
    # the node check echo at start goes over TLS as well
    wait_until(lambda: "event=node-check" in proc.log_text(), 60, "node-check line")
    assert "result=ok" in [ln for ln in proc.log_text().splitlines() if "event=node-check" in ln][0]
    datasets = dicomgen.make_study(1, 2)
    files = dicomgen.write_all(datasets, tmp_path / "in")
    r = storescu(proc.port, files)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until(lambda: len(orthanc.instances()) == 2, 60, "2 instances in Orthanc")
    got = sorted(orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.instances())
    assert got == sorted(dicomgen.uids(datasets))
    # Orthanc's DICOM port is TLS-only: the plain association a node without tls would make fails
    r = echoscu(orthanc.dicom_port, aec=orthanc.aet)
    assert r.returncode != 0


@pytest.mark.parametrize("case", ["other-ca", "wrong-name"])
def test_upstream_with_an_untrusted_certificate_gets_nothing(case: str, pki: Pki, tmp_path: Path,
                                                            qrproxy: Callable[..., QrproxyProcess],
                                                            orthanc_factory: Callable[..., OrthancServer]) -> None:
    """qrproxy verifies a tls node: Orthanc presenting a certificate from a CA not in tls.ca_file,
    or one from the right CA that does not name 127.0.0.1, receives no instance; the failure is
    logged without a traceback."""
    crt, key, why = {
        "other-ca": (pki.other_crt, pki.other_key, "unable to get local issuer certificate"),
        "wrong-name": (pki.client_crt, pki.client_key, "mismatch"),
    }[case]
    overrides = {**orthanc_tls(pki), "DicomTlsCertificate": str(crt), "DicomTlsPrivateKey": str(key)}
    orthanc = orthanc_factory(modalities={"QRPROXY": ("QRPROXY", LOCALHOST, 1)}, config_overrides=overrides)
    nodes = {"PACS": {"ae_title": orthanc.aet, "host": LOCALHOST, "port": orthanc.dicom_port,
                      "roles": ["store"], "tls": True}}
    proc = qrproxy(proxy_config(sqlite_url(tmp_path), pki, nodes))
    files = dicomgen.write_all([dicomgen.make_ct()], tmp_path / "in")
    r = storescu(proc.port, files)
    assert r.returncode == 0, r.stdout + r.stderr  # accepted into the spool
    lines = wait_until(lambda: [ln for ln in proc.log_text().splitlines()
                                if "event=tls-handshake-failed" in ln and "direction=outbound" in ln], 30,
                       "an outbound tls-handshake-failed line")
    assert "certificate verify failed" in lines[0] and why in lines[0], lines
    check = wait_until(lambda: [ln for ln in proc.log_text().splitlines() if "event=node-check" in ln], 30,
                       "the node-check line")
    assert "result=ok" not in check[0] and "tls=true" in check[0], check
    assert "TLS handshake failed: certificate verify failed" in check[0] and why in check[0], check
    wait_until(lambda: "event=node-down node=PACS" in proc.log_text(), 30, "the forwarder's node-down line")
    assert orthanc.instances() == []
    assert "Traceback" not in proc.log_text()


def test_orthanc_as_tls_scu_to_qrproxy(pki: Pki, tmp_path: Path, qrproxy: Callable[..., QrproxyProcess],
                                       orthanc_factory: Callable[..., OrthancServer],
                                       storescp: StoreSCP) -> None:
    """Orthanc with UseDicomTls for the modality QRPROXY: C-ECHO and C-STORE to qrproxy's TLS port,
    the instance is then forwarded to a plain storescp node."""
    nodes = {"PACS": {"ae_title": storescp.aet, "host": storescp.host, "port": storescp.port, "roles": ["store"]}}
    proc = qrproxy(proxy_config(sqlite_url(tmp_path), pki, nodes))
    wait_tls_listening(proc)
    orthanc = orthanc_factory(config_overrides=orthanc_tls(pki))
    orthanc.add_modality("QRPROXY", "QRPROXY", LOCALHOST, tls_port(proc), UseDicomTls=True)
    orthanc.echo_modality("QRPROXY")
    ds = dicomgen.make_ct()
    uploaded = orthanc.upload(dicomgen.encode(ds))
    orthanc.store_to_modality("QRPROXY", [uploaded["ID"]])
    got = storescp.wait_for_files(1, timeout=60)
    assert got[0].name.split(".", 1)[1] == ds.SOPInstanceUID
    # the same modality without TLS cannot use the TLS port
    orthanc.add_modality("QRPLAIN", "QRPROXY", LOCALHOST, tls_port(proc))
    with pytest.raises(OrthancHTTPError):
        orthanc.echo_modality("QRPLAIN")


# --- configuration errors -----------------------------------------------------------------------


def _check(tmp_path: Path, cfg: dict[str, Any], prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    import yaml

    path = tmp_path / "qrproxy.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if not prefix:
        return run_cli(path, "check")
    return subprocess.run([*prefix, sys.executable, "-m", "qrproxy", "--config", str(path), "check"],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


#: Run as root without the capabilities that let root read any file (CI runs as root): file
#: permissions then apply to it as to any user. util-linux's setpriv, on every Debian system.
WITHOUT_DAC_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
                        "--inh-caps=-dac_override,-dac_read_search")


def _unreadable_prefix(locked: Path) -> tuple[str, ...]:
    """() when `locked` is unreadable already; the setpriv prefix when root can read it but not
    under setpriv; skip when neither holds (no setpriv)."""
    if not os.access(locked, os.R_OK):
        return ()
    probe = subprocess.run([*WITHOUT_DAC_OVERRIDE, "cat", str(locked)], capture_output=True)
    if probe.returncode != 0 and b"Permission denied" in probe.stderr:
        return WITHOUT_DAC_OVERRIDE
    pytest.skip(f"cannot make a file unreadable here: {probe.stderr.decode(errors='replace')[:200]}")


@pytest.mark.parametrize("case", ["missing-cert", "cert-not-pem", "expired-cert", "key-mismatch",
                                  "key-not-pem", "missing-key", "missing-ca", "ca-not-pem", "key-unreadable"])
def test_check_names_the_bad_tls_key(case: str, pki: Pki, tmp_path: Path) -> None:
    cfg = proxy_config(sqlite_url(tmp_path), pki, {})
    tls = cfg["tls"]
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not PEM\n")
    key = {
        "missing-cert": ("cert_file", str(tmp_path / "nope.crt")),
        "cert-not-pem": ("cert_file", str(junk)),
        "expired-cert": ("cert_file", str(pki.expired_crt)),
        "key-mismatch": ("key_file", str(pki.client_key)),
        "key-not-pem": ("key_file", str(junk)),
        "missing-key": ("key_file", str(tmp_path / "nope.key")),
        "missing-ca": ("ca_file", str(tmp_path / "nope-ca.pem")),
        "ca-not-pem": ("ca_file", str(junk)),
        "key-unreadable": ("key_file", str(tmp_path / "locked.key")),
    }[case]
    if case == "expired-cert":
        tls["key_file"] = str(pki.expired_key)
    prefix: tuple[str, ...] = ()
    if case == "key-unreadable":
        locked = tmp_path / "locked.key"
        locked.write_bytes(pki.server_key.read_bytes())
        locked.chmod(0)
        prefix = _unreadable_prefix(locked)
    tls[key[0]] = key[1]
    r = _check(tmp_path, cfg, prefix)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"tls.{key[0]}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # and serve refuses to start the same way
    proc = subprocess.run([*prefix, *QrproxyProcess(tmp_path / "serve", cfg).argv()], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"tls.{key[0]}" in proc.stderr


def test_check_accepts_good_tls_and_wants_a_tls_section_for_tls_nodes(pki: Pki, tmp_path: Path) -> None:
    node = {"ae_title": "PACS", "host": LOCALHOST, "port": 104, "roles": ["store"], "tls": True}
    cfg = proxy_config(sqlite_url(tmp_path), pki, {"PACS": node})
    r = _check(tmp_path, cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    del cfg["tls"]
    r = _check(tmp_path, cfg)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "nodes.PACS.tls" in r.stderr, r.stderr


def test_tls_port_with_several_workers(pki: Pki, tmp_path: Path, qrproxy: Callable[..., QrproxyProcess]) -> None:
    """workers: 2 — every worker listens on the TLS port too (SO_REUSEPORT, as on the plain port)."""
    proc = qrproxy(proxy_config(sqlite_url(tmp_path), pki, {}, workers=2))
    wait_until(lambda: proc.log_text().count("tls=true") >= 2, 60, "two TLS listening lines")
    for _ in range(4):
        r = echoscu(tls_port(proc), *dcmtk_tls(pki))
        assert r.returncode == 0, r.stdout + r.stderr
    assert "Address already in use" not in proc.log_text()

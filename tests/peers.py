"""Real DICOM peers for the test suite, run as subprocesses on free loopback ports.

Nothing here imports pytest: the helpers are usable from a REPL or a benchmark script too.

Every process is started in its own session (``start_new_session=True``) with stdout and stderr
captured to a log file, and is stopped by its own PID (and process group, which has the same id):
SIGTERM first, SIGKILL after a timeout. Whatever is still running when the interpreter exits is
stopped by an ``atexit`` safety net, so a failed or interrupted test does not leave peers behind.

Peers:
    OrthancServer  /usr/sbin/Orthanc with a generated orthanc.json (DICOM + REST on free ports)
    StoreSCP       DCMTK storescp writing received objects to a directory
    WorklistSCP    DCMTK wlmscpfs serving .wl files from a directory
    QrproxyProcess ``python -m qrproxy --config FILE serve``
PostgreSQL:
    postgres_url(), create_database(), drop_database()

DCMTK tools are resolved from /usr/bin explicitly: pip's pynetdicom installs its own ``echoscu``,
``storescu`` ... into the Python bin directory, which comes first on PATH.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DCMTK_PATH = "/usr/bin:/bin"
ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
ORTHANC_WORKLIST_PLUGIN = ORTHANC_PLUGIN_DIR / "libModalityWorklists.so"
DEFAULT_PG_URL = "postgresql+psycopg://qrproxy:qrproxy@127.0.0.1:5432/postgres"

LOCALHOST = "127.0.0.1"


class PeerError(RuntimeError):
    """A peer failed to start or misbehaved; the message carries the tail of its log."""


# --- Ports and binaries -----------------------------------------------------------------------

_handed_out: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (and not handed out before in this process).

    There is an unavoidable race between closing the probe socket and the peer binding the port;
    the peer classes retry with fresh ports when a start fails because the address is in use.
    """
    with _port_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((LOCALHOST, 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise PeerError("could not find a free TCP port")


def dcmtk(tool: str) -> str:
    """Absolute path of a DCMTK command-line tool in /usr/bin (never pynetdicom's namesake)."""
    path = shutil.which(tool, path=DCMTK_PATH)
    if path is None:
        raise PeerError(f"DCMTK tool {tool!r} not found in {DCMTK_PATH} (apt-get install dcmtk)")
    return path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP ``port`` (Linux /proc); None when /proc is unavailable."""
    inodes: set[str] = set()
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                found_table = True
                for line in f:
                    fields = line.split()
                    # local_address is HEXIP:HEXPORT, st 0A is LISTEN, field 9 the inode
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes if found_table else None


def port_owned_by(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` (or a process in its group) listens on TCP ``port``; None if unknown."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    if not inodes:
        return False

    def owns(cand: int) -> bool:
        try:
            fds = os.listdir(f"/proc/{cand}/fd")
        except OSError:
            return False
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{cand}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
        return False

    if owns(pid):
        return True
    # forked workers of a peer that leads its own process group
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                if os.getpgid(int(entry)) == pid and owns(int(entry)):
                    return True
            except OSError:
                continue
    return False


def wait_for_port(host: str, port: int, timeout: float = 30.0, proc: Any = None) -> None:
    """Poll until ``host:port`` accepts TCP connections.

    ``proc`` may be a Peer (its log tail goes into the error) or a ``subprocess.Popen``: when it
    exits before the port opens, fail at once instead of waiting out the timeout. With ``proc``,
    the listening socket must also belong to it (Linux), so a stranger that took the port in the
    race after free_port() is not mistaken for the peer.
    """
    deadline = time.monotonic() + timeout
    popen = None if proc is None else (proc.popen if isinstance(proc, Peer) else proc)
    while True:
        if popen is not None and popen.poll() is not None:
            raise PeerError(
                f"{_describe(proc)} exited with code {popen.returncode} before "
                f"{host}:{port} accepted connections{_tail_for(proc)}"
            )
        if port_open(host, port, timeout=0.5) and (popen is None or port_owned_by(popen.pid, port) is not False):
            return
        if time.monotonic() >= deadline:
            raise PeerError(f"{host}:{port} did not accept connections within {timeout:.0f} s" + _tail_for(proc))
        time.sleep(0.05)


def _describe(proc: Any) -> str:
    return proc.name if isinstance(proc, Peer) else f"process {getattr(proc, 'pid', '?')}"


def _tail_for(proc: Any, lines: int = 60) -> str:
    if isinstance(proc, Peer):
        return f"\n--- last lines of {proc.log_path} ---\n{proc.log_tail(lines)}"
    return ""


# --- Process management -----------------------------------------------------------------------

_running: set[Peer] = set()
_running_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    with _running_lock:
        peers = list(_running)
    for peer in peers:
        try:
            peer.stop(timeout=3)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_stop_all_at_exit)


#: lower-case log texts meaning "the port was taken" (DCMTK, Orthanc, Python)
_ADDRESS_IN_USE_MARKERS = (
    "already in use",  # storescp, Python (errno 98), Orthanc ("privileged or already in use")
    "tcp initialization error",  # DCMTK
    "initialization of network connection failed",  # wlmscpfs 3.6.7 says only this
    "cannot bind",
    "cannot listen",
    "eaddrinuse",
)


class Peer:
    """A subprocess with a log file, started in its own session and stopped by PID.

    Subclasses build ``argv()`` and may override ``_wait_ready()``. ``start()`` may be called
    again after ``stop()``; the log file is appended to, with a marker line per start.
    """

    name = "peer"
    stop_timeout = 10.0
    #: False: stop() sends SIGKILL at once (for peers whose orderly shutdown is slow and whose
    #: state in the temporary directory does not matter); stop(graceful=True) still asks nicely.
    graceful_stop = True
    start_timeout = 30.0
    #: how many times start() re-picks ports when the peer dies on an address already in use
    port_retries = 3

    def __init__(self, tmpdir: str | os.PathLike[str], name: str | None = None):
        if name:
            self.name = name
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"{self.name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_file = None

    # -- to override
    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        # DCMTK and Orthanc leave Nagle on unless TCP_NODELAY=1: ~40 ms per DIMSE round trip.
        return dict(os.environ, TCP_NODELAY="1")

    def cwd(self) -> Path:
        return self.dir

    def _wait_ready(self, timeout: float) -> None:
        raise NotImplementedError

    def _pick_new_ports(self) -> bool:
        """Choose fresh ports after an address-in-use failure; False when ports are fixed."""
        return False

    # -- lifecycle
    def start(self, timeout: float | None = None) -> Peer:
        timeout = self.start_timeout if timeout is None else timeout
        for attempt in range(self.port_retries + 1):
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except PeerError:
                exited = self.popen is not None and self.popen.poll() is not None
                self.stop(timeout=3)
                if exited and attempt < self.port_retries and self._address_in_use() and self._pick_new_ports():
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        if os.environ.get("QRPROXY_TEST_FAST") == "1":
            raise PeerError(f"the fast tier starts no peers, but this test starts {self.name}: mark it "
                            "`peer` (a PEER_FIXTURES fixture in tests/conftest.py, or pytestmark in its module)")
        if self.running:
            raise PeerError(f"{self.name} is already running (pid {self.pid})")
        argv = self.argv()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_start_offset = self._log_file.tell()
        stamp = dt.datetime.now().isoformat(timespec="milliseconds")
        self._log_file.write(f"=== {stamp} starting: {' '.join(argv)}\n".encode())
        self._log_file.flush()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.cwd(),
            env=self.env(),
            start_new_session=True,
        )
        with _running_lock:
            _running.add(self)

    def _address_in_use(self) -> bool:
        text = self.log_text(since_start=True).lower()
        return any(marker in text for marker in _ADDRESS_IN_USE_MARKERS)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """None while running (or never started); negative -N when killed by signal N."""
        return self.popen.poll() if self.popen else None

    def stop(self, timeout: float | None = None, graceful: bool | None = None) -> int | None:
        """SIGTERM the process, SIGKILL it after ``timeout`` s; then kill leftover children."""
        timeout = self.stop_timeout if timeout is None else timeout
        popen = self.popen
        if popen is None:
            return None
        if not (self.graceful_stop if graceful is None else graceful):
            return self.kill9()
        if popen.poll() is None:
            try:
                popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._log_note(f"did not exit within {timeout:.0f} s of SIGTERM; sending SIGKILL")
                popen.kill()
                popen.wait(10)
        self._kill_group()
        self._finish()
        return popen.returncode

    def kill9(self) -> int | None:
        """SIGKILL without warning (crash tests); returns the exit status (-9)."""
        popen = self.popen
        if popen is None:
            return None
        if popen.poll() is None:
            popen.kill()
            popen.wait(10)
        self._kill_group()
        self._finish()
        return popen.returncode

    def wait(self, timeout: float | None = None) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def _kill_group(self) -> None:
        # The process led its own session, so its group id is its pid: forked workers
        # (wlmscpfs, storescp --fork, ...) die with it. Done right after reaping the leader.
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _finish(self) -> None:
        with _running_lock:
            _running.discard(self)
        if self._log_file is not None:
            code = self.popen.returncode if self.popen else None
            self._log_note(f"exited with code {code}")
            self._log_file.close()
            self._log_file = None

    def _log_note(self, text: str) -> None:
        if self._log_file is not None and not self._log_file.closed:
            stamp = dt.datetime.now().isoformat(timespec="milliseconds")
            self._log_file.write(f"=== {stamp} {text}\n".encode())
            self._log_file.flush()

    # -- logs
    def log_text(self, since_start: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        if since_start:
            data = data[getattr(self, "_log_start_offset", 0) :]
        return data.decode("utf-8", "replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- context manager
    def __enter__(self) -> Peer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else f"stopped ({self.returncode})"
        return f"<{type(self).__name__} {self.name} {state}>"


# --- Orthanc ----------------------------------------------------------------------------------


class PortPeer(Peer):
    """A peer serving DICOM on one port (``self.port``): ready when the port accepts connections; a
    port chosen here (``_fixed_port`` false) is chosen again after an address-in-use failure."""

    port: int
    _fixed_port: bool = False

    def _pick_new_ports(self) -> bool:
        if self._fixed_port:
            return False
        self.port = free_port()
        return True

    def _wait_ready(self, timeout: float) -> None:
        wait_for_port(LOCALHOST, self.port, timeout, proc=self)


class OrthancHTTPError(PeerError):
    def __init__(self, method: str, url: str, status: int, body: str):
        self.status = status
        self.body = body
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:2000]}")


class OrthancServer(Peer):
    """Orthanc 1.10 with its own storage, index and config in ``tmpdir``.

    ``modalities``: name -> (aet, host, port); every listed modality may echo/find/move/get/store.
    ``worklists_dir``: when given, the ModalityWorklists plugin serves the ``*.wl`` files in it.
    ``config_overrides`` are merged into the generated orthanc.json last.
    Ports are chosen at construction (``dicom_port``, ``http_port``), so they can go into other
    peers' configuration before Orthanc is started.
    """

    name = "orthanc"
    start_timeout = 60.0
    # Orthanc 1.10 takes ~3.5 s to shut down in order (HTTP and DICOM servers poll); its storage
    # is throw-away (and SQLite survives a kill), so stop() kills it unless graceful=True is passed.
    graceful_stop = False

    def __init__(
        self,
        tmpdir: str | os.PathLike[str],
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        worklists_dir: str | os.PathLike[str] | None = None,
        *,
        dicom_port: int | None = None,
        http_port: int | None = None,
        verbose: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
        name: str | None = None,
    ):
        super().__init__(tmpdir, name)
        if not Path(ORTHANC_BIN).exists():
            raise PeerError(f"{ORTHANC_BIN} not found (apt-get install orthanc)")
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.worklists_dir = Path(worklists_dir) if worklists_dir is not None else None
        self._fixed_ports = dicom_port is not None or http_port is not None
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.verbose = verbose
        self.config_overrides = dict(config_overrides or {})
        self.config_path = self.dir / "orthanc.json"
        self.host = LOCALHOST

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "TemporaryDirectory": str(self.dir / "tmp"),
            "StorageCompression": False,
            "SyncStorageArea": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            # Orthanc 1.10 has no bind-address option: HTTP and DICOM listen on all interfaces.
            # RemoteAccessAllowed=false makes the REST API answer only to localhost.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpDescribeErrors": True,
            "HttpCompressionEnabled": False,
            "HttpThreadsCount": 10,
            "HttpTimeout": 30,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowFindWorklist": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {
                name: [aet, host, int(port)] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 10,
            # Orthanc keeps outgoing SCU associations open 5 s by default; tests want them closed.
            "DicomAssociationCloseDelay": 0,
            "DicomThreadsCount": 4,
            "StableAge": 1,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "JobsHistorySize": 10,
            "SynchronousCMove": True,
            "OverwriteInstances": True,
            "StorageAccessOnFind": "Always",
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "MetricsEnabled": False,
            "DeidentifyLogs": False,
            "Plugins": [],
        }
        if self.worklists_dir is not None:
            cfg["Plugins"] = [str(ORTHANC_WORKLIST_PLUGIN)]
            cfg["Worklists"] = {"Enable": True, "Database": str(self.worklists_dir)}
        cfg.update(self.config_overrides)
        return cfg

    def argv(self) -> list[str]:
        for sub in ("storage", "index", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if self.worklists_dir is not None:
            self.worklists_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        argv = [ORTHANC_BIN]
        if self.verbose:
            argv.append("--verbose")
        argv.append(str(self.config_path))
        return argv

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TCP_NODELAY"] = "1"
        return env

    def _pick_new_ports(self) -> bool:
        if self._fixed_ports:
            return False
        self.dicom_port, self.http_port = free_port(), free_port()
        return True

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        wait_for_port(LOCALHOST, self.http_port, timeout, proc=self)
        while True:
            if not self.running:
                raise PeerError(f"{self.name} exited with code {self.returncode}{_tail_for(self)}")
            try:
                self.get("/system")
                break
            except (OSError, PeerError):
                if time.monotonic() >= deadline:
                    raise PeerError(f"{self.name}: GET /system did not answer{_tail_for(self)}") from None
                time.sleep(0.1)
        wait_for_port(LOCALHOST, self.dicom_port, max(1.0, deadline - time.monotonic()), proc=self)

    # -- REST, urllib only
    def request(
        self,
        method: str,
        path: str,
        data: Any = None,
        *,
        content_type: str | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, str, bytes]:
        """One HTTP request; returns (status, content type, body). Non-2xx raises OrthancHTTPError.

        ``data``: bytes are sent as is (application/dicom unless told otherwise), a str as text,
        anything else as JSON.
        """
        url = self.url + (path if path.startswith("/") else "/" + path)
        body: bytes | None
        if data is None:
            body = None
        elif isinstance(data, (bytes, bytearray, memoryview)):
            body = bytes(data)
            content_type = content_type or "application/dicom"
        elif isinstance(data, str):
            body = data.encode()
            content_type = content_type or "text/plain"
        else:
            body = json.dumps(data).encode()
            content_type = content_type or "application/json"
        req = urllib.request.Request(url, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as e:
            raise OrthancHTTPError(method, url, e.code, e.read().decode("utf-8", "replace")) from None

    @staticmethod
    def _decode(ctype: str, body: bytes) -> Any:
        if not body:
            return None
        if "json" in ctype:
            return json.loads(body)
        try:
            return json.loads(body)
        except ValueError:
            return body

    def get(self, path: str) -> Any:
        """GET, parsed as JSON."""
        _, ctype, body = self.request("GET", path)
        return json.loads(body) if body else None

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path)[2]

    def post(self, path: str, data: Any = None, **kw: Any) -> Any:
        """POST; JSON answers are parsed, anything else comes back as bytes."""
        return self._decode(*self.request("POST", path, data if data is not None else b"", **kw)[1:])

    def put(self, path: str, data: Any = None, **kw: Any) -> Any:
        return self._decode(*self.request("PUT", path, data if data is not None else b"", **kw)[1:])

    def delete(self, path: str) -> Any:
        return self._decode(*self.request("DELETE", path)[1:])

    # -- conveniences
    def system(self) -> dict[str, Any]:
        return self.get("/system")

    def instances(self) -> list[str]:
        return self.get("/instances")

    def studies(self) -> list[str]:
        return self.get("/studies")

    def instance_file(self, instance_id: str) -> bytes:
        return self.get_bytes(f"/instances/{instance_id}/file")

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Tags by keyword (``simplified-tags``)."""
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def upload(self, dicom: bytes | os.PathLike[str] | str) -> dict[str, Any]:
        """POST /instances a DICOM file (bytes or a path); returns Orthanc's answer (ID, Status...)."""
        if not isinstance(dicom, (bytes, bytearray, memoryview)):
            dicom = Path(dicom).read_bytes()
        return self.post("/instances", bytes(dicom))

    def find(self, level: str, query: Mapping[str, str], expand: bool = False) -> list[Any]:
        return self.post("/tools/find", {"Level": level, "Query": dict(query), "Expand": expand})

    def add_modality(self, name: str, aet: str, host: str, port: int, **extra: Any) -> None:
        """Register a modality at runtime (PUT /modalities/{name}); all DIMSE permissions allowed."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": int(port), **extra})
        self.modalities[name] = (aet, host, int(port))

    def echo_modality(self, name: str) -> None:
        """C-ECHO from Orthanc to a configured modality; raises OrthancHTTPError on failure."""
        self.post(f"/modalities/{name}/echo", {})

    def store_to_modality(self, name: str, resources: Sequence[str]) -> Any:
        """C-STORE Orthanc resources (ids of patients/studies/series/instances) to a modality."""
        return self.post(f"/modalities/{name}/store", {"Resources": list(resources), "Synchronous": True})

    def add_worklist(self, item: Any, filename: str | None = None) -> Path:
        """Write a worklist item (Dataset, DICOM bytes or dump text) into the plugin's directory."""
        if self.worklists_dir is None:
            raise PeerError("this Orthanc was started without worklists_dir")
        return write_worklist_file(self.worklists_dir, item, filename)


# --- DCMTK storescp ---------------------------------------------------------------------------


class StoreSCP(PortPeer):
    """DCMTK storescp in single-process mode, writing every received object to ``output_dir``.

    Accepts all storage SOP classes (``-pm`` also unknown ones) in every transfer syntax DCMTK
    supports (``+xa``). Files are named <modality>.<SOP Instance UID> (DCMTK's default).
    """

    name = "storescp"

    def __init__(
        self,
        tmpdir: str | os.PathLike[str],
        aet: str = "STORESCP",
        extra_args: Iterable[str] = (),
        *,
        port: int | None = None,
        name: str | None = None,
    ):
        super().__init__(tmpdir, name)
        self.aet = aet
        self.extra_args = list(extra_args)
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.host = LOCALHOST
        self.output_dir = self.dir / "received"

    def argv(self) -> list[str]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return [
            dcmtk("storescp"),
            "-v",
            "-aet", self.aet,
            "-od", str(self.output_dir),
            "+xa",
            "-pm",
            "-dhl",
            *self.extra_args,
            str(self.port),
        ]  # fmt: skip


    def received_files(self) -> list[Path]:
        if not self.output_dir.exists():
            return []
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())

    def wait_for_files(self, count: int, timeout: float = 60.0) -> list[Path]:
        """Wait until at least ``count`` files arrived and none is still growing."""
        deadline = time.monotonic() + timeout
        last: list[tuple[Path, int]] = []
        while True:
            files = self.received_files()
            sizes = [(p, p.stat().st_size) for p in files]
            if len(files) >= count and sizes == last:
                return files
            last = sizes
            if time.monotonic() >= deadline:
                raise PeerError(
                    f"{self.name}: {len(files)} of {count} files arrived within {timeout:.0f} s{_tail_for(self)}"
                )
            time.sleep(0.2)

    def clear(self) -> None:
        for p in self.received_files():
            p.unlink()


# --- DCMTK wlmscpfs ---------------------------------------------------------------------------


class WorklistSCP(PortPeer):
    """DCMTK wlmscpfs serving worklist items from ``<tmpdir>/worklists/<AET>/*.wl``.

    wlmscpfs has no AE title option: it answers for any called AE title that names a
    subdirectory (with a ``lockfile``) of its data files path, so ``aet`` is that directory.
    ``reject_incomplete=False`` (default) passes ``-dfr`` so that minimal test items are served
    instead of being skipped silently; ``fork=False`` runs it with ``-s`` (single process).
    """

    name = "wlmscpfs"

    def __init__(
        self,
        tmpdir: str | os.PathLike[str],
        aet: str = "RISMWL",
        extra_args: Iterable[str] = (),
        *,
        port: int | None = None,
        reject_incomplete: bool = False,
        fork: bool = False,
        name: str | None = None,
    ):
        super().__init__(tmpdir, name)
        self.aet = aet
        self.extra_args = list(extra_args)
        self.reject_incomplete = reject_incomplete
        self.fork = fork
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.host = LOCALHOST
        self.data_dir = self.dir / "worklists"
        self.aet_dir = self.data_dir / aet
        self.aet_dir.mkdir(parents=True, exist_ok=True)
        (self.aet_dir / "lockfile").touch()

    def argv(self) -> list[str]:
        return [
            dcmtk("wlmscpfs"),
            "-v",
            "--fork" if self.fork else "-s",
            "-dfr" if not self.reject_incomplete else "-efr",
            "-csk",
            "-dhl",
            "-dfp", str(self.data_dir),
            *self.extra_args,
            str(self.port),
        ]  # fmt: skip


    def add_item(self, item: Any, filename: str | None = None) -> Path:
        """Add a worklist item: a pydicom Dataset, DICOM file bytes, or DCMTK dump text.

        Takes effect for the next C-FIND (wlmscpfs reads the directory on every query).
        """
        return write_worklist_file(self.aet_dir, item, filename)

    def add_dump(self, text: str, encoding: str = "utf-8", filename: str | None = None) -> Path:
        """Add an item from DCMTK dump text whose values are written in ``encoding`` (the item's
        Specific Character Set: latin-1 for ISO_IR 100, utf-8 for ISO_IR 192), via dump2dcm."""
        return write_worklist_dump(self.aet_dir, text, encoding, filename)

    def items(self) -> list[Path]:
        return sorted(self.aet_dir.glob("*.wl"))

    def clear(self) -> None:
        for p in self.items():
            p.unlink()


def write_worklist_file(directory: str | os.PathLike[str], item: Any, filename: str | None = None) -> Path:
    """Write a ``.wl`` file: a Dataset (explicit VR little endian, with file meta), raw DICOM
    bytes, or DCMTK dump text converted with /usr/bin/dump2dcm. Written under a temporary name and
    renamed, so a concurrent C-FIND never reads half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = filename or f"item-{uuid.uuid4().hex[:12]}.wl"
    if not name.endswith(".wl"):
        name += ".wl"
    final = directory / name
    tmp = directory / f".{name}.tmp"
    if isinstance(item, str):
        dump = directory / f".{name}.dump"
        dump.write_text(item)
        try:
            res = subprocess.run(
                [dcmtk("dump2dcm"), "+te", str(dump), str(tmp)], capture_output=True, text=True, timeout=30
            )
        finally:
            dump.unlink(missing_ok=True)
        if res.returncode != 0:
            raise PeerError(f"dump2dcm failed ({res.returncode}): {res.stdout}{res.stderr}")
    elif isinstance(item, (bytes, bytearray, memoryview)):
        tmp.write_bytes(bytes(item))
    else:
        tmp.write_bytes(dataset_bytes(item))
    os.replace(tmp, final)
    return final


def write_worklist_dump(directory: str | os.PathLike[str], text: str, encoding: str = "utf-8",
                        filename: str | None = None) -> Path:
    """Like write_worklist_file for dump text, with the dump's bytes in ``encoding`` (dump2dcm copies
    value bytes as they are, so they must already be in the item's character set)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = filename or f"item-{uuid.uuid4().hex[:12]}.wl"
    if not name.endswith(".wl"):
        name += ".wl"
    dump, tmp = directory / f".{name}.dump", directory / f".{name}.tmp"
    dump.write_bytes(text.encode(encoding))
    try:
        res = subprocess.run([dcmtk("dump2dcm"), "+te", str(dump), str(tmp)], capture_output=True, text=True,
                             timeout=30)
    finally:
        dump.unlink(missing_ok=True)
    if res.returncode != 0:
        raise PeerError(f"dump2dcm failed ({res.returncode}): {res.stdout}{res.stderr}")
    final = directory / name
    os.replace(tmp, final)
    return final


# --- DICOM objects ----------------------------------------------------------------------------

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def dataset_bytes(ds: Any) -> bytes:
    """A pydicom Dataset as a DICOM Part 10 file, explicit VR little endian, file meta added."""
    from io import BytesIO

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    ds = pydicom.Dataset(ds)  # shallow copy: do not touch the caller's file_meta
    meta = FileMetaDataset()
    old_meta = getattr(ds, "file_meta", None)
    if old_meta is not None:
        for elem in old_meta:
            meta.add(elem)
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.31")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", pydicom.uid.generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True, little_endian=True, implicit_vr=False)
    return buf.getvalue()


def make_ct_dataset(**attrs: Any) -> Any:
    """A tiny valid CT Image Storage instance (8x8, 16-bit) with fresh UIDs; keywords override."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    ds = pydicom.Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "PID0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = dt.date.today().strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = (np.arange(64, dtype="<u2") * 16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write_ct_file(path: str | os.PathLike[str], **attrs: Any) -> Path:
    """Write ``make_ct_dataset(**attrs)`` to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dataset_bytes(make_ct_dataset(**attrs)))
    return path


def make_worklist_item(**attrs: Any) -> Any:
    """A complete Modality Worklist item (passes wlmscpfs' strict checks); keywords override
    top-level attributes, ``sps`` a dict of Scheduled Procedure Step overrides."""
    import pydicom
    from pydicom.uid import generate_uid

    sps_over = attrs.pop("sps", {})
    sps = pydicom.Dataset()
    sps.Modality = "CT"
    sps.ScheduledStationAETitle = "MODALITY1"
    sps.ScheduledProcedureStepStartDate = dt.date.today().strftime("%Y%m%d")
    sps.ScheduledProcedureStepStartTime = "090000"
    sps.ScheduledPerformingPhysicianName = "DOE^JANE"
    sps.ScheduledProcedureStepDescription = "CT HEAD"
    sps.ScheduledProcedureStepID = "SPS0001"
    sps.ScheduledStationName = "CT1"
    sps.ScheduledProcedureStepLocation = "ROOM1"
    sps.PreMedication = ""
    sps.RequestedContrastAgent = ""
    for key, value in sps_over.items():
        setattr(sps, key, value)

    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = "ACC0001"
    ds.PatientName = "WORKLIST^PATIENT"
    ds.PatientID = "WL0001"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = generate_uid()
    ds.RequestingPhysician = "SMITH^JOHN"
    ds.RequestedProcedureDescription = "CT HEAD"
    ds.RequestedProcedureID = "RP0001"
    ds.RequestedProcedurePriority = "LOW"
    ds.ReferringPhysicianName = "SMITH^JOHN"
    ds.AdmissionID = ""
    ds.ScheduledProcedureStepSequence = [sps]
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


# --- PostgreSQL -------------------------------------------------------------------------------

#: why the last postgres_url() returned None (for skip/fail messages)
last_postgres_error: str = ""


def _pg_connect(url: str, dbname: str | None = None, timeout: int = 5):  # type: ignore[no-untyped-def]
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(
        host=u.host or LOCALHOST,
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        dbname=dbname or u.database or "postgres",
        connect_timeout=timeout,
        autocommit=True,
    )


def postgres_url() -> str | None:
    """The SQLAlchemy URL of a reachable PostgreSQL server: env QRPROXY_TEST_PG, else the default
    ``postgresql+psycopg://qrproxy:qrproxy@127.0.0.1:5432/postgres``; None if it cannot be reached
    (the reason is in ``peers.last_postgres_error``)."""
    global last_postgres_error
    url = os.environ.get("QRPROXY_TEST_PG") or DEFAULT_PG_URL
    try:
        with _pg_connect(url, timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as e:  # noqa: BLE001 - any failure means "not available"
        last_postgres_error = f"{_hide_password(url)}: {type(e).__name__}: {str(e).strip()}"
        return None
    last_postgres_error = ""
    return url


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def create_database(base_url: str, prefix: str = "qrproxy_test") -> str:
    """CREATE DATABASE with a unique name on the server of ``base_url``; returns its URL."""
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _pg_connect(base_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_url(base_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """DROP DATABASE (forcibly disconnecting leftover sessions) named in ``url``."""
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    if not name or name in ("postgres", "template0", "template1"):
        raise ValueError(f"refusing to drop database {name!r}")
    # Not WITH (FORCE): that also tries to terminate an autovacuum worker busy in the database,
    # which only a superuser may do ("must be a superuser to terminate superuser process").
    # Plain DROP DATABASE tells autovacuum to stop by itself; our own leftover sessions (e.g. of
    # a qrproxy killed with -9) are terminated first, and the drop is retried while they exit.
    deadline = time.monotonic() + 30
    with _pg_connect(url, dbname="postgres") as conn:
        while True:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                " AND pid <> pg_backend_pid() AND usename = current_user",
                (name,),
            )
            try:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
                return
            except Exception:  # noqa: BLE001 - "is being accessed by other users": retry
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


# --- qrproxy itself ---------------------------------------------------------------------------


def _qrproxy_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Import the checkout even if the tests run from elsewhere or the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_cli(
    config_path: str | os.PathLike[str],
    *args: str,
    timeout: float = 120.0,
    check: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,  # noqa: A002 - mirrors subprocess.run
) -> subprocess.CompletedProcess[str]:
    """``python -m qrproxy --config FILE ARGS...``, output captured as text."""
    argv = [sys.executable, "-m", "qrproxy", "--config", str(config_path), *map(str, args)]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        cwd=str(cwd) if cwd is not None else str(Path(config_path).resolve().parent),
        env=_qrproxy_env(),
        input=input,
        start_new_session=True,
    )


class QrproxyProcess(Peer):
    """``python -m qrproxy --config <tmpdir>/<name>.yml serve``, ready when its DICOM port listens.

    ``config`` is YAML text or a dict (written with ``yaml.safe_dump``). The working directory is
    ``tmpdir``, so relative paths in the config (spool, SQLite file) land there.
    """

    name = "qrproxy"
    stop_timeout = 15.0
    start_timeout = 30.0
    port_retries = 0

    def __init__(
        self,
        tmpdir: str | os.PathLike[str],
        config: str | Mapping[str, Any],
        *,
        name: str | None = None,
        extra_args: Iterable[str] = (),
    ):
        import yaml

        super().__init__(tmpdir, name)
        self.config_path = self.dir / f"{self.name}.yml"
        self.extra_args = list(extra_args)
        if isinstance(config, str):
            text = config
        else:
            text = yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False)
        self.config_path.write_text(text)
        self.config: dict[str, Any] = yaml.safe_load(text) or {}
        self.port = int(self.config.get("port", 11112))
        host = str(self.config.get("host", "0.0.0.0"))
        self.host = LOCALHOST if host in ("0.0.0.0", "", "::", "*") else host
        self.ae_title = str(self.config.get("ae_title", "QRPROXY"))

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "qrproxy", "--config", str(self.config_path), *self.extra_args, "serve"]

    def env(self) -> dict[str, str]:
        return _qrproxy_env()

    def _wait_ready(self, timeout: float) -> None:
        wait_for_port(self.host, self.port, timeout, proc=self)

    def cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run another qrproxy command against the same config file (e.g. ``db upgrade``)."""
        kw.setdefault("cwd", self.dir)
        return run_cli(self.config_path, *args, **kw)


def _plain(obj: Any) -> Any:
    """Make a config mapping safe_dump-able (Paths to str, tuples to lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


# --- DCMTK dcmqrscp ---------------------------------------------------------------------------


def findscu(
    host: str,
    port: int,
    keys: Mapping[str, str] | Sequence[tuple[str, str]],
    *,
    aec: str,
    aet: str = "FINDSCU",
    model: str = "S",
    out_dir: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
) -> tuple[list[Any], subprocess.CompletedProcess[str]]:
    """C-FIND with DCMTK findscu; returns (the identifiers of the pending responses as pydicom
    Datasets, in order, and the completed process). ``keys``: keyword or ``gggg,eeee`` -> value ("" to
    ask for a return key). ``model``: "S" study root, "P" patient root. The answers are extracted
    with ``-X`` into ``out_dir`` (a fresh temporary directory when None), so nothing is parsed from
    the log. Raises PeerError when findscu fails (exit status or a non-Success final status).
    """
    import tempfile

    import pydicom

    items = list(keys.items()) if isinstance(keys, Mapping) else list(keys)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="findscu-")
        out = Path(tmp.name)
    else:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("rsp*.dcm"):
            old.unlink()
    try:
        argv = [dcmtk("findscu"), "-v", f"-{model}", "-aet", aet, "-aec", aec, "-X", "-od", str(out)]
        for k, v in items:
            argv += ["-k", f"{k}={v}" if v != "" else k]
        argv += [host, str(port)]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, TCP_NODELAY="1"))
        log = res.stdout + res.stderr
        if res.returncode != 0 or "Received Final Find Response (Success)" not in log:
            raise PeerError(f"findscu to {aec}@{host}:{port} failed (exit {res.returncode}):\n{log[-4000:]}")
        answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
        return answers, res
    finally:
        if tmp is not None:
            tmp.cleanup()


class DcmqrSCP(PortPeer):
    """DCMTK dcmqrscp: a small Q/R archive (C-STORE, C-FIND, C-MOVE, C-GET) with one storage area.

    Its configuration is written to ``<tmpdir>/dcmqrscp.cfg`` at every start: ``NetworkTCPPort``,
    ``MaxPDUSize``, ``MaxAssociations``, a ``HostTable`` with the move destinations added by
    ``peers``/``add_peer()``, and an ``AETable`` with one read/write storage area
    ``<tmpdir>/storage`` for ``aet`` open to ANY calling AE. Objects it receives are written there
    (``CT_<hash>.dcm`` ...) and indexed in ``storage/index.dat``.

    Things that matter for tests (DCMTK 3.6.7):
      * It answers C-FIND only with the keys its index holds. At IMAGE level that is
        SOPInstanceUID, InstanceNumber (and the unique keys of the levels above, plus
        RetrieveAETitle): no SOPClassUID, which is the reason this peer exists.
      * A C-MOVE destination must be in the HostTable (AE title -> host, port); an unknown one is
        refused with 0xA801 (Move Destination Unknown). dcmqrscp reads its configuration only at
        start, so ``add_peer()`` on a running peer restarts it (the storage area is kept).
      * It runs with ``--fork`` (its default, one child per association) because
        ``--single-process`` crashes: dcmqrscp 3.6.7 (Debian) segfaults in DUL_DropAssociation()
        right after the first association is released, so only one association would ever be
        served. The forked children are in the peer's process group and die with it in stop().
      * The storage area quota's maxStudies is clamped to 500 by dcmqrscp (it warns above); when a
        quota is exceeded, dcmqrscp deletes the oldest study. The quota here is (500, 1024mb).
      * ``UserName``/``GroupName`` are left out: dcmqrscp would switch to that user when run as root.
    """

    name = "dcmqrscp"

    def __init__(
        self,
        tmpdir: str | os.PathLike[str],
        aet: str = "DCMQR",
        peers: Mapping[str, tuple[str, str, int]] | None = None,
        extra_args: Iterable[str] = (),
        *,
        port: int | None = None,
        max_pdu: int = 16384,
        max_associations: int = 16,
        name: str | None = None,
    ):
        super().__init__(tmpdir, name)
        self.aet = aet
        self.extra_args = list(extra_args)
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.host = LOCALHOST
        self.storage_dir = self.dir / "storage"
        self.config_path = self.dir / "dcmqrscp.cfg"
        #: symbolic name -> (AE title, host, port): the HostTable, i.e. the known move destinations
        self.peers: dict[str, tuple[str, str, int]] = {}
        for key, (ae, host, p) in (peers or {}).items():
            self.peers[self._symbol(key)] = (ae, host, int(p))

    @staticmethod
    def _symbol(text: str) -> str:
        sym = "".join(c if c.isalnum() else "_" for c in text).lower()
        return sym if sym and sym[0].isalpha() else "p_" + sym

    def add_peer(self, ae: str, host: str, port: int, name: str | None = None) -> None:
        """Make ``ae`` at ``host:port`` a known C-MOVE destination. dcmqrscp reads its
        configuration only at start: if it is running, it is restarted (the storage is kept)."""
        self.peers[self._symbol(name or ae)] = (ae, host, int(port))
        if self.running:
            self.stop()
            self.start()

    def config_text(self) -> str:
        host_lines = "\n".join(f"{sym} = ({ae}, {host}, {port})" for sym, (ae, host, port) in self.peers.items())
        return (
            "# written by tests/peers.py DcmqrSCP\n"
            f"NetworkTCPPort  = {self.port}\n"
            f"MaxPDUSize      = {self.max_pdu}\n"
            f"MaxAssociations = {self.max_associations}\n"
            "\n"
            "HostTable BEGIN\n"
            f"{host_lines}\n"
            "HostTable END\n"
            "\n"
            "VendorTable BEGIN\n"
            "VendorTable END\n"
            "\n"
            "AETable BEGIN\n"
            # AETitle  StorageArea  Access  Quota(maxStudies, maxBytesPerStudy)  Peers
            f"{self.aet} {self.storage_dir} RW (500, 1024mb) ANY\n"
            "AETable END\n"
        )

    def argv(self) -> list[str]:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        return [
            dcmtk("dcmqrscp"),
            "-v",
            "--fork",  # see the class docstring: --single-process segfaults after one association
            "-c", str(self.config_path),
            "-dhl",
            *self.extra_args,
            str(self.port),
        ]  # fmt: skip


    # -- contents
    def load(self, files: Iterable[str | os.PathLike[str]], timeout: float = 180.0) -> None:
        """C-STORE ``files`` into the archive with DCMTK storescu (dcmqrscp files and indexes
        them). Raises PeerError unless every file was answered with Success."""
        paths = [str(f) for f in files]
        if not paths:
            return
        res = subprocess.run(
            [dcmtk("storescu"), "-v", "-R", "-aet", "LOADER", "-aec", self.aet, LOCALHOST, str(self.port), *paths],
            capture_output=True, text=True, timeout=timeout, env=dict(os.environ, TCP_NODELAY="1"),
        )  # fmt: skip
        log = res.stdout + res.stderr
        ok = log.count("Received Store Response (Success)")
        if res.returncode != 0 or ok != len(paths):
            raise PeerError(f"storescu into {self.name}: exit {res.returncode}, {ok} of {len(paths)} stored:\n"
                            f"{log[-4000:]}{_tail_for(self)}")

    def stored_files(self) -> list[Path]:
        """The DICOM files in the storage area (not index.dat)."""
        if not self.storage_dir.exists():
            return []
        return sorted(p for p in self.storage_dir.iterdir() if p.is_file() and p.name != "index.dat")

    def stored_datasets(self) -> dict[str, Any]:
        """SOP Instance UID -> pydicom Dataset of every file in the storage area."""
        import pydicom

        out = {}
        for p in self.stored_files():
            try:
                ds = pydicom.dcmread(p)
            except Exception:  # noqa: BLE001 - a file still being written
                continue
            out[str(ds.SOPInstanceUID)] = ds
        return out

    def find(self, keys: Mapping[str, str] | Sequence[tuple[str, str]], *, model: str = "S",
             aet: str = "FINDSCU") -> list[Any]:
        """C-FIND straight to this archive with DCMTK findscu; the answers as Datasets."""
        return findscu(LOCALHOST, self.port, keys, aec=self.aet, aet=aet, model=model)[0]

    def instance_uids(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs dcmqrscp's index lists for the study (STUDY -> SERIES -> IMAGE C-FINDs)."""
        out: set[str] = set()
        for se in self.find({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study_uid, "SeriesInstanceUID": ""}):
            for im in self.find({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study_uid,
                                 "SeriesInstanceUID": str(se.SeriesInstanceUID), "SOPInstanceUID": ""}):
                out.add(str(im.SOPInstanceUID))
        return out

    def wait_for_instances(self, study_uid: str, sops: Iterable[str], timeout: float = 90.0) -> set[str]:
        """Poll (C-FIND) until the index lists at least ``sops`` for the study; returns what it lists."""
        want = set(sops)
        deadline = time.monotonic() + timeout
        while True:
            got = self.instance_uids(study_uid)
            if want <= got:
                return got
            if time.monotonic() >= deadline:
                raise PeerError(f"{self.name}: {len(want & got)} of {len(want)} instances of study {study_uid} "
                                f"indexed within {timeout:.0f} s{_tail_for(self)}")
            time.sleep(0.3)

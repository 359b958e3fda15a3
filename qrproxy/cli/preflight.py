"""What `serve` needs from the host, checked before it starts: by `check` and by `serve` itself.

A folder that cannot be written or a port another process holds is a configuration problem: `serve`
exits 2 naming the key (so systemd does not restart it in a loop, see deploy/systemd), and `check`
finds it first. Each check tries the real thing (create a file, bind the port) rather than reading
permission bits, which say nothing for root or a read-only mount.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

from qrproxy.config.schema import Config

Problem = tuple[tuple[str | int, ...], str]


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def folder_problem(path: Path, what: str) -> str | None:
    """None when `path` is a folder qrproxy can write in, or can create."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder ({what})"
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return f"{path} cannot be created: {existing} is a file, not a folder ({what})"
    try:
        fd, name = tempfile.mkstemp(dir=existing, prefix=".qrproxy-check-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        verb = "written" if existing == path else f"created (its nearest existing folder {existing} is not writable)"
        return f"{path} cannot be {verb}: {exc.strerror or exc} ({what}; run qrproxy as a user that owns it)"
    return None


def file_problem(path: Path, what: str) -> str | None:
    """None when `path` can be appended to, or created in its folder."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, not a file ({what})"
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            return f"{path} cannot be written: {exc.strerror or exc} ({what})"
        return None
    return folder_problem(path.parent, what)


def port_problem(host: str, port: int) -> str | None:
    """None when `host:port` can be bound now. Bound without SO_REUSEPORT, so a qrproxy already
    listening there (which sets it) is found too."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve to a local address ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (f"{host}:{port} is already in use by another process (is qrproxy already running? "
                    f"`ss -ltnp 'sport = :{port}'` shows who listens)")
        if exc.errno == errno.EACCES:
            return f"{host}:{port}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this host"
        return f"{host}:{port}: cannot listen: {exc.strerror or exc}"
    finally:
        sock.close()
    return None


def held_by_qrproxy(host: str, port: int) -> bool:
    """Whether a qrproxy answers DICOM at host:port (its implementation class UID in the
    A-ASSOCIATE-AC): `check` run next to the running service finds its ports taken by it."""
    from qrproxy.net import pdu
    from qrproxy.net.requestor import ConnectFailed, connect

    target = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    try:
        assoc = connect(target, port, calling="QRPROXY-CHECK", called="QRPROXY", timeout=5.0, connect_timeout=2.0,
                        contexts=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])])
    except (ConnectFailed, OSError):
        return False
    try:
        return assoc.acceptor.implementation_class_uid == pdu.IMPLEMENTATION_UID
    finally:
        try:
            assoc.release()
        except Exception:
            assoc.abort()


def host_problems(cfg: Config, ports: bool = True, running_ok: bool = False) -> Iterator[Problem]:
    """Every problem `serve` would hit at start on this host, as (key path, message). With
    `running_ok` (`check`), ports held by a qrproxy already serving on the DICOM port are fine."""
    problem = folder_problem(Path(cfg.spool_dir), "the spool")
    if problem:
        yield ("spool_dir",), problem
    url = make_url(str(cfg.database))
    if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
        problem = file_problem(Path(url.database), "the SQLite database; its folder also holds the -wal and -shm files")
        if problem is None and Path(url.database).parent.exists():
            problem = folder_problem(Path(url.database).parent, "the SQLite database's -wal and -shm files")
        if problem:
            yield ("database",), problem
    if cfg.log.file is not None:
        problem = file_problem(Path(cfg.log.file), "the log file")
        if problem:
            yield ("log", "file"), problem
    if not ports:
        return
    listen: list[tuple[tuple[str | int, ...], str, int]] = [(("port",), cfg.host, cfg.port)]
    if cfg.tls is not None:
        listen.append((("tls", "port"), cfg.host, cfg.tls.port))
    if cfg.http is not None:
        listen.append((("http", "port"), cfg.http.host, cfg.http.port))
    running: bool | None = None
    for key, host, port in listen:
        problem = port_problem(host, port)
        if problem and "already in use" in problem:
            problem = port_problem(host, port)  # a moment's overlap with another bind: ask again
        if problem and "already in use" in problem and running_ok:
            if running is None:
                running = held_by_qrproxy(cfg.host, cfg.port)
            if running:
                continue  # the service itself, running: `check` validates the file it will read next
        if problem:
            yield key, problem

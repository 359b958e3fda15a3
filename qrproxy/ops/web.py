"""The `http:` endpoint: `/health` for load balancers and systemd, `/metrics` for Prometheus, `/` for people.

Read-only and small on purpose: a stdlib ThreadingHTTPServer in a daemon thread, no framework, no
JavaScript or external assets on the page (it must render on a phone on a hospital Wi-Fi with no
internet). It runs in worker 0 only (its /metrics counts every worker's associations) and binds
before the DICOM port opens, so a port already taken fails `serve` at once (exit 1) instead of
leaving a proxy nobody can monitor.

Everything a peer controls (AE titles, error texts, held reasons) is HTML-escaped on the page.
"""

from __future__ import annotations

import collections
import datetime as dt
import html
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qrproxy import __version__
from qrproxy.index.session import read_only
from qrproxy.logs import kv
from qrproxy.ops.metrics import StateCollector, scrape_registry
from qrproxy.ops.status import Status, _duration, collect, line_words
from qrproxy.scu import upstream

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from qrproxy.config.schema import Config
    from qrproxy.ops.metrics import Metrics

log = logging.getLogger("qrproxy.http")

FIRST_ECHO_WAIT = 3.0  # a page load with no result yet waits this long for the first echoes


class RecentErrors(logging.Handler):
    """The last WARNING/ERROR log records, kept in memory for the status page (bounded)."""

    def __init__(self, size: int = 50):
        super().__init__(level=logging.WARNING)
        self.lines: collections.deque[str] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
            self.lines.append(f"{when} {record.levelname} {record.name} {record.getMessage()}")
        except Exception:  # a log handler must never raise into the code that logged
            self.handleError(record)


def _health_engine(url: str) -> Any:
    """A connection per check (no pool): a pooled connection would keep answering after the database
    file was removed or the server stopped accepting connections."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    if make_url(url).drivername.startswith("sqlite"):
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": 2})
    return create_engine(url, poolclass=NullPool,
                         connect_args={"connect_timeout": 3, "options": "-c statement_timeout=3000"})


class Health:
    """The two readiness checks: the database answers, the spool takes a file and has room."""

    def __init__(self, config: Config):
        self.config = config
        self._engine: Any = None

    def database(self) -> dict[str, Any]:
        from sqlalchemy import text
        from sqlalchemy.engine import make_url

        url = make_url(self.config.database)
        if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
            if not Path(url.database).is_file():  # connecting would create an empty file
                return {"ok": False, "error": f"database file {url.database} is missing"}
        if self._engine is None:
            self._engine = _health_engine(self.config.database)
        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1")).scalar_one()
                revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        return {"ok": True, "revision": revision}

    def spool(self) -> dict[str, Any]:
        spool_dir = Path(self.config.spool_dir)
        need = self.config.store.min_free_space
        try:
            fd, name = tempfile.mkstemp(prefix=".health-", dir=spool_dir)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
                os.unlink(name)
            free = shutil.disk_usage(spool_dir).free
        except OSError as exc:
            return {"ok": False, "error": f"spool {spool_dir} not writable: {exc.strerror or exc}"}
        if free < need:
            return {"ok": False, "free_bytes": free, "min_free_space": need,
                    "error": f"spool {spool_dir}: {free} bytes free, store.min_free_space is {need}"}
        return {"ok": True, "free_bytes": free, "min_free_space": need}

    def check(self) -> tuple[bool, dict[str, Any]]:
        checks = {"database": self.database(), "spool": self.spool()}
        failed = [name for name, c in checks.items() if not c["ok"]]
        body: dict[str, Any] = {"status": "unavailable" if failed else "ok", "checks": checks}
        if failed:
            body["failed"] = failed
        return not failed, body

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


class HttpEndpoint:
    """Binds in __init__ (so a taken port fails `Proxy.start` before anything else runs)."""

    def __init__(self, config: Config, engine: Engine, metrics: Metrics, reachability: Any):
        """`reachability`: jobs/health.py's NodeHealth (`snapshot()`, `fresh(wait)`)."""
        assert config.http is not None
        self.config = config
        self.engine = engine
        self.started = time.time()
        self.health = Health(config)
        self.reachability = reachability
        self.errors = RecentErrors()
        self.registry = scrape_registry(metrics)  # several workers: the sum of all (metrics.py)
        self.registry.register(StateCollector(self.snapshot, self.reachability.snapshot, self.started))
        host, port = self.config.http.host, self.config.http.port
        try:
            self.server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:
            raise OSError(exc.errno, f"http: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        logging.getLogger().addHandler(self.errors)
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)
        self._thread.start()
        host, port = self.server.server_address[:2]
        log.info(kv(event="http-listening", host=host, port=port))

    def stop(self) -> None:
        logging.getLogger().removeHandler(self.errors)
        if self._thread is not None:
            self.server.shutdown()
        self.server.server_close()
        self.health.close()

    def snapshot(self) -> Status:
        st = collect(self.config, echo_nodes=False, engine=read_only(self.engine), log_errors=False)
        st.recent_errors = list(self.errors.lines)
        return st

    # --- responses ---------------------------------------------------------------------------------

    def route(self, path: str) -> tuple[int, str, bytes]:
        if path in ("/health", "/health/ready"):
            ok, body = self.health.check()
            return (200 if ok else 503), "application/json", json.dumps(body).encode()
        if path == "/health/live":
            body = {"status": "ok", "uptime_seconds": int(time.time() - self.started), "version": __version__}
            return 200, "application/json", json.dumps(body).encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path in ("/", "/index.html"):
            st = self.snapshot()
            reach = self.reachability.fresh(wait=FIRST_ECHO_WAIT)
            ok, health = self.health.check()
            page = render_page(st, reach, health, self.started)
            return 200, "text/html; charset=utf-8", page.encode()
        return 404, "text/plain; charset=utf-8", b"not found: try /, /health, /metrics\n"


def _handler(endpoint: HttpEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"qrproxy/{__version__}"
        sys_version = ""

        def _answer(self, with_body: bool) -> None:
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            try:
                code, ctype, body = endpoint.route(path)
            except Exception:
                log.exception(kv(event="http-error", path=path))
                code, ctype, body = 500, "text/plain; charset=utf-8", b"internal error (see the qrproxy log)\n"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(False)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug(kv(event="http-request", peer=self.client_address[0], request=format % args))

    return Handler


# --- the status page -----------------------------------------------------------------------------------

CSS = """
*{box-sizing:border-box}
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:12px;color:#1b1f24;
background:#f4f6f8}
h1{font-size:1.3em;margin:0 0 4px}h2{font-size:1.05em;margin:0 0 8px}
section,header{background:#fff;border-radius:8px;padding:12px;margin:0 0 12px;box-shadow:0 1px 2px #0002}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e3e6ea;vertical-align:top;overflow-wrap:anywhere}
th{font-size:.8em;text-transform:uppercase;color:#57606a}
.ok{color:#116329;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#57606a}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;font-weight:600}
.badge.ok{background:#1a7f37;color:#fff}.badge.bad{background:#b3261e;color:#fff}
ul.log{list-style:none;margin:0;padding:0;font:12px/1.4 ui-monospace,monospace}
ul.log li{padding:4px 0;border-bottom:1px solid #eee;overflow-wrap:anywhere}
dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:4px 12px;margin:0}dt{color:#57606a}dd{margin:0;overflow-wrap:anywhere;min-width:0}
.num{font-variant-numeric:tabular-nums}
@media (max-width:640px){
 body{padding:8px}
 table,tbody,tr,td{display:block;width:100%}
 thead{display:none}
 tr{border:1px solid #e3e6ea;border-radius:6px;margin:0 0 8px;padding:4px 0}
 td{border:0;padding:3px 8px;display:flex;gap:8px}
 td::before{content:attr(data-label);flex:0 0 38%;color:#57606a;font-size:.85em}
 td>div{flex:1;min-width:0}
}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Cells in `rows` are HTML already (escaped by the caller); headers are plain text."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td data-label="{_e(h)}"><div>{c}</div></td>' for h, c in zip(headers, row)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def _when(value: Any) -> str:
    """A database timestamp as UTC text plus its age."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    age = time.time() - value.timestamp()
    return f"{value.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S}Z <span class=muted>({_ago(age)} ago)</span>"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def render_page(st: Status, reach: dict[str, tuple[upstream.EchoResult, float]], health: dict[str, Any],
                started: float) -> str:
    cfg = st.config
    now = time.time()
    failed = health.get("failed", [])
    badge = ('<span class="badge ok">healthy</span>' if not failed else
             f'<span class="badge bad">UNHEALTHY: {_e(", ".join(failed))}</span>')
    problems = "".join(f'<p class="bad">{_e(name)}: {_e(c.get("error"))}</p>'
                       for name, c in health["checks"].items() if not c["ok"])
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta http-equiv="refresh" content="30">',
        f"<title>qrproxy {_e(cfg.ae_title)}: status</title><style>{CSS}</style></head><body>",
        f"<header><h1>qrproxy {_e(cfg.ae_title)}</h1><p>{badge}</p>{problems}<dl>",
        f"<dt>DICOM</dt><dd>{_e(cfg.host)}:{_e(cfg.port)}</dd>",
        f"<dt>Version</dt><dd>{_e(__version__)}</dd>",
        f"<dt>Uptime</dt><dd>{_e(_ago(now - started))}</dd>",
        f"<dt>Database</dt><dd>{_e(st.database_error or ('revision ' + str(st.revision)))}</dd>",
        f"<dt>Page</dt><dd class=muted>{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(now))}, "
        "reloads every 30 s</dd></dl></header>",
    ]
    # nodes
    rows = []
    for n in st.nodes:
        r = reach.get(n["name"])
        if r is None:
            state = '<span class="muted">not checked yet</span>'
        else:
            result, when = r
            cls = "ok" if result.ok else "bad"
            state = (f'<span class="{cls}">{"yes" if result.ok else "NO"}</span> {_e(result.detail)} '
                     f'<span class="muted">({result.ms} ms, {_e(_ago(now - when))} ago)</span>')
        rows.append([_e(n["name"]), _e(n["ae_title"]), _e(n["address"]), _e(n["roles"]), state])
    out.append("<section id=nodes><h2>Nodes</h2>" + (
        _table(["Node", "AE title", "Address", "Roles", "Reachable"], rows) if rows else
        "<p class=muted>no nodes configured</p>") + "</section>")
    # forward queues
    rows = []
    for node in sorted(st.queues):
        q = st.queues[node]
        held = q.get("held", 0)
        rows.append([_e(node), f'<span class=num>{q.get("pending", 0)}</span>',
                     f'<span class=num>{q.get("inflight", 0)}</span>',
                     f'<span class="num{" bad" if held else ""}">{held}</span>',
                     f'<span class=num>{q.get("sent", 0)}</span>', _when(st.oldest.get(node))])
    section = ["<section id=queues><h2>Forward queues</h2>"]
    section.append(_table(["Node", "Pending", "In flight", "Held", "Sent", "Oldest unsent"], rows) if rows
                   else "<p class=muted>forward queue empty</p>")
    lines = [[_e(node), _e(line_words(cfg, node, line))] for node, line in sorted(st.lines.items())
             if node in cfg.nodes]
    if lines:
        section.append("<h2 style='margin-top:12px'>Lines</h2>" + _table(["Node", "Measured"], lines))
    if st.held_reasons:
        section.append("<h2 style='margin-top:12px'>Held items</h2>")
        section.append(_table(["Node", "Items", "Reason"],
                              [[_e(node), f"<span class=num>{n}</span>", _e(reason or "(no reason recorded)")]
                               for node, reason, n in st.held_reasons]))
    if st.mpps_held:
        section.append(_table(["MPPS node", "Held", "Reason"],
                              [[_e(node), f"<span class=num>{n}</span>", _e(reason)]
                               for node, reason, n in st.mpps_held]))
    section.append("</section>")
    out.append("".join(section))
    # refresh jobs
    if cfg.refresh:
        rows = []
        for job in cfg.refresh:
            run = st.refresh_runs.get(job.name)
            schedule = f"every {_duration(job.every)}" if job.every is not None else f"cron {job.cron}"
            if run is None:
                rows.append([_e(job.name), _e(job.node), _e(schedule), "never", "-", "-", ""])
                continue
            result = run["status"]
            cls = "ok" if result == "ok" else ("bad" if result == "error" else "muted")
            rows.append([_e(job.name), _e(job.node), _e(schedule), _when(run["finished_at"] or run["started_at"]),
                         f'<span class="{cls}">{_e(result)}</span> ({run["rows"]} rows)',
                         _when(st.refresh_last_ok.get(job.name)), _e((run["error"] or "")[:300])])
        out.append("<section id=refresh><h2>Refresh jobs</h2>" + _table(
            ["Job", "Node", "Schedule", "Last run", "Result", "Last success (freshness)", "Error"], rows)
            + "</section>")
    # spool
    u = st.spool_usage
    spool = [f"<dt>Folder</dt><dd>{_e(cfg.spool_dir)}</dd>"]
    if st.spool_free is not None:
        low = st.spool_free < cfg.store.min_free_space
        spool.append(f'<dt>Free</dt><dd class="{"bad" if low else ""}">{_e(_mb(st.spool_free))} '
                     f'<span class=muted>(minimum {_e(_mb(cfg.store.min_free_space))})</span></dd>')
    if u:
        spool.append(f"<dt>Held</dt><dd>{_e(_mb(u['bytes']))} in {u['objects']} objects, "
                     f"{u['studies']} studies</dd>")
        spool.append(f"<dt>Owed</dt><dd>{u['owed']} studies ({_e(_mb(u['owed_bytes']))}) wait for a forward or "
                     "commitment</dd>")
    out.append("<section id=spool><h2>Spool</h2><dl>" + "".join(spool) + "</dl></section>")
    # recent errors
    if st.recent_errors:
        items = "".join(f"<li>{_e(line[:500])}</li>" for line in reversed(st.recent_errors))
        out.append(f"<section id=errors><h2>Recent warnings and errors</h2><ul class=log>{items}</ul></section>")
    else:
        out.append("<section id=errors><h2>Recent warnings and errors</h2>"
                   "<p class=muted>none since start</p></section>")
    out.append("</body></html>")
    return "\n".join(out)

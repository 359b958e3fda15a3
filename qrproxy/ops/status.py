"""`qrproxy status`: what a site engineer needs at a glance, gathered from the database and the nodes.

Collection and rendering are apart so that the HTTP status page can render the same facts.
"""

from __future__ import annotations

import datetime as dt
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from qrproxy.config.schema import Config
from qrproxy.index import models
from qrproxy.index.session import make_engine
from qrproxy.jobs.commitment import pending_summary
from qrproxy.jobs.prefetch import summary as prefetch_summary
from qrproxy.jobs.refresh import last_runs
from qrproxy.jobs.retention import summary
from qrproxy.ops import queue_actions as queue
from qrproxy.scu import mpps as mpps_relay
from qrproxy.scu import linespeed, upstream


@dataclass
class Status:
    config: Config
    revision: str | None = None
    database_error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    # node -> measured line speed (bytes/s or None), compress (auto's choice), too_slow (cuts)
    lines: dict[str, dict[str, Any]] = field(default_factory=dict)
    queues: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest: dict[str, Any] = field(default_factory=dict)
    held_reasons: list[tuple[str, str, int]] = field(default_factory=list)
    spool_free: int | None = None
    # job name -> last run: started/finished (datetime), status, rows, error; absent: never ran
    refresh_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # job name -> when its latest successful run finished (cache freshness); absent: never succeeded
    refresh_last_ok: dict[str, Any] = field(default_factory=dict)
    # worklist: items answered (not done) and done; MPPS relay: node -> state -> messages
    worklist: dict[str, int] = field(default_factory=dict)
    mpps_queues: dict[str, dict[str, int]] = field(default_factory=dict)
    mpps_held: list[tuple[str, str, int]] = field(default_factory=list)
    # retention.summary(): bytes, objects, studies held locally; evictable / pinned / owed (+ _bytes)
    spool_usage: dict[str, int] = field(default_factory=dict)
    # prefetch: (rule, state, rows, bytes, latest error of that state)
    prefetch: list[tuple[str, str, int, int, str | None]] = field(default_factory=list)
    # storage commitment: modality transactions by state, the open ones, requests to nodes
    commitment: dict[str, int] = field(default_factory=dict)
    commitment_open: list[dict[str, Any]] = field(default_factory=list)
    commitment_out: dict[str, dict[str, int]] = field(default_factory=dict)
    # the latest WARNING/ERROR lines: from the server's memory (status page) or log.file (`qrproxy status`)
    recent_errors: list[str] = field(default_factory=list)


def collect(cfg: Config, echo_nodes: bool = True, engine: Any = None, log_errors: bool = True) -> Status:
    """Everything `status` shows. `engine`: the running proxy's (status page, /metrics), else one of
    its own, disposed at the end. `log_errors`: read the latest WARNING/ERROR lines from `log.file`."""
    from alembic.runtime.migration import MigrationContext

    st = Status(cfg)
    own_engine = engine is None
    if engine is None:
        engine = make_engine(cfg.database)
    try:
        with engine.connect() as conn:
            st.revision = MigrationContext.configure(conn).get_current_revision()
            if st.revision is not None:
                for label, model in (
                    ("patients", models.Patient),
                    ("studies", models.Study),
                    ("instances", models.Instance),
                    ("spool objects", models.SpoolObject),
                    ("worklist items", models.WorklistItem),
                ):
                    st.counts[label] = conn.execute(select(func.count()).select_from(model)).scalar_one()
                from sqlalchemy.orm import Session

                with Session(conn) as s:
                    for name, run in last_runs(s, [job.name for job in cfg.refresh]).items():
                        st.refresh_runs[name] = {"started_at": run.started_at, "finished_at": run.finished_at,
                                                 "status": run.status, "rows": run.rows, "error": run.error}
                    run_t = models.RefreshRun
                    st.refresh_last_ok = dict(s.execute(
                        select(run_t.job_name, func.max(run_t.finished_at))
                        .where(run_t.status == "ok", run_t.job_name.in_([job.name for job in cfg.refresh]))
                        .group_by(run_t.job_name)).all())
                    st.queues = queue.depths(s)
                    _collect_worklist(st, s)

                    st.spool_usage = summary(s)
                    if cfg.prefetch:
                        st.prefetch = prefetch_summary(s)

                    st.commitment, st.commitment_open, st.commitment_out = pending_summary(s)
                    st.oldest = queue.oldest_pending(s)
                    st.held_reasons = [
                        (node, reason or "", n)
                        for node, reason, n in s.execute(
                            select(models.ForwardItem.node, models.ForwardItem.last_error, func.count())
                            .where(models.ForwardItem.state == models.ForwardState.held)
                            .group_by(models.ForwardItem.node, models.ForwardItem.last_error)
                            .limit(20)
                        )
                    ]
    except Exception as exc:
        st.database_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        if own_engine:
            engine.dispose()
    if log_errors and cfg.log.file is not None:
        st.recent_errors = log_file_errors(cfg.log.file)
    st.lines = linespeed.read_published(cfg.spool_dir)
    try:
        st.spool_free = shutil.disk_usage(cfg.spool_dir).free
    except OSError:
        st.spool_free = None
    results: dict[str, upstream.EchoResult] = {}
    if echo_nodes and cfg.nodes:
        with ThreadPoolExecutor(max_workers=min(8, len(cfg.nodes))) as pool:
            for r in pool.map(lambda n: upstream.echo(cfg, n), cfg.nodes):
                results[r.node] = r
    for name, node in cfg.nodes.items():
        r = results.get(name)
        st.nodes.append(
            {
                "name": name,
                "ae_title": node.ae_title,
                "address": f"{node.host}:{node.port}",
                "roles": ",".join(node.roles) or "-",
                "reachable": None if r is None else r.ok,
                "detail": "not checked" if r is None else r.detail,
                "ms": None if r is None else r.ms,
            }
        )
    return st


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def line_words(cfg: Config, node: str, line: dict[str, Any]) -> str:
    """'2.41 MB/s measured; sending compressed (auto); 3 cut as too slow' for one node."""
    parts = ["not measured yet" if line.get("rate") is None else f"{line['rate'] / 1e6:.2f} MB/s measured"]
    if cfg.nodes[node].transfer_syntax == "auto":
        parts.append("sending " + ("compressed, lossless" if line.get("compress") else "as received") + " (auto)")
    if line.get("too_slow"):
        parts.append(f"{line['too_slow']} association(s) cut below min_line_speed")
    return "; ".join(parts)


def _render_lines(st: Status) -> list[str]:
    return [f"line to {node}: {line_words(st.config, node, line)}"
            for node, line in sorted(st.lines.items()) if node in st.config.nodes
            and (line.get("rate") is not None or line.get("too_slow")
                 or st.config.nodes[node].transfer_syntax == "auto")]


def render(st: Status) -> str:
    cfg = st.config
    out = [f"qrproxy {cfg.ae_title} on {cfg.host}:{cfg.port}  (config {cfg.source})"]
    if st.database_error:
        out.append(f"database: UNUSABLE: {st.database_error}")
    elif st.revision is None:
        out.append("database: empty (run `qrproxy db upgrade` or `serve`)")
    else:
        out.append(f"database: revision {st.revision}; " + ", ".join(f"{k} {v}" for k, v in st.counts.items()))
    free = "unknown (spool folder missing)" if st.spool_free is None else f"{st.spool_free / 1e9:.1f} GB free"
    out.append(f"spool: {cfg.spool_dir} ({free})")
    out += _render_spool_usage(st)
    out.append("")
    if st.nodes:
        rows = [["NODE", "AE TITLE", "ADDRESS", "ROLES", "REACHABLE", "DETAIL"]]
        for n in st.nodes:
            reach = "-" if n["reachable"] is None else ("yes" if n["reachable"] else "NO")
            detail = n["detail"] + (f" ({n['ms']} ms)" if n["ms"] is not None else "")
            rows.append([n["name"], n["ae_title"], n["address"], n["roles"], reach, detail])
        out.append(table(rows))
    else:
        out.append("no nodes configured")
    out.append("")
    if st.queues:
        rows = [["QUEUE", "PENDING", "IN FLIGHT", "HELD", "SENT", "OLDEST UNSENT"]]
        for node in sorted(st.queues):
            q = st.queues[node]
            oldest = st.oldest.get(node)
            rows.append([node, str(q.get("pending", 0)), str(q.get("inflight", 0)), str(q.get("held", 0)),
                         str(q.get("sent", 0)), _utc(oldest) if oldest else "-"])
        out.append(table(rows))
        for node, reason, n in st.held_reasons:
            out.append(f"held for {node}: {n} x {reason}")
        out += _render_lines(st)
    else:
        out.append("forward queue empty")
    out += _render_worklist(st)
    if st.prefetch:
        rows = [["PREFETCH RULE", "STATE", "STUDIES", "BYTES", "LAST ERROR"]]
        rows += [[rule, state, str(n), str(size), (err or "")[:100]] for rule, state, n, size, err in st.prefetch]
        out += ["", table(rows)]
    out += _render_commitment(st)
    if cfg.refresh:
        out.append("")
        rows = [["REFRESH", "NODE", "KIND", "SCHEDULE", "LAST RUN", "RESULT", "ROWS", "LAST OK", "ERROR"]]
        for job in cfg.refresh:
            run = st.refresh_runs.get(job.name)
            schedule = f"every {_duration(job.every)}" if job.every is not None else f"cron {job.cron}"
            if run is None:
                rows.append([job.name, job.node, job.kind, schedule, "never", "-", "-", "-", ""])
                continue
            when = run["finished_at"] or run["started_at"]
            rows.append([job.name, job.node, job.kind, schedule, _utc(when), run["status"], str(run["rows"]),
                         _utc(st.refresh_last_ok.get(job.name)), (run["error"] or "")[:100]])
        out.append(table(rows))
    if st.recent_errors:
        out += ["", f"recent errors ({len(st.recent_errors)}, newest last):"]
        out += [f"  {line[:200]}" for line in st.recent_errors]
    elif cfg.log.file is not None:
        out += ["", f"recent errors: none in {cfg.log.file}"]
    return "\n".join(out)


def log_file_errors(path: Any, limit: int = 20, tail_bytes: int = 256 * 1024) -> list[str]:
    """The last `limit` WARNING/ERROR lines of the log file (only its tail is read: logs grow for years)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    lines = [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln]
    return lines[-limit:]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _render_spool_usage(st: Status) -> list[str]:
    u, ret = st.spool_usage, st.config.retention
    if not u:
        return []
    out = [f"spool usage: {_mb(u['bytes'])} in {u['objects']} objects; {u['studies']} studies held locally: "
           f"{u['evictable']} evictable ({_mb(u['evictable_bytes'])}), {u['pinned']} pinned "
           f"({_mb(u['pinned_bytes'])}), {u['owed']} owed a forward or commitment ({_mb(u['owed_bytes'])})"]
    if ret is None:
        out.append("retention: not configured (nothing is evicted)")
        return out

    def limits(lim: Any) -> list[str]:
        out = [f"max_bytes {_mb(lim.max_bytes)}"] if lim.max_bytes is not None else []
        out += [f"max_age {_duration(lim.max_age)}"] if lim.max_age is not None else []
        out += [f"min_free {_mb(lim.min_free)}"] if getattr(lim, "min_free", None) is not None else []
        return out

    parts = [", ".join(limits(ret)) or "no global limits"]
    parts += [f"{name}: " + ", ".join(limits(lim)) for name, lim in ret.nodes.items()]
    out.append(f"retention: every {_duration(ret.every)}; " + "; ".join(parts))
    return out


def _collect_worklist(st: Status, s: Any) -> None:
    item = models.WorklistItem
    st.worklist = {"open": s.execute(select(func.count()).select_from(item).where(item.done_at.is_(None))).scalar_one(),
                   "done": s.execute(select(func.count()).select_from(item).where(item.done_at.is_not(None))).scalar_one()}
    st.mpps_queues = mpps_relay.depths(s)
    msg = models.MppsMessage
    st.mpps_held = [(node, reason or "", n) for node, reason, n in s.execute(
        select(msg.node, msg.last_error, func.count()).where(msg.state == models.ForwardState.held)
        .group_by(msg.node, msg.last_error).limit(20))]


def _render_worklist(st: Status) -> list[str]:
    out = []
    if st.worklist:
        out += ["", f"worklist: {st.worklist['open']} items answered, {st.worklist['done']} done (MPPS or stored)"]
    if st.mpps_queues:
        rows = [["MPPS RELAY", "PENDING", "HELD", "SENT"]]
        for node in sorted(st.mpps_queues):
            q = st.mpps_queues[node]
            rows.append([node, str(q.get("pending", 0)), str(q.get("held", 0)), str(q.get("sent", 0))])
        out += ["", table(rows)]
        out += [f"mpps held for {node}: {n} x {reason}" for node, reason, n in st.mpps_held]
    return out


def _render_commitment(st: Status) -> list[str]:
    if not st.commitment and not st.commitment_out:
        return []
    counts = ", ".join(f"{k} {v}" for k, v in sorted(st.commitment.items())) or "none"
    out = ["", f"storage commitment: {counts}"]
    if st.commitment_open:
        rows = [["COMMITMENT", "REQUESTER", "POLICY", "STATE", "ITEMS", "RECEIVED", "ATTEMPTS", "LAST ERROR"]]
        for r in st.commitment_open:
            items = " ".join(f"{k}:{v}" for k, v in sorted(r["items"].items()))
            rows.append([r["transaction"], r["requester"], r["policy"], r["state"], items, _utc(r["received_at"]),
                         str(r["attempts"]), r["error"][:80]])
        out.append(table(rows))
    for node in sorted(st.commitment_out):
        q = st.commitment_out[node]
        out.append(f"commitment requests to {node}: " + ", ".join(f"{k} {v}" for k, v in sorted(q.items())))
    return out


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _utc(when: Any) -> str:
    """A database timestamp as UTC text (SQLite hands back naive UTC, PostgreSQL aware)."""
    if when is None:
        return "-"
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%SZ")

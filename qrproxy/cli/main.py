"""Command line (CONTRACT.md): argument parsing only; the work is done by app/, db/, upstream.

Exit codes: 0 ok, 2 bad config or usage, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from qrproxy import __version__
from qrproxy.cli.load import ConfigError, load_config
from qrproxy.config.schema import Config

if TYPE_CHECKING:
    from qrproxy.config.schema import RefreshJob
    from qrproxy.jobs.refresh import RefreshResult

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 as well; keep the message short
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"qrproxy: error: {message}\n")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every verb takes, before or after it (`qrproxy status -c site.yml` as DCMTK's
    tools take options anywhere). On the verbs the defaults are suppressed, so a value given before
    the verb is not reset by the verb's parser."""
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--config", "-c", metavar="FILE", help="config file (default: $QRPROXY_CONFIG)",
                   **({"default": argparse.SUPPRESS} if suppress else {"default": None}))
    p.add_argument("--verbose", "-v", action="count", help="more log detail: -v INFO, -vv DEBUG",
                   **(d or {"default": 0}))
    p.add_argument("--log-level", metavar="LEVEL", type=str.upper, choices=LOG_LEVELS,
                   help="log level for this run (DEBUG, INFO, WARNING, ERROR); overrides log.level",
                   **(d or {"default": None}))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qrproxy", description="Edge DICOM proxy: cache, spool, forward, retrieve, commit.")
    _global_options(p, suppress=False)
    p.add_argument("--version", action="version", version=f"qrproxy {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("serve", parents=[common], help="run the proxy in the foreground until SIGTERM/SIGINT")
    sub.add_parser("check", parents=[common], help="validate the config; exit 0, or 2 with errors naming key and line")
    db = sub.add_parser("db", parents=[common], help="database schema")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", parser_class=_Parser)
    db_sub.required = True
    db_sub.add_parser("upgrade", parents=[common], help="upgrade the schema to the newest revision (serve does this too)")
    rf = sub.add_parser("refresh", parents=[common], help="run one refresh job (or all) now and print counts")
    rf.add_argument("name", nargs="?", help="job name (default: every job)")
    pf = sub.add_parser("prefetch", parents=[common], help="run one prefetch rule (or all) now and print counts")
    pf.add_argument("name", nargs="?", help="rule name (default: every rule)")
    pf.add_argument("--now", action="store_true", help="run even outside the rule's hours")
    st = sub.add_parser("status", parents=[common], help="nodes and their reachability, queues, database, spool")
    st.add_argument("--no-echo", action="store_true", help="do not C-ECHO the nodes")

    q = sub.add_parser("queue", parents=[common], help="inspect and act on the forward queue")
    q_sub = q.add_subparsers(dest="queue_command", metavar="ACTION", parser_class=_Parser)
    q_sub.required = True
    for action, text in (
        ("list", "list queue rows"),
        ("retry", "pending and held rows: try again now"),
        ("hold", "pending rows: hold (not sent until released)"),
        ("release", "held rows: back to pending with a fresh attempt budget"),
        ("purge", "delete rows (not in flight): those instances are no longer owed to those nodes"),
    ):
        a = q_sub.add_parser(action, parents=[common], help=text)
        a.add_argument("--node", help="node name")
        a.add_argument("--state", choices=["pending", "inflight", "sent", "held"],
                       help="only rows in this state" + (" (default: every state but sent; --json: every state)" if action == "list" else ""))
        a.add_argument("--study", metavar="UID", help="Study Instance UID")
        a.add_argument("--id", type=int, action="append", default=[], dest="ids", help="row id (repeatable)")
        if action == "list":
            a.add_argument("--limit", type=int, default=200, metavar="N",
                           help="at most N rows, oldest first (default 200)")
            a.add_argument("--json", action="store_true", help="JSON instead of a table")
        if action == "hold":
            a.add_argument("--reason", default="held by operator")
        if action == "purge":
            a.add_argument("--yes", action="store_true", help="really delete")
            a.add_argument("--all", action="store_true", help="allow purging with no filter")

    rn = sub.add_parser("retention", parents=[common], help="evict local copies under the retention limits")
    rn_sub = rn.add_subparsers(dest="retention_command", metavar="ACTION", parser_class=_Parser)
    rn_sub.required = True
    rr = rn_sub.add_parser("run", parents=[common], help="run one retention pass now and print what it evicted")
    rr.add_argument("--dry-run", action="store_true", help="print what would be evicted, evict nothing")

    k = sub.add_parser("keys", parents=[common], help="the spool encryption key file (encryption.key_file)")
    k_sub = k.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)
    k_sub.required = True
    k_sub.add_parser("new", parents=[common], help="create the key file (mode 0600) with one key; refuses to overwrite")
    k_sub.add_parser("rotate", parents=[common], help="add a key that becomes current for new files; old keys stay")
    k_sub.add_parser("list", parents=[common], help="key ids, creation times, which is current")
    k_sub.add_parser("reencrypt", parents=[common], help="rewrite spool files under older keys (or plain) with the current key; "
                                       "resumable")

    r = sub.add_parser("rules", parents=[common], help="routes and mutations")
    r_sub = r.add_subparsers(dest="rules_command", metavar="ACTION", parser_class=_Parser)
    r_sub.required = True
    rt = r_sub.add_parser("test", parents=[common], help="which routes and mutations apply to a file, without sending")
    rt.add_argument("file", help="a DICOM file, or a worklist item / data set as DICOM JSON (.json; one object or a list)")
    rt.add_argument("--on", choices=["store", "worklist", "query"], default=None,
                    help="which mutations to show (default: store for DICOM files, worklist for JSON)")
    rt.add_argument("--calling", default="", help="calling AE title of the imagined sender")
    rt.add_argument("--called", default=None, help="called AE title (default: qrproxy's ae_title)")
    return p


def _load(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("QRPROXY_CONFIG")
    if not path:
        raise ConfigError(["no config file: give --config FILE or set QRPROXY_CONFIG"])
    return load_config(path, check_key_file=args.command in ("serve", "check"),
                       check_host=args.command if args.command in ("serve", "check") else None)


def cmd_check(cfg: Config) -> int:
    print(
        f"{cfg.source}: ok: ae_title {cfg.ae_title} on {cfg.host}:{cfg.port}, {len(cfg.nodes)} nodes, "
        f"{len(cfg.refresh)} refresh jobs, {len(cfg.routes)} routes, {len(cfg.mutations)} mutations"
    )
    return EXIT_OK


def cmd_serve(cfg: Config) -> int:
    from qrproxy.app import serve
    from qrproxy.logs import setup_logging

    setup_logging(cfg.log.level, cfg.log.file, cfg.log.dicom_debug, cfg.log.max_size, cfg.log.backups)
    try:
        serve(cfg)
    except OSError as exc:
        logging.getLogger("qrproxy").error("cannot serve: %s", exc)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_db_upgrade(cfg: Config) -> int:
    from qrproxy.index.session import make_engine, upgrade

    engine = make_engine(cfg.database)
    rev = upgrade(engine)
    print(f"database {engine.url.render_as_string(hide_password=True)} at revision {rev}")
    engine.dispose()
    return EXIT_OK


def cmd_status(cfg: Config, echo_nodes: bool) -> int:
    from qrproxy.ops.status import collect, render

    print(render(collect(cfg, echo_nodes=echo_nodes)))
    return EXIT_OK


def cmd_refresh(cfg: Config, name: str | None) -> int:
    """Run refresh jobs now, in this process, against the database itself (no server needed)."""
    from qrproxy.index.session import make_engine, make_sessionmaker, upgrade

    known = [job.name for job in cfg.refresh]
    if name is not None and name not in known:
        print(f"qrproxy: error: unknown refresh job {name!r} (known: {', '.join(known) or 'none'})",
              file=sys.stderr)
        return EXIT_CONFIG
    jobs = [job for job in cfg.refresh if name is None or job.name == name]
    if not jobs:
        print("no refresh jobs configured")
        return EXIT_OK
    engine = make_engine(cfg.database)
    try:
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        failed = False
        for job in jobs:
            r = _run_when_free(cfg, sessions, job)
            if r.skipped:
                print(f"{job.name}: skipped: {r.error}")
                failed = True  # asked to run now, and it did not
                continue
            outcome = "ok" if r.ok else f"error: {r.error}"
            what = "items" if job.kind == "worklist" else "studies"
            print(f"{job.name}: node {job.node}, rows {r.rows}, new {what} {r.new_studies}, "
                  f"updated {r.updated}, " + (f"unchanged {r.unchanged}, " if job.kind == "worklist" else "")
                  + f"removed {r.removed}, {outcome}")
            failed = failed or not r.ok
        return EXIT_RUNTIME if failed else EXIT_OK
    finally:
        engine.dispose()


def _run_when_free(cfg: Config, sessions: Any, job: "RefreshJob") -> "RefreshResult":
    """Asked to run a job now while the server (or another command) is running it: wait for that
    run to end, then run ours, so the counts printed come from a run that started after the ask."""
    import time

    from qrproxy.jobs.refresh import run_job

    deadline = time.monotonic() + job.timeout + 30
    said = False
    while True:
        r = run_job(cfg, sessions, job, log_skip=False)
        if not (r.skipped and r.error == "running in another process") or time.monotonic() > deadline:
            return r
        if not said:
            print(f"{job.name}: a run is in progress in another process; waiting for it to end",
                  file=sys.stderr)
            said = True
        time.sleep(0.5)


def cmd_prefetch(cfg: Config, name: str | None, now: bool) -> int:
    """Run prefetch rules now in this process. With `retrieve_method: move` the upstream sends the
    instances to qrproxy's port, so the server must be running to receive them."""
    from qrproxy.app import Proxy

    known = [r.name for r in cfg.prefetch]
    if name is not None and name not in known:
        print(f"qrproxy: error: unknown prefetch rule {name!r} (known: {', '.join(known) or 'none'})",
              file=sys.stderr)
        return EXIT_CONFIG
    if not known:
        print("no prefetch rules configured")
        return EXIT_OK
    proxy = Proxy(cfg)
    try:
        proxy.prepare()
        failed = False
        for rule in [r for r in known if name is None or r == name]:
            r = proxy.prefetcher.run(rule, force=now)
            if r.skipped:
                print(f"{rule}: skipped: {r.skipped}")
                continue
            print(f"{rule}: patients {r.patients}, planned {r.planned}, fetched {r.fetched} ({r.bytes} bytes), "
                  f"failed {r.failed}, held {r.held}")
            failed = failed or bool(r.failed)
        return EXIT_RUNTIME if failed else EXIT_OK
    finally:
        proxy.engine.dispose()


def cmd_queue(cfg: Config, args: argparse.Namespace) -> int:
    import json

    from qrproxy.index.session import make_engine, make_sessionmaker
    from qrproxy.ops import queue_actions as queue

    f = queue.Filter(node=args.node, state=args.state, study=args.study, ids=args.ids,
                     unsent=args.queue_command == "list" and not args.ids and not getattr(args, "json", False))
    if args.node and args.node not in cfg.nodes:
        print(f"qrproxy: error: unknown node {args.node!r} (known: {', '.join(cfg.nodes) or 'none'})",
              file=sys.stderr)
        return EXIT_CONFIG
    engine = make_engine(cfg.database)
    sessions = make_sessionmaker(engine)
    try:
        action = args.queue_command
        if action == "list":
            with sessions() as s:
                rows = queue.list_rows(s, f, args.limit)
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                from qrproxy.ops.status import table

                lines = [["ID", "NODE", "STATE", "TRIES", "NEXT ATTEMPT (UTC)", "SOP INSTANCE UID", "LAST ERROR"]]
                for r in rows:
                    when = r["sent_at"] if r["state"] == "sent" else r["next_attempt_at"]
                    lines.append([str(r["id"]), r["node"], r["state"],
                                  str(r["attempts"]) if r["state"] != "sent" else "-",
                                  (when or "-")[:19].replace("T", " ") + ("Z" if when else "")
                                  + (" sent" if r["state"] == "sent" and when else ""),
                                  r["sop_instance_uid"], (r["last_error"] or "")[:80]])
                print(table(lines) if rows else "queue empty for this filter"
                      + ("" if args.state or args.ids else " (sent rows are listed with --state sent)"))
            return EXIT_OK
        if action == "purge" and f.is_empty() and not args.all:
            print("qrproxy: error: purge needs a filter (--node/--state/--study/--id) or --all", file=sys.stderr)
            return EXIT_CONFIG
        if action == "purge" and not args.yes:
            with sessions() as s:
                n = len(queue.list_rows(s, f, limit=10**9))
            print(f"would purge up to {n} rows; add --yes to delete them")
            return EXIT_OK
        from qrproxy.progress import Progress

        # In batches of row ids, each its own transaction, so a purge of a million rows shows progress
        # and never holds one huge lock; each batch re-applies the filter (a row that changed state
        # meanwhile is left alone, as a single statement would have).
        with sessions() as s:
            ids = queue.matching_ids(s, f)
        n = 0
        with Progress(f"queue {action}", len(ids), "rows") as bar:
            for start in range(0, len(ids), 1000):
                batch = replace(f, ids=ids[start:start + 1000])
                with sessions.begin() as s:
                    n += _queue_action(s, action, batch, args)
                bar.update(min(start + 1000, len(ids)))
        if action in ("hold", "purge"):
            n += _settle_inflight(sessions, replace(f, ids=ids), action, args)
        verb = {"retry": "set to retry now", "hold": "held", "release": "released", "purge": "purged"}[action]
        print(f"{n} of {len(ids)} matching rows {verb}"
              + ("" if n == len(ids) or action == "purge" else f" (the other {len(ids) - n} are in a state {action} leaves alone)"))
        return EXIT_OK
    finally:
        engine.dispose()


def _queue_action(session: Any, action: str, f: Any, args: argparse.Namespace) -> int:
    """Apply one `queue` action to the rows of `f`; how many rows it changed."""
    from qrproxy.ops import queue_actions as queue

    if action == "hold":
        return queue.hold(session, f, args.reason)
    return {"retry": queue.retry, "release": queue.release, "purge": queue.purge}[action](session, f)


INFLIGHT_WAIT = 15.0


def _settle_inflight(sessions: Any, f: Any, action: str, args: argparse.Namespace) -> int:
    """Rows a forwarder had claimed for an attempt when hold/purge ran were skipped (a row being sent
    is never changed under the sender). An operator holding a study means all of it: wait for those
    attempts to end (seconds at most, bounded) and apply the action to them; say what is left."""
    import time

    from qrproxy.ops import queue_actions as queue

    n = 0
    deadline = time.monotonic() + INFLIGHT_WAIT
    while True:
        with sessions() as s:
            busy = queue.inflight_ids(s, f)
        if not busy or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
        with sessions.begin() as s:
            n += _queue_action(s, action, replace(f, ids=busy), args)
    if busy:
        done = "held" if action == "hold" else "purged"
        print(f"qrproxy: {len(busy)} rows are being sent right now and were not {done}; ask again",
              file=sys.stderr)
    return n


def cmd_retention(cfg: Config, args: argparse.Namespace) -> int:
    """One pass in this process, against the database and spool directly (no server needed)."""
    from qrproxy.index.session import make_engine, make_sessionmaker, upgrade
    from qrproxy.jobs.retention import run_pass
    from qrproxy.store.spool import Spool

    if cfg.retention is None:
        print("retention is not configured: nothing is evicted")
        return EXIT_OK
    engine = make_engine(cfg.database)
    try:
        upgrade(engine)
        from qrproxy.progress import Progress

        with Progress("retention" + (" (dry run)" if args.dry_run else ""), None, "studies") as bar:
            def on_study(done: int, total: int) -> None:
                bar.total = total
                bar.update(done)

            r = run_pass(cfg, make_sessionmaker(engine), Spool(cfg.spool_dir), dry_run=args.dry_run,
                         progress=on_study)
        if args.dry_run:
            for p in r.planned:
                print(f"would evict {p.holding.study_uid} {p.holding.objects} objects {p.holding.bytes} bytes "
                      f"reason {p.reason}" + (f" node {p.node}" if p.node else ""))
        for e in r.evicted:
            print(f"evicted {e.study_uid} {e.objects} objects {e.bytes} bytes reason {e.reason}"
                  + (f" node {e.node}" if e.node else ""))
        for uid, why in r.skipped:
            print(f"kept {uid}: {why}")
        for text in r.short:
            print(f"short: {text}")
        verb = "would evict" if args.dry_run else "evicted"
        n = len(r.planned) if args.dry_run else len(r.evicted)
        freed = sum(p.holding.bytes for p in r.planned) if args.dry_run else sum(e.bytes for e in r.evicted)
        print(f"{verb} {n} studies, {freed} bytes")
        return EXIT_OK
    finally:
        engine.dispose()


def _read_datasets(path: str) -> list:  # type: ignore[type-arg]
    """A Part 10 file, or DICOM JSON (PS3.18 F.2): one object or a list of them."""
    import json

    from pydicom import dcmread
    from pydicom.dataset import Dataset

    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head[:1] in (b"{", b"["):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        items = data if isinstance(data, list) else [data]
        return [Dataset.from_json(item) for item in items]
    return [dcmread(path, stop_before_pixels=True, force=False)]


def cmd_rules_test(cfg: Config, args: argparse.Namespace) -> int:
    import copy
    import json

    from pydicom.errors import InvalidDicomError

    from qrproxy.index.uidmap import MemoryPseudonyms
    from qrproxy.rules.anonymize import AnonymizeError
    from qrproxy.rules.routes import apply_mutations, describe, diff, mutations_for

    try:
        datasets = _read_datasets(args.file)
    except (OSError, InvalidDicomError, ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        print(f"qrproxy: error: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    is_json = not hasattr(datasets[0], "preamble")
    on = args.on or ("worklist" if is_json else "store")
    called = args.called if args.called is not None else cfg.ae_title
    # New UIDs shown here come from a throwaway map: `rules test` writes nothing to the database.
    pseudonyms = MemoryPseudonyms()
    print(f"file:          {args.file}")
    for n, ds in enumerate(datasets):
        if len(datasets) > 1:
            print(f"--- item {n + 1} of {len(datasets)}")
        if on == "store":
            d = describe(cfg, ds, args.calling, called)
            dec = d["decision"]
            print(f"sop instance:  {ds.get('SOPInstanceUID', '?')}  class {ds.get('SOPClassUID', '?')}")
            print(f"calling/called: {args.calling or '-'} -> {called}")
            print(f"defaults:      {', '.join(dec.defaults) or 'none'} ({dec.default_reason})")
            print(f"route:         {dec.route or 'no route matched'}")
            if dec.skipped_loop:
                print(f"not sent back: {', '.join(dec.skipped_loop)} (sent by that node)")
            print(f"destinations:  {', '.join(dec.destinations) or 'none (stored, not forwarded)'}")
            targets = [(node, mutations_for(cfg, "store", node, ds, args.calling, called))
                       for node in dec.destinations]
        else:
            targets = [(None, mutations_for(cfg, on, None, ds, args.calling, called))]
        for node, muts in targets:
            where = f"for {node}" if node else f"on {on}"
            if not muts:
                print(f"mutations {where}: none")
                continue
            print(f"mutations {where}: {', '.join(m.name for m in muts)}")
            after = copy.deepcopy(ds)
            try:
                lines = apply_mutations(after, muts, pseudonyms=pseudonyms, on=on)
            except AnonymizeError as exc:
                print(f"  anonymize failed, the instance would be held, not sent: {exc}")
                continue
            for line in lines:
                if "not " in line or "cut to" in line:
                    print(f"  note: {line}")
            for label, old, new in diff(ds, after):
                if old is None:
                    print(f"  + {label}: {new}")
                elif new is None:
                    print(f"  - {label}: {old} (removed)")
                else:
                    print(f"  ~ {label}: {old} -> {new}")
    return EXIT_OK


def cmd_keys(cfg: Config, action: str) -> int:
    from qrproxy.store import keys

    if cfg.encryption is None:
        print("qrproxy: error: encryption.key_file is not set in the config", file=sys.stderr)
        return EXIT_CONFIG
    path = cfg.encryption.key_file
    try:
        if action == "new":
            kid = keys.new_key_file(path)
            print(f"created key file {path} (mode 0600) with key {kid}; keep a copy somewhere safe: "
                  f"without it the spool cannot be read")
            return EXIT_OK
        if action == "rotate":
            kid = keys.rotate(path)
            print(f"key {kid} added to {path} and is now current; older keys stay for older files "
                  f"('qrproxy keys reencrypt' rewrites those)")
            return EXIT_OK
        if action == "list":
            entries, current = keys.list_keys(path)
            for e in entries:
                print(f"{e.id:<8} created {e.created or '-':<20} {'current' if e.id == current else ''}".rstrip())
            return EXIT_OK
        keyring = keys.load(path)
        from qrproxy.progress import Progress

        with Progress("re-encrypting", keys.count_spool_files(cfg.spool_dir), "files") as bar:
            st = keys.reencrypt(cfg.spool_dir, keyring, lambda s: bar.update(s.examined))
        print(f"{st.examined} spool files examined: {st.rewritten} re-encrypted with key {keyring.current_id} "
              f"({st.encrypted_plain} of them were plain), {st.current} already current, "
              f"{len(st.failed)} failed" + (f", {st.leftovers_removed} leftovers of an interrupted run removed"
                                            if st.leftovers_removed else ""))
        for rel, reason in st.failed:
            print(f"failed: {rel}: {reason}", file=sys.stderr)
        return EXIT_RUNTIME if st.failed else EXIT_OK
    except keys.KeyFileError as exc:
        print(f"qrproxy: error: encryption.key_file: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except FileExistsError as exc:
        print(f"qrproxy: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


def explain_failure(exc: BaseException, cfg: Config) -> str:
    """One line a site engineer can act on, instead of a driver's message with its SQL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, ProgrammingError

    try:
        db = make_url(str(cfg.database)).render_as_string(hide_password=True)
    except ArgumentError:
        db = "(unparsable URL)"
    if isinstance(exc, (OperationalError, ProgrammingError)):
        text = str(getattr(exc, "orig", exc)).splitlines()[0]
        if "no such table" in text or ("relation" in text and "does not exist" in text):
            return (f"database {db}: no qrproxy schema yet ({text}); "
                    "run `qrproxy db upgrade` or start `serve` once")
        return f"database {db}: {text}"
    if isinstance(exc, DBAPIError):
        return f"database {db}: {str(getattr(exc, 'orig', exc)).splitlines()[0]}"
    return f"{type(exc).__name__}: {exc}"


def _cli_log_level(args: argparse.Namespace) -> str | None:
    """--log-level, else -v (INFO) / -vv (DEBUG), else None (the config's log.level)."""
    if getattr(args, "log_level", None):
        return str(args.log_level)
    verbose = getattr(args, "verbose", 0) or 0
    return "DEBUG" if verbose >= 2 else "INFO" if verbose == 1 else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"qrproxy: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    level = _cli_log_level(args)
    if level is not None and args.command == "serve":
        cfg = cfg.model_copy(update={"log": cfg.log.model_copy(update={"level": level})})
    from qrproxy.logs import setup_logging

    if args.command != "serve":
        # the one-shot commands log to stderr only (the file belongs to serve); WARNING unless asked
        setup_logging(level or "WARNING", None, cfg.log.dicom_debug)
    try:
        if args.command == "check":
            return cmd_check(cfg)
        if args.command == "serve":
            return cmd_serve(cfg)
        if args.command == "db":
            return cmd_db_upgrade(cfg)
        if args.command == "refresh":
            return cmd_refresh(cfg, args.name)
        if args.command == "prefetch":
            return cmd_prefetch(cfg, args.name, args.now)
        if args.command == "status":
            return cmd_status(cfg, echo_nodes=not args.no_echo)
        if args.command == "queue":
            return cmd_queue(cfg, args)
        if args.command == "rules":
            return cmd_rules_test(cfg, args)
        if args.command == "retention":
            return cmd_retention(cfg, args)
        if args.command == "keys":
            return cmd_keys(cfg, args.keys_command)
    except KeyboardInterrupt:
        return EXIT_RUNTIME
    except Exception as exc:  # a runtime failure: say what, exit 1, keep the traceback for -vv
        logging.getLogger("qrproxy").debug("failure", exc_info=True)
        print(f"qrproxy: error: {explain_failure(exc, cfg)}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_CONFIG


__all__ = ["main", "build_parser"]

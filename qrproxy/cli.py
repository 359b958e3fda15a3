"""Command line (CONTRACT.md): argument parsing only; the work is done by app/, db/, upstream.

Exit codes: 0 ok, 2 bad config or usage, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .config import Config, ConfigError, load_config

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 as well; keep the message short
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"qrproxy: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qrproxy", description="Edge DICOM proxy: cache, spool, forward, retrieve, commit.")
    p.add_argument("--config", "-c", metavar="FILE", help="config file (default: $QRPROXY_CONFIG)")
    p.add_argument("--version", action="version", version=f"qrproxy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("serve", help="run the proxy in the foreground until SIGTERM/SIGINT")
    sub.add_parser("check", help="validate the config; exit 0, or 2 with errors naming key and line")
    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", parser_class=_Parser)
    db_sub.required = True
    db_sub.add_parser("upgrade", help="upgrade the schema to the newest revision (serve does this too)")
    st = sub.add_parser("status", help="nodes and their reachability, database, spool")
    st.add_argument("--no-echo", action="store_true", help="do not C-ECHO the nodes")
    return p


def _load(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("QRPROXY_CONFIG")
    if not path:
        raise ConfigError(["no config file: give --config FILE or set QRPROXY_CONFIG"])
    return load_config(path)


def cmd_check(cfg: Config) -> int:
    print(
        f"{cfg.source}: ok: ae_title {cfg.ae_title} on {cfg.host}:{cfg.port}, {len(cfg.nodes)} nodes, "
        f"{len(cfg.refresh)} refresh jobs, {len(cfg.routes)} routes, {len(cfg.mutations)} mutations"
    )
    return EXIT_OK


def cmd_serve(cfg: Config) -> int:
    from .app import Proxy
    from .logs import setup_logging

    setup_logging(cfg.log.level, cfg.log.file, cfg.log.dicom_debug)
    proxy = Proxy(cfg)
    try:
        proxy.serve_forever()
    except OSError as exc:
        logging.getLogger("qrproxy").error("cannot serve: %s", exc)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_db_upgrade(cfg: Config) -> int:
    from .db.session import make_engine, upgrade

    engine = make_engine(cfg.database)
    rev = upgrade(engine)
    print(f"database {engine.url.render_as_string(hide_password=True)} at revision {rev}")
    engine.dispose()
    return EXIT_OK


def cmd_status(cfg: Config, echo_nodes: bool) -> int:
    from .status import collect, render

    print(render(collect(cfg, echo_nodes=echo_nodes)))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"qrproxy: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    try:
        if args.command == "check":
            return cmd_check(cfg)
        if args.command == "serve":
            return cmd_serve(cfg)
        if args.command == "db":
            return cmd_db_upgrade(cfg)
        if args.command == "status":
            return cmd_status(cfg, echo_nodes=not args.no_echo)
    except KeyboardInterrupt:
        return EXIT_RUNTIME
    except Exception as exc:  # a runtime failure: say what, exit 1, keep the traceback for -v logs
        logging.getLogger("qrproxy").debug("failure", exc_info=True)
        print(f"qrproxy: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_CONFIG


__all__ = ["main", "build_parser"]

"""Modality Worklist C-FIND SCP (1.2.840.10008.5.1.4.31), answered per `query.mode`.

Three separate sources, so that the query mode decides only which to use:
- `local(query)`: the worklist items in the index (refresh jobs put them there), matched by
  matching.py's worklist model (PS3.4 K.6: step keys inside the Scheduled Procedure Step Sequence),
  minus items the proxy saw done (MPPS COMPLETED/DISCONTINUED, `worklist.remove_on_store`);
- `upstream(timeout)`: the same identifier as MWL C-FIND to the `worklist` node, its answers run
  through the `on: worklist` mutations as if they had been stored, so both paths answer alike;
- remember: none. An upstream answer holds only the keys the modality asked for; writing it over
  a whole stored item would lose the rest, so only refresh jobs fill the worklist cache.

`on: query` mutations apply to every answer, before matching (a modality asking for the station AE
a mutation sets finds the item). Answers are in each item's own character set (worklist.response).
C-CANCEL is read every few responses (net/tuning.let_peer_speak) and answered 0xFE00.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache
from pydicom.dataset import Dataset
from pynetdicom.sop_class import ModalityWorklistInformationFind
from sqlalchemy import select

from qrproxy.index.models import WorklistItem
from qrproxy.index.session import read_only
from qrproxy.logs import kv
from qrproxy.net import dicomenc
from qrproxy.query import hotcache
from qrproxy.query import modes as querymode
from qrproxy.query import worklist
from qrproxy.query.matching import (Query, QueryError, matches_in_python, parse_query, residual_keys,
                                    select_matching)
from qrproxy.rules import routes as rules
from qrproxy.scp import pending
from qrproxy.scp.associations import called_ae_title
from qrproxy.scp.responses import status as _status
from qrproxy.scu import upstream

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from qrproxy.config.schema import Config

log = logging.getLogger("qrproxy.mwl")

MWL_FIND = str(ModalityWorklistInformationFind)
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
UNABLE_TO_PROCESS = 0xC000


ITEM_ANSWERS = 20000  # encoded answers kept per (item content, return keys): a few MB


class WorklistFindSCP:
    def __init__(self, config: Config, engine: Engine):
        self.config = config
        self.engine = read_only(engine)
        nodes = list(self.config.nodes_with_role("worklist"))
        self.node: str | None = nodes[0] if nodes else None
        # A modality polls the same worklist query every minute or so: the encoded answer is kept
        # until a commit touches worklist_items (hotcache's engine events) or query.cache_ttl ends.
        self.hot = hotcache.HotCache(ttl=config.query.cache_ttl, probe=hotcache.version_probe(engine))
        hotcache.watch(engine)
        self.answers_by_item: LRUCache[Any, bytes] = LRUCache(maxsize=ITEM_ANSWERS)
        self._items_lock = threading.Lock()  # cachetools caches are not thread-safe

    # --- the three sources ---------------------------------------------------------------------

    def _query_mutations(self) -> bool:
        return any(m.on == "query" for m in self.config.mutations)

    def local(self, query: Query) -> Iterator[Dataset]:
        """The cache's answers: rows read (and the read transaction ended) before the first answer
        is built; each answer is built when asked for."""
        mutate = self._query_mutations()
        stmt = select(WorklistItem.identifier) if mutate else select_matching(query).with_only_columns(
            WorklistItem.identifier)
        stmt = stmt.where(WorklistItem.done_at.is_(None)).order_by(
            WorklistItem.sps_start_date, WorklistItem.sps_start_time, WorklistItem.id)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).scalars().all()
        return self._answers(query, (worklist.decode(data) for data in rows), mutate or bool(residual_keys(query)))

    def local_encoded(self, query: Query, key: Any, explicit: bool, info: dict[str, Any]) -> Iterator[bytes]:
        """`local`'s answers encoded for the association's transfer syntax: the whole answer from the
        hot cache when an identical request was answered since the worklist last changed, else each
        item's answer from `self.answers_by_item` when SQL decided the match alone (no residual keys,
        no query mutations), so a modality polling every minute costs a SELECT and no decoding.
        Answers are produced as they are sent (the first goes out before the last is built), and the
        whole answer is kept only when it was produced to the end."""
        hit = self.hot.get(key)
        if hit is not None:
            info["hot"] = True
            yield from hit
            return
        generation = self.hot.generation()
        encoded: list[bytes] = []
        if self._query_mutations() or residual_keys(query):
            for ds in self.local(query):
                encoded.append(dicomenc.encode_dataset(ds, explicit))
                yield encoded[-1]
        else:
            stmt = (select_matching(query).with_only_columns(WorklistItem.identifier)
                    .where(WorklistItem.done_at.is_(None))
                    .order_by(WorklistItem.sps_start_date, WorklistItem.sps_start_time, WorklistItem.id))
            with self.engine.connect() as conn:
                rows = conn.execute(stmt).scalars().all()
            shape = (explicit, query.return_keys)
            for data in rows:
                item_key = (hashlib.sha1(data).digest(), shape)  # content-addressed: never stale
                with self._items_lock:
                    answer = self.answers_by_item.get(item_key)
                if answer is None:
                    answer = dicomenc.encode_dataset(worklist.response(worklist.decode(data), query.return_keys),
                                                     explicit)
                    with self._items_lock:
                        self.answers_by_item[item_key] = answer
                encoded.append(answer)
                yield answer
        self.hot.put(key, encoded, generation, size=sum(map(len, encoded)))

    def _answers(self, query: Query, items: Iterable[Dataset], check: bool) -> Iterator[Dataset]:
        for item in items:
            rules.apply_mutations(item, rules.mutations_for(self.config, "query", None, item))
            if check and not matches_in_python(query, item):
                continue
            yield worklist.response(item, query.return_keys)

    def upstream(self, identifier: Dataset, query: Query) -> Callable[[float], list[Dataset]]:
        """MWL C-FIND to the worklist node within `timeout` seconds; answers mutated as stored items
        are (`on: worklist`, then `on: query`) and matched again, since a mutation may change a key."""

        def ask(timeout: float) -> list[Dataset]:
            assert self.node is not None
            out = []
            for answer in upstream.find(self.config, self.node, "worklist", identifier, timeout=timeout):
                for ds in worklist.split_steps(answer):
                    rules.apply_mutations(ds, rules.mutations_for(self.config, "worklist", None, ds))
                    out.append(ds)
            return list(self._answers(query, out, True))

        return ask

    def answers(self, identifier: Dataset, query: Query, key: Any = None, explicit: bool = True,
                info: dict[str, Any] | None = None) -> tuple[querymode.Answer, Iterable[Dataset | bytes]]:
        """The answers per `query.mode` (cache answers already encoded), and where they came from
        (filled in as they are produced)."""
        outcome = querymode.Answer()
        ask = self.upstream(identifier, query) if self.node is not None else None
        info = {} if info is None else info
        gen = querymode.answer(self.config.query.mode,
                               local=lambda: self.local_encoded(query, key, explicit, info), upstream=ask,
                               timeout=self.config.query.upstream_timeout, remember=None, what="mwl",
                               outcome=outcome)
        return outcome, gen

    # --- the handler ---------------------------------------------------------------------------

    def handle(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        t0 = time.monotonic()
        calling = (event.assoc.requestor.ae_title or "").strip()
        fields: dict[str, Any] = {"matches": 0, "status": "0x0000", "reason": None}
        try:
            try:
                identifier = event.identifier
                query = parse_query(identifier, None, "worklist")
            except QueryError as err:
                fields.update(status=f"0x{err.status:04X}", reason=err.comment)
                yield _status(err.status, err.comment), None
                return
            except Exception as exc:  # undecodable identifier
                fields.update(status=f"0x{UNABLE_TO_PROCESS:04X}", reason=f"cannot decode identifier: {exc}")
                yield _status(UNABLE_TO_PROCESS, fields["reason"]), None
                return
            explicit = event.context.transfer_syntax != dicomenc.IMPLICIT_LE
            raw = event.raw
            key = (explicit, raw) if raw is not None and not self._query_mutations() else None
            info: dict[str, Any] = {}
            fields["info"] = info
            try:
                outcome, matches = self.answers(identifier, query, key, explicit, info)
                fields["outcome"] = outcome
                matches = iter(matches)
                first = next(matches, None)
            except Exception as exc:
                log.exception("MWL C-FIND failed")
                fields.update(status=f"0x{OUT_OF_RESOURCES:04X}", reason=f"worklist unavailable: {type(exc).__name__}")
                yield _status(OUT_OF_RESOURCES, fields["reason"]), None
                return
            # Answers go out as P-DATA with identifiers written from the stored raw elements
            # (dicomenc.encode_dataset), not through pydicom's writer per response.
            answers = [] if first is None else itertools.chain([first], matches)
            yield from pending.stream(
                event, answers, fields,
                lambda ds: ds if isinstance(ds, bytes) else dicomenc.encode_dataset(ds, explicit))
        finally:
            ok = fields["status"] in ("0x0000", f"0x{CANCEL:04X}")
            outcome = fields.get("outcome")
            source = outcome.source if outcome is not None else "-"
            if outcome is not None and outcome.reason and not fields["reason"]:
                fields["reason"] = outcome.reason
            line = {"event": "c-find", "calling": calling, "called": called_ae_title(event.assoc),
                    "model": "worklist", "source": source, "matches": fields["matches"],
                    "status": fields["status"], "ms": int((time.monotonic() - t0) * 1000)}
            if fields.get("info", {}).get("hot"):
                line["hot"] = "yes"
            if fields["reason"]:
                line["reason"] = fields["reason"]
            log.log(logging.INFO if ok else logging.WARNING, kv(**line))


def contexts() -> list[tuple[str, list[str]]]:
    return [(MWL_FIND, TRANSFER_SYNTAXES)]


def handlers(config: Config, engine: Engine) -> dict[str, Any]:
    """SOP class -> the C-FIND service for it."""
    return {MWL_FIND: WorklistFindSCP(config, engine).handle}

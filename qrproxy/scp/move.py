"""Query/Retrieve C-MOVE and C-GET SCP (Patient Root and Study Root, all levels).

The instances to send are resolved in the index from the identifier's unique keys (hierarchical, and
relational where it costs nothing: an IMAGE-level request with only SOP Instance UIDs works). When the
index cannot tell the full list (a study it has never seen, or one whose known instance count exceeds
the instance rows it holds) and a `retrieve` node exists, the study is first listed from that node
(refresh.learn_studies), so that the sub-operation count is right before the first C-STORE.

Then the instances held in the spool are sent from there (read ahead on a small thread pool, in the
destination's accepted transfer syntax, converted once through the forwarder's variant cache), while
the ones that are not are retrieved through from the `retrieve` node (retrieve.py) and sent on as each
lands in the spool. pynetdicom runs the sub-operations: it opens the association to the move
destination from what the handler yields, sends each yielded data set, keeps the remaining /
completed / failed / warning counts, the Failed SOP Instance UID List, and the final status (0x0000,
0xB000 warning with failures, 0xA702 when every sub-operation failed, 0xFE00 after C-CANCEL, which is
checked before every sub-operation).

An instance that cannot be sent (no local copy and the retrieval failed, an unreadable spool file,
no accepted transfer syntax) is yielded as a stand-in that carries only its UIDs and no transfer
syntax: pynetdicom's C-STORE of it fails without a byte on the wire, which counts it failed and puts
its UID in the Failed SOP Instance UID List, exactly as a refused C-STORE would.

Refusals before any sub-operation (an unusable identifier, an upstream that must be asked but
cannot be) are logged here with the reason and raised, which pynetdicom answers with a 0xC5xx
"unable to process" failure status. An unknown Move Destination is 0xA801.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pynetdicom import build_context, evt
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelGet,
                                  PatientRootQueryRetrieveInformationModelMove,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)
from sqlalchemy import select

from qrproxy.config.schema import Node
from qrproxy.index.models import Instance, Patient, Series, SpoolObject, Study, utcnow
from qrproxy.jobs import refresh
from qrproxy.jobs.retention import touch_study
from qrproxy.logs import kv
from qrproxy.net.tuning import FastStore, fast_retrieve_pending, keep_responses_from_reactor
from qrproxy.rules.anonymize import AnonymizeError
from qrproxy.scp.associations import set_nodelay
from qrproxy.scu import upstream
from qrproxy.scu.forward import EXPLICIT_LITTLE, Job, candidates
from qrproxy.scu.retrieve import Retrieval
from qrproxy.scu.upstream import UpstreamError
from qrproxy.store.codec import TARGETS
from qrproxy.store.crypto import CryptoError
from qrproxy.store.spool import dcmread

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config
    from qrproxy.scu.forward import Forwarder
    from qrproxy.scu.retrieve import Retriever
    from qrproxy.store.spool import Spool

log = logging.getLogger("qrproxy.move")

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # only for placeholders of instances that cannot be sent
NATIVE = {EXPLICIT_LITTLE, IMPLICIT_LITTLE}
MOVE_MODELS = {str(PatientRootQueryRetrieveInformationModelMove): "patient",
               str(StudyRootQueryRetrieveInformationModelMove): "study"}
GET_MODELS = {str(PatientRootQueryRetrieveInformationModelGet): "patient",
              str(StudyRootQueryRetrieveInformationModelGet): "study"}
LEVEL_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}
MAX_CONTEXTS = 120
READ_AHEAD = 4
PENDING, CANCEL = 0xFF00, 0xFE00

_readers = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="move-read")


class Refused(Exception):
    """The request cannot be served at all; the message is the reason, for the log."""


@dataclass(frozen=True)
class Target:
    level: str
    keys: dict[str, tuple[str, ...]]  # keyword -> values (UID lists, PatientID)


@dataclass
class Item:
    sop_uid: str
    sop_class: str | None
    study_uid: str
    series_uid: str
    obj: tuple[int, str, str, str] | None  # (object_pk, path, sop_class_uid, transfer_syntax_uid)


def parse_target(identifier: Dataset, model: str) -> Target:
    """The level and unique keys of a C-MOVE / C-GET identifier (PS3.4 C.4.2.2.1, C.4.3.2.1)."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    allowed = ("PATIENT", "STUDY", "SERIES", "IMAGE") if model == "patient" else ("STUDY", "SERIES", "IMAGE")
    if level not in allowed:
        raise Refused(f"QueryRetrieveLevel {level or '(empty)'!r} is not valid for the {model} root model")
    keys: dict[str, tuple[str, ...]] = {}
    for keyword in LEVEL_KEYS.values():
        raw = identifier.get(keyword)
        if raw is None:
            continue
        values = list(raw) if isinstance(raw, MultiValue) else [raw]
        parts = tuple(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))
        if parts:
            keys[keyword] = parts
    own = LEVEL_KEYS[level]
    if own not in keys:
        raise Refused(f"{own} is required at level {level}")
    # Keys below the level mean nothing in a retrieve request; ignore them as DCMTK does.
    order = list(LEVEL_KEYS)
    for lower in order[order.index(level) + 1:]:
        keys.pop(LEVEL_KEYS[lower], None)
    return Target(level, keys)


def _placeholder(item: Item) -> Dataset:
    """A data set pynetdicom cannot send (no transfer syntax): its C-STORE fails locally and the
    instance is counted failed, with its UID in the Failed SOP Instance UID List."""
    ds = Dataset()
    ds.SOPClassUID = item.sop_class or SECONDARY_CAPTURE
    ds.SOPInstanceUID = item.sop_uid
    ds.file_meta = FileMetaDataset()
    return ds


def _stand_in(item: Item, sop_class: str, transfer_syntax: str) -> Dataset:
    """What pynetdicom is given for an instance FastStore writes from its file: the UIDs that choose
    the presentation context, nothing else (net/tuning.FastStore)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = item.sop_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def _fast_store(assoc: Any, spool: Spool) -> FastStore:
    fast = getattr(assoc, "_qrproxy_fast_store", None)
    if fast is None:
        fast = FastStore(assoc, spool.open)
        assoc._qrproxy_fast_store = fast
    return fast


def _accepted(assoc: Any, role: str) -> dict[str, set[str]]:
    """{SOP class: transfer syntaxes} qrproxy may send C-STOREs in on `assoc`."""
    out: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        if role == "get" and not cx.as_scu:
            continue
        out.setdefault(cx.abstract_syntax, set()).add(cx.transfer_syntax[0])
    return out


def _offers(target: str | None, received: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(candidates(target, received) + (IMPLICIT_LITTLE,)))


class RetrieveSCP:
    def __init__(self, config: Config, sessions: sessionmaker[Session], spool: Spool, retriever: Retriever,
                 forwarder: Forwarder):
        self.cfg = config
        self.sessions = sessions
        self.spool = spool
        self.retriever = retriever  # instances held only upstream
        self.forwarder = forwarder  # its converted variants and mutated copies, shared with forwarding
        self._plan_lock = threading.Lock()

    # --- what to send -----------------------------------------------------------------------------

    def _resolve(self, target: Target) -> list[Item]:
        q = (
            select(Instance.sop_instance_uid, Instance.sop_class_uid, Study.study_instance_uid,
                   Series.series_instance_uid, SpoolObject.id, SpoolObject.path, SpoolObject.sop_class_uid,
                   SpoolObject.transfer_syntax_uid)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .outerjoin(SpoolObject, SpoolObject.id == Instance.object_pk)
            .order_by(Study.study_instance_uid, Series.series_number, Series.series_instance_uid,
                      Instance.instance_number, Instance.sop_instance_uid)
        )
        columns = {"PatientID": Patient.patient_id, "StudyInstanceUID": Study.study_instance_uid,
                   "SeriesInstanceUID": Series.series_instance_uid, "SOPInstanceUID": Instance.sop_instance_uid}
        for keyword, values in target.keys.items():
            q = q.where(columns[keyword].in_(values))
        with self.sessions() as s:
            rows = s.execute(q).all()
        return [Item(r[0], r[6] or r[1], r[2], r[3], (r[4], r[5], r[6], r[7]) if r[4] is not None else None)
                for r in rows]

    def _incomplete_studies(self, target: Target, items: list[Item]) -> list[str]:
        """Study UIDs whose instance list the index cannot vouch for: asked for but unknown, known
        with fewer instance rows than the count the upstream reported, or (SERIES / IMAGE level)
        holding none of the requested instances. A relational request without a study UID is
        answered from the index alone: there is nothing to ask the upstream with."""
        wanted = set(target.keys.get("StudyInstanceUID", ()))
        if not wanted:
            return []
        have: dict[str, int] = {}
        for i in items:
            have[i.study_uid] = have.get(i.study_uid, 0) + 1
        with self.sessions() as s:
            counts = dict(s.execute(select(Study.study_instance_uid, Study.number_of_instances)
                                    .where(Study.study_instance_uid.in_(wanted))).all())
        out = []
        for uid in sorted(wanted):
            if uid not in counts:
                out.append(uid)
            elif target.level == "STUDY" and counts[uid] is not None and counts[uid] > have.get(uid, 0):
                out.append(uid)
            elif target.level in ("SERIES", "IMAGE") and not items:
                out.append(uid)
        return out

    def _retrieve_node(self) -> str | None:
        nodes = self.cfg.nodes_with_role("retrieve")
        return next(iter(nodes), None)

    def _learn_patients(self, node: str, patient_ids: tuple[str, ...]) -> list[str]:
        uids: list[str] = []
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = ""
        for pid in patient_ids:
            ident.PatientID = pid
            for m in upstream.find(self.cfg, node, "study", ident, timeout=self.cfg.nodes[node].timeout):
                uid = str(m.get("StudyInstanceUID", "") or "").strip()
                if uid:
                    uids.append(uid)
        return uids

    def items(self, target: Target, what: str) -> list[Item]:
        """The instances the request names, each with its local copy or None. Asks the `retrieve` node
        for study lists the index lacks; when that fails, answers from what the index knows, and
        refuses only when it knows nothing (the sub-operation count would be a guess)."""
        # Touched before the instance rows are read: a retention pass racing this request either
        # sees the use and keeps the study, or has already cleared object_pk (retrieve through).
        with self.sessions.begin() as s:
            for uid in target.keys.get("StudyInstanceUID", ()):
                touch_study(s, uid)
        items = self._resolve(target)
        node = self._retrieve_node()
        if node is None:
            return items
        try:
            if target.level == "PATIENT":
                studies = self._learn_patients(node, target.keys["PatientID"])
            else:
                studies = self._incomplete_studies(target, items)
            if studies:
                n = refresh.learn_studies(self.cfg, self.sessions, node, studies,
                                          timeout=self.cfg.nodes[node].timeout)
                log.info(kv(event="retrieve-listed", request=what, node=node, studies=len(studies), known=n))
                items = self._resolve(target)
        except UpstreamError as exc:
            if not items:
                raise Refused(f"the index does not know these instances and {node} cannot be asked: {exc}") from exc
            log.warning(kv(event="retrieve-list-failed", request=what, node=node, reason=str(exc),
                           detail="answering from the index"))
        return items

    # --- retrieving through ---------------------------------------------------------------------

    def _start_retrievals(self, remote: list[Item]) -> list[tuple[Retrieval | None, list[str]]]:
        """One upstream request per study for its fully missing series (or the whole study), one per
        partly missing series for its missing instances; (None, uids) when no node can be asked."""
        node = self._retrieve_node()
        if not remote:
            return []
        if node is None:
            return [(None, [i.sop_uid for i in remote])]
        retriever = self.retriever
        out: list[tuple[Retrieval | None, list[str]]] = list(retriever.running_for(node, [i.sop_uid for i in remote]))
        joined = {uid for _, uids in out for uid in uids}
        remote = [i for i in remote if i.sop_uid not in joined]
        if not remote:
            return out
        with self.sessions() as s:
            series_uids = sorted({i.series_uid for i in remote})
            partly_local = set(s.execute(
                select(Series.series_instance_uid).join(Instance, Instance.series_pk == Series.id)
                .where(Series.series_instance_uid.in_(series_uids), Instance.object_pk.is_not(None))).scalars())
        by_study: dict[str, dict[str, list[Item]]] = {}
        for i in remote:
            by_study.setdefault(i.study_uid, {}).setdefault(i.series_uid, []).append(i)
        for study, series in by_study.items():
            whole = [uid for uid in series if uid not in partly_local]
            if whole:
                classes = {i.sop_class for uid in whole for i in series[uid] if i.sop_class}
                uids = [i.sop_uid for uid in whole for i in series[uid]]
                r = retriever.fetch(node, "SERIES", {"StudyInstanceUID": [study], "SeriesInstanceUID": whole},
                                    classes, uids, all(i.sop_class for uid in whole for i in series[uid]))
                out.append((r, uids))
            for uid, its in series.items():
                if uid in whole:
                    continue
                r = retriever.fetch(node, "IMAGE", {"StudyInstanceUID": [study], "SeriesInstanceUID": [uid],
                                                    "SOPInstanceUID": [i.sop_uid for i in its]},
                                    {i.sop_class for i in its if i.sop_class}, [i.sop_uid for i in its],
                                    all(i.sop_class for i in its))
                out.append((r, [i.sop_uid for i in its]))
        return out

    def _learn_classes(self, event: Any, items: list[Item]) -> None:
        """Make the SOP class of every instance known before the association to a move destination
        is opened, since its presentation contexts are proposed per class. An instance held only
        upstream whose class the index does not know (DCMTK's dcmqrscp leaves SOPClassUID out of
        its C-FIND answers) is retrieved first, and its class read from the file that arrived:
        never guessed. The retrievals started here are the ones the sub-operations then join."""
        remote = [i for i in items if i.obj is None]
        if not any(not i.sop_class for i in remote):
            return
        t0 = time.monotonic()
        landed = self.retriever.local_objects([i.sop_uid for i in remote])
        for i in remote:
            obj = landed.get(i.sop_uid)
            if obj is not None:
                i.obj, i.sop_class = obj, obj[2]
        remote = [i for i in remote if i.obj is None]
        unknown = {i.sop_uid: i for i in remote if not i.sop_class}
        if not unknown:
            return
        with self._plan_lock:
            retrievals = self._start_retrievals(remote)
        learnt = 0
        for retrieval, uids in retrievals:
            wanted = [u for u in uids if u in unknown]
            if retrieval is None or not wanted:
                continue
            for uid, obj in self.retriever.wait_for(retrieval, wanted, cancelled=lambda: event.is_cancelled):
                if obj is not None:
                    unknown[uid].obj, unknown[uid].sop_class = obj, obj[2]
                    learnt += 1
        log.info(kv(event="c-move-classes", unknown=len(unknown), retrieved=learnt,
                    ms=int((time.monotonic() - t0) * 1000)))

    # --- sending ----------------------------------------------------------------------------------

    def _load(self, item: Item, accepted: dict[str, set[str]], target: str | None, node: str | None,
              calling: str, fast: FastStore | None = None) -> Dataset:
        """The data set to send for a local item, or its stand-in (logged) when it cannot be sent."""
        assert item.obj is not None
        pk, relpath, sop_class, ts = item.obj
        spool = self.spool
        usable = [t for t in _offers(target, ts) if t in accepted.get(sop_class, ())]
        why = None
        path: Any = None
        held = ts  # the transfer syntax of the file that will be sent
        try:
            if not usable:
                why = f"destination accepted SOP class {sop_class} in none of {', '.join(_offers(target, ts))}"
            elif usable[0] == ts or (ts in NATIVE and usable[0] in NATIVE):
                path = spool.path(relpath)  # native to native: pynetdicom re-encodes on the fly
            else:
                job = Job(0, pk, relpath, sop_class, item.sop_uid, ts, None, 0)
                converted, result = self.forwarder.variant(job, usable[0]).result()
                if result.ok and result.transfer_syntax in accepted.get(sop_class, ()):
                    path, held = converted, str(result.transfer_syntax)
                elif ts in usable:
                    path = spool.path(relpath)
                else:
                    why = f"cannot convert to a syntax the destination accepted: {result.reason}"
            if path is not None:
                spool.verify(path)
                ds = self.forwarder.mutated(path, node, calling, item.sop_uid)
                if ds is not None:
                    return ds
                if fast is None:
                    return dcmread(path)
                fast.expect(item.sop_uid, path, held)
                return _stand_in(item, sop_class, held)
        except (CryptoError, OSError, ValueError, AnonymizeError) as exc:
            why = f"local copy unusable: {type(exc).__name__}: {exc}"
        log.warning(kv(event="sub-operation-failed", sop=item.sop_uid, reason=why))
        return _placeholder(item)

    def _suboperations(self, event: Any, items: list[Item], store_assoc: Callable[[], Any], role: str,
                       node: str | None, what: str, t0: float) -> Iterator[tuple[int, Dataset | None]]:
        calling = (event.assoc.requestor.ae_title or "").strip()
        fast_retrieve_pending(event.assoc)
        assoc = store_assoc()
        accepted = _accepted(assoc, role) if assoc is not None else {}
        fast = _fast_store(assoc, self.spool) if assoc is not None else None
        target = TARGETS.get(self.cfg.nodes[node].transfer_syntax) if node else None
        # Instances that landed since the plan was made (another move retrieved them) are local now.
        pending = {i.sop_uid: i for i in items if i.obj is None}
        for uid, obj in self.retriever.local_objects(pending).items():
            pending[uid].obj = obj
        local = [i for i in items if i.obj is not None]
        remote = [i for i in items if i.obj is None]
        with self._plan_lock:  # two moves of one study: the second sees the first's retrieval
            retrievals = self._start_retrievals(remote)
        stats = {"local": 0, "retrieved": 0, "unavailable": 0}

        def load(item: Item) -> Dataset:
            return self._load(item, accepted, target, node, calling, fast)

        # Read ahead: the next few files are read (and decrypted) while the current one is sent.
        window: list[Future[Dataset]] = []
        queue = iter(local)
        for item in queue:
            window.append(_readers.submit(load, item))
            if len(window) >= READ_AHEAD:
                break
        while window:
            fut = window.pop(0)
            nxt = next(queue, None)
            if nxt is not None:
                window.append(_readers.submit(load, nxt))
            if event.is_cancelled:
                self._done(what, stats, items, t0, "cancelled")
                yield CANCEL, None
                return
            stats["local"] += 1
            yield PENDING, fut.result()
        by_uid = {i.sop_uid: i for i in remote}
        for retrieval, uids in retrievals:
            if retrieval is None:
                for uid in uids:
                    stats["unavailable"] += 1
                    log.warning(kv(event="sub-operation-failed", sop=uid, reason="no local copy and no retrieve node"))
                    yield PENDING, _placeholder(by_uid[uid])
                continue
            for uid, obj in self.retriever.wait_for(retrieval, uids, cancelled=lambda: event.is_cancelled):
                item = by_uid[uid]
                if obj is None:
                    stats["unavailable"] += 1
                    log.warning(kv(event="sub-operation-failed", sop=uid, reason="not retrieved from "
                                   f"{retrieval.node}: {retrieval.error or 'the node did not send it'}"))
                    ds = _placeholder(item)
                else:
                    item.obj = obj
                    stats["retrieved"] += 1
                    ds = load(item)
                if event.is_cancelled:
                    break
                yield PENDING, ds
            if event.is_cancelled:
                self._done(what, stats, items, t0, "cancelled")
                yield CANCEL, None
                return
        self._done(what, stats, items, t0, "done")

    def _done(self, what: str, stats: dict[str, int], items: list[Item], t0: float, result: str) -> None:
        studies = sorted({i.study_uid for i in items})
        now = utcnow()
        try:
            with self.sessions.begin() as s:
                # Least-recently-used order for retention: a study someone retrieves stays local longer.
                for uid in studies:
                    touch_study(s, uid, now)
        except Exception:  # the access time is a hint; never fail a retrieval for it
            log.exception("could not record the access time of %s", studies)
        log.info(kv(event=what, result=result, instances=len(items), local=stats["local"],
                    retrieved=stats["retrieved"], unavailable=stats["unavailable"],
                    ms=int((time.monotonic() - t0) * 1000)))

    # --- the handlers -------------------------------------------------------------------------------

    def _prepare(self, event: Any, models: dict[str, str], what: str) -> tuple[Target, list[Item]]:
        model = models.get(str(event.request.AffectedSOPClassUID), "study")
        try:
            target = parse_target(event.identifier, model)
            return target, self.items(target, what)
        except Refused as exc:
            log.warning(kv(event=what, calling=event.assoc.requestor.ae_title, result="refused", reason=str(exc)))
            raise
        except Exception as exc:
            log.warning(kv(event=what, calling=event.assoc.requestor.ae_title, result="refused",
                           reason=f"cannot read identifier: {type(exc).__name__}: {exc}"))
            raise

    def handle_move(self, event: Any) -> Iterator[Any]:
        t0 = time.monotonic()
        dest = (event.move_destination or "").strip()  # pynetdicom gives it as str
        found = self.cfg.node_for_ae(dest)
        if found is None:
            log.warning(kv(event="c-move", calling=event.assoc.requestor.ae_title, destination=dest,
                           result="refused", status="0xA801", reason="move destination is not a configured node"))
            yield None, None
            return
        node_name, node = found
        target, items = self._prepare(event, MOVE_MODELS, "c-move")
        self._learn_classes(event, items)
        log.info(kv(event="c-move-start", calling=event.assoc.requestor.ae_title, destination=node_name,
                    level=target.level, instances=len(items), local=sum(1 for i in items if i.obj is not None)))
        holder: dict[str, Any] = {}

        def accepted(ev: Any) -> None:
            # The destination never sends requests on this association; without this its reactor
            # thread can take a C-STORE response off the queue first (pynetdicom #875, see
            # pynetdicom_tuning) and the sub-operation then waits out the DIMSE timeout.
            keep_responses_from_reactor(ev.assoc)
            holder["assoc"] = ev.assoc

        yield node.host, node.port, {
            "ae_title": node.ae_title,
            "contexts": self._contexts(items, node),
            "evt_handlers": [(evt.EVT_ACCEPTED, accepted), (evt.EVT_CONN_OPEN, set_nodelay)],
        }
        yield len(items)
        yield from self._suboperations(event, items, lambda: holder.get("assoc"), "move", node_name, "c-move", t0)

    def handle_get(self, event: Any) -> Iterator[Any]:
        t0 = time.monotonic()
        target, items = self._prepare(event, GET_MODELS, "c-get")
        found = self.cfg.node_for_ae(event.assoc.requestor.ae_title or "")
        log.info(kv(event="c-get-start", calling=event.assoc.requestor.ae_title, level=target.level,
                    instances=len(items), local=sum(1 for i in items if i.obj is not None)))
        yield len(items)
        yield from self._suboperations(event, items, lambda: event.assoc, "get", found[0] if found else None,
                                       "c-get", t0)

    def _contexts(self, items: list[Item], node: Node) -> list[Any]:
        """Presentation contexts for the association to a move destination: per SOP class, the node's
        configured syntax, the syntaxes held, and the native fallbacks."""
        target = TARGETS.get(node.transfer_syntax)
        wanted: dict[str, list[str]] = {}
        for i in items:
            cls = i.obj[2] if i.obj else i.sop_class
            if not cls:
                continue  # not retrievable (see _learn_classes): its sub-operation fails, proposes nothing
            held = i.obj[3] if i.obj else EXPLICIT_LITTLE
            syntaxes = wanted.setdefault(cls, [])
            for ts in _offers(target, held):
                if ts not in syntaxes:
                    syntaxes.append(ts)
        if not wanted:
            # Nothing can be sent; the association still carries the sub-operations' failures.
            wanted[SECONDARY_CAPTURE] = [EXPLICIT_LITTLE, IMPLICIT_LITTLE]
        out = []
        for cls, syntaxes in wanted.items():
            # One context per (class, syntax): the peer may accept some and refuse others.
            for ts in syntaxes:
                if len(out) < MAX_CONTEXTS:
                    out.append(build_context(cls, [ts]))
        return out


def contexts() -> list[tuple[str, list[str]]]:
    return [(uid, TRANSFER_SYNTAXES) for uid in list(MOVE_MODELS) + list(GET_MODELS)]


def handlers(scp: RetrieveSCP) -> list[tuple[Any, Any]]:
    return [(evt.EVT_C_MOVE, scp.handle_move), (evt.EVT_C_GET, scp.handle_get)]

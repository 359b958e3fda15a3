"""Query/Retrieve C-MOVE and C-GET SCP (Patient Root and Study Root, all levels).

The instances to send are resolved in the index from the identifier's unique keys (hierarchical, and
relational where it costs nothing: an IMAGE-level request with only SOP Instance UIDs works). When the
index cannot tell the full list (a study it has never seen, or one whose known instance count exceeds
the instance rows it holds) and a `retrieve` node exists, the study is first listed from that node
(refresh.learn_studies), so that the sub-operation count is right before the first C-STORE.

Then the instances held in the spool are sent from there (read ahead on a small thread pool, in the
destination's accepted transfer syntax, converted once through the forwarder's variant cache), while
the ones that are not are retrieved through from the `retrieve` node (retrieve.py) and sent on as each
lands in the spool. `_run` performs the sub-operations (PS3.4 C.4.2.3, C.4.3.3): each instance's
file is written on the destination association (for C-MOVE one qrproxy opens to the destination,
for C-GET the requester's own) straight from the spool, after its meta group; the remaining /
completed / failed / warning counts go out in a Pending response after each, and the final status
is 0x0000, 0xB000 (warning, with the Failed SOP Instance UID List) when some failed, 0xA702 when
every one failed, 0xFE00 after a C-CANCEL (checked before every sub-operation), as DCMTK and
pynetdicom answer.

An instance that cannot be sent (no local copy and the retrieval failed, an unreadable spool file,
no accepted transfer syntax) is counted failed without a byte on the wire and its UID goes in the
Failed SOP Instance UID List, exactly as a refused C-STORE would.

Refusals before any sub-operation (an unusable identifier, an upstream that must be asked but
cannot be) are logged with the reason and answered 0xC511 ("unable to process"). An unknown Move
Destination, or one that cannot be associated with, is 0xA801.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
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
from qrproxy.net.association import AssociationEnded
from qrproxy.rules.anonymize import AnonymizeError
from qrproxy.scu import upstream
from qrproxy.scu.forward import EXPLICIT_LITTLE, Job, candidates
from qrproxy.scu.retrieve import Retrieval, split_whole
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
PENDING, CANCEL, SUCCESS = 0xFF00, 0xFE00, 0x0000
UNABLE_TO_PROCESS = 0xC511  # PS3.4 C.4.2.1.5 (C-MOVE) / C.4.3.1.4 (C-GET): Failed, unable to process
MOVE_DESTINATION_UNKNOWN = 0xA801
ALL_FAILED = 0xA702  # Refused: out of resources, unable to perform sub-operations
SOME_FAILED = 0xB000

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


@dataclass
class Sendable:
    """What one sub-operation sends: a spool file in the syntax it is held in, or a Dataset (a
    mutated copy, or a native file re-encoded in the other native syntax)."""

    path: Any = None
    dataset: Dataset | None = None


def _accepted(assoc: Any, role: str) -> dict[str, set[str]]:
    """{SOP class: transfer syntaxes} qrproxy may send C-STOREs in on `assoc`."""
    out: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        if role == "get" and not cx.as_scu:
            continue
        out.setdefault(cx.abstract_syntax, set()).add(cx.transfer_syntax)
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
                # up to the node's `associations` requests at once (scu/retrieve.py split_whole)
                parts = split_whole({uid: [i.sop_uid for i in series[uid]] for uid in whole},
                                    self.cfg.nodes[node].associations)
                for level, series_uids, sops in parts:
                    chosen = set(sops)
                    its = [i for uid in series_uids for i in series[uid] if not chosen or i.sop_uid in chosen]
                    keys = {"StudyInstanceUID": [study], "SeriesInstanceUID": series_uids}
                    if level == "IMAGE":
                        keys["SOPInstanceUID"] = sops
                    r = retriever.fetch(node, level, keys, {i.sop_class for i in its if i.sop_class},
                                        [i.sop_uid for i in its], all(i.sop_class for i in its))
                    out.append((r, [i.sop_uid for i in its]))
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
              calling: str) -> Sendable | None:
        """What to send for a local item, or None (logged) when it cannot be sent."""
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
                path = spool.path(relpath)
            else:
                job = Job(0, pk, relpath, sop_class, item.sop_uid, ts, None, 0)
                converted, result, _ = self.forwarder.variant(job, usable[0]).result()
                if result.ok and result.transfer_syntax in accepted.get(sop_class, ()):
                    path, held = converted, str(result.transfer_syntax)
                elif ts in usable:
                    path = spool.path(relpath)
                else:
                    why = f"cannot convert to a syntax the destination accepted: {result.reason}"
            if path is not None:
                spool.verify(path)
                ds = self.forwarder.mutated(path, node, calling, item.sop_uid)
                if ds is None and held not in accepted.get(sop_class, ()):
                    ds = dcmread(path)  # native to native: re-encoded in the syntax accepted
                if ds is not None:
                    if held not in accepted.get(sop_class, ()) or str(ds.file_meta.get("TransferSyntaxUID", "")) \
                            not in accepted.get(sop_class, ()):
                        ds.file_meta.TransferSyntaxUID = usable[0]
                    return Sendable(dataset=ds)
                return Sendable(path=path)
        except (CryptoError, OSError, ValueError, AnonymizeError) as exc:
            why = f"local copy unusable: {type(exc).__name__}: {exc}"
        log.warning(kv(event="sub-operation-failed", sop=item.sop_uid, reason=why))
        return None

    def _sendables(self, event: Any, items: list[Item], accepted: dict[str, set[str]], node: str | None,
                   what: str, t0: float, stats: dict[str, int],
                   reasons: list[str] | None = None) -> Iterator[tuple[Item, Sendable | None] | None]:
        """(item, what to send or None) for each instance, local ones first (read ahead), then the
        retrieved ones as they land; None when the requester cancelled. Why an instance could not
        be had goes to `reasons` (the requester's Error Comment)."""
        why = reasons if reasons is not None else []
        calling = (event.assoc.requestor.ae_title or "").strip()
        target = TARGETS.get(self.cfg.nodes[node].transfer_syntax) if node else None
        # Instances that landed since the plan was made (another move retrieved them) are local now.
        pending = {i.sop_uid: i for i in items if i.obj is None}
        for uid, obj in self.retriever.local_objects(pending).items():
            pending[uid].obj = obj
        local = [i for i in items if i.obj is not None]
        remote = [i for i in items if i.obj is None]
        with self._plan_lock:  # two moves of one study: the second sees the first's retrieval
            retrievals = self._start_retrievals(remote)

        def load(item: Item) -> Sendable | None:
            return self._load(item, accepted, target, node, calling)

        # Read ahead: the next few files are checked (and decrypted) while the current one is sent.
        window: list[tuple[Item, Future[Sendable | None]]] = []
        queue = iter(local)
        for item in queue:
            window.append((item, _readers.submit(load, item)))
            if len(window) >= READ_AHEAD:
                break
        while window:
            item, fut = window.pop(0)
            nxt = next(queue, None)
            if nxt is not None:
                window.append((nxt, _readers.submit(load, nxt)))
            if event.is_cancelled:
                yield None
                return
            stats["local"] += 1
            yield item, fut.result()
        by_uid = {i.sop_uid: i for i in remote}
        for retrieval, uids in retrievals:
            if retrieval is None:
                for uid in uids:
                    stats["unavailable"] += 1
                    log.warning(kv(event="sub-operation-failed", sop=uid, reason="no local copy and no retrieve node"))
                    why.append("no local copy and no retrieve node")
                    yield by_uid[uid], None
                continue
            for uid, obj in self.retriever.wait_for(retrieval, uids, cancelled=lambda: event.is_cancelled):
                item = by_uid[uid]
                if event.is_cancelled:
                    yield None
                    return
                if obj is None:
                    stats["unavailable"] += 1
                    log.warning(kv(event="sub-operation-failed", sop=uid, reason="not retrieved from "
                                   f"{retrieval.node}: {retrieval.error or 'the node did not send it'}"))
                    why.append(f"upstream {retrieval.node} refused: status 0x{retrieval.status:04X}, see qrproxy log"
                               if retrieval.status not in (None, 0, 0xB000) else
                               f"upstream {retrieval.node}: {retrieval.error or 'did not send it'}")
                    yield item, None
                else:
                    item.obj = obj
                    stats["retrieved"] += 1
                    yield item, load(item)
            if event.is_cancelled:
                yield None
                return

    def _run(self, event: Any, items: list[Item], store: Any, role: str, node: str | None, what: str,
             t0: float) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        """The sub-operations on `store` and the responses to yield (see the module docstring)."""
        accepted = _accepted(store, role)
        store.opener = self.spool.open
        stats = {"local": 0, "retrieved": 0, "unavailable": 0}
        remaining, completed, failed, warning = len(items), 0, 0, 0
        failed_uids: list[str] = []
        own_ae = self.cfg.ae_title
        message_id = event.request.MessageID

        def counts(with_remaining: bool = True) -> dict[str, Any]:
            return {"NumberOfRemainingSuboperations": remaining if with_remaining else None,
                    "NumberOfCompletedSuboperations": completed, "NumberOfFailedSuboperations": failed,
                    "NumberOfWarningSuboperations": warning}

        def failures() -> Dataset:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = failed_uids
            return ds

        result = "done"
        reasons: list[str] = []
        for step in self._sendables(event, items, accepted, node, what, t0, stats, reasons):
            if step is None:
                result = "cancelled"
                self._done(what, stats, items, t0, result)
                yield CANCEL, failures(), counts()
                return
            item, sendable = step
            status = None
            if sendable is not None:
                try:
                    rsp = store.send_c_store(sendable.dataset if sendable.dataset is not None else sendable.path,
                                             originator_aet=own_ae if role == "move" else None,
                                             originator_id=message_id if role == "move" else None)
                    status = getattr(rsp, "Status", None)
                except (AssociationEnded, OSError, ValueError, CryptoError) as exc:
                    log.warning(kv(event="sub-operation-failed", sop=item.sop_uid, reason=f"{type(exc).__name__}: {exc}"))
                    if role == "get" and not event.assoc.is_established:
                        raise
            remaining -= 1
            if status is None or (status & 0xF000) in (0xA000, 0xC000) or status == 0x0110:
                failed += 1
                failed_uids.append(item.sop_uid)
            elif status in (0xB000, 0xB006, 0xB007):
                warning += 1
            else:
                completed += 1
            yield PENDING, None, counts()
        self._done(what, stats, items, t0, result)
        if not failed and not warning:
            yield SUCCESS, None, counts(False)
        else:
            final = counts(False)
            if reasons:
                final["ErrorComment"] = reasons[0][:64]  # LO: what the modality's operator can read
            yield (ALL_FAILED if failed == len(items) else SOME_FAILED), failures(), final

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
        dest = event.move_destination
        calling = event.assoc.requestor.ae_title
        found = self.cfg.node_for_ae(dest)
        if found is None:
            log.warning(kv(event="c-move", calling=calling, destination=dest, result="refused", status="0xA801",
                           reason="move destination is not a configured node"))
            yield MOVE_DESTINATION_UNKNOWN, None
            return
        node_name, node = found
        try:
            target, items = self._prepare(event, MOVE_MODELS, "c-move")
            self._learn_classes(event, items)
        except Exception as exc:
            yield _failure(UNABLE_TO_PROCESS, exc), None
            return
        log.info(kv(event="c-move-start", calling=calling, destination=node_name, level=target.level,
                    instances=len(items), local=sum(1 for i in items if i.obj is not None)))
        if not items:
            self._done("c-move", {"local": 0, "retrieved": 0, "unavailable": 0}, items, t0, "done")
            yield SUCCESS, None, {"NumberOfCompletedSuboperations": 0, "NumberOfFailedSuboperations": 0,
                                  "NumberOfWarningSuboperations": 0}
            return
        try:
            ctx = upstream.associate(self.cfg, node_name, self._contexts(items, node))
            store = ctx.__enter__()
        except UpstreamError as exc:
            log.warning(kv(event="c-move", calling=calling, destination=node_name, result="failed", status="0xA801",
                           reason=str(exc)))
            yield _failure(MOVE_DESTINATION_UNKNOWN, exc), None
            return
        ok = False
        try:
            yield from self._run(event, items, store, "move", node_name, "c-move", t0)
            ok = True
        finally:
            try:
                if ok or store.is_established:
                    ctx.__exit__(None, None, None)
                else:
                    ctx.__exit__(RuntimeError, RuntimeError("abort"), None)
            except Exception:
                pass

    def handle_get(self, event: Any) -> Iterator[Any]:
        t0 = time.monotonic()
        try:
            target, items = self._prepare(event, GET_MODELS, "c-get")
        except Exception as exc:
            yield _failure(UNABLE_TO_PROCESS, exc), None
            return
        found = self.cfg.node_for_ae(event.assoc.requestor.ae_title or "")
        log.info(kv(event="c-get-start", calling=event.assoc.requestor.ae_title, level=target.level,
                    instances=len(items), local=sum(1 for i in items if i.obj is not None)))
        yield from self._run(event, items, event.assoc, "get", found[0] if found else None, "c-get", t0)

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
                    out.append((cls, [ts]))
        return out


def contexts() -> list[tuple[str, list[str]]]:
    return [(uid, TRANSFER_SYNTAXES) for uid in list(MOVE_MODELS) + list(GET_MODELS)]


def _failure(code: int, exc: Exception) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = str(exc)[:64]
    return ds

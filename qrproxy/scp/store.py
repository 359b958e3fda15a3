"""Storage SCP (C-STORE): receive into the spool, index, queue for forwarding; Success only when durable.

Reception streams: the association writes each data set fragment, straight from its receive buffer,
to an `IncomingFile` this module gives it (`sink_for`): a file in `spool/incoming/` that starts with
the file meta information, so memory stays flat for a 1 GB instance, the move into `spool/objects/`
is a same-filesystem atomic rename, and a crash leaves only `incoming/` leftovers, which the next
start deletes. A transfer cut off mid-data set has its file removed by the association.

With `encryption.key_file` the file is an encrypting writer, so no received data set ever rests on
disk in clear; the handler parses, checks and hashes the plaintext through the decrypting reader, in
the same order and with the same fsyncs as without encryption.

Order of a C-STORE, each step before the next (DESIGN.md "Durability"): free-space floor -> parse and
validate -> route -> fsync file, rename, fsync directory -> commit index row and forward rows -> Success.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from sqlalchemy.exc import IntegrityError

from qrproxy.index.writers import Header, IndexWriter
from qrproxy.logs import kv
from qrproxy.net import pdu
from qrproxy.query.worklist_index import close_on_store
from qrproxy.rules.routes import route
from qrproxy.scp.associations import called_ae_title
from qrproxy.scp.responses import status as _status
from qrproxy.store.crypto import CryptoError
from qrproxy.store.spool import Committed, Spool, fsync_file, hash_and_fsync

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config
    from qrproxy.scu.retrieve import Arrivals

log = logging.getLogger("qrproxy.store")

# PS3.4 B.2.3 / GG.4: Refused: Out of Resources; Error: Cannot Understand; Data Set does not match SOP Class.
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
DATASET_MISMATCH = 0xA900

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DEFLATED = "1.2.840.10008.1.2.1.99"
SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def truncation(ds: Dataset, size: int, f: BinaryIO) -> str | None:
    """Why the top-level data set does not fill the file exactly, or None when it does.

    pydicom reads a short value or a partial element header at the end of a file without complaint,
    so the check is explicit: every defined-length element must lie inside the file with all its
    bytes, and the last one must end exactly at the end of the file; a last element of undefined
    length (a sequence, encapsulated pixel data) must be closed by a sequence delimitation item.
    """
    last_end: int | None = 0
    # Dataset._dict holds the raw elements as read; the public get_item() would load deferred values
    # (the pixel data) into memory, which is what defer_size avoids.
    for tag in sorted(ds._dict):
        raw = ds._dict[tag]
        length = getattr(raw, "length", None)
        tell = getattr(raw, "value_tell", None)
        if length is None or tell is None:
            last_end = None
            continue
        if length == 0xFFFFFFFF:
            last_end = None
            continue
        end = tell + length
        if end > size:
            return f"element {tag} runs past the end of the data"
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and len(value) != length:
            return f"element {tag} has {len(value)} of {length} bytes"
        last_end = end
    if last_end is None:
        f.seek(max(0, size - 8))
        if f.read(8) != SEQ_DELIMITER:
            return "the last sequence or pixel data item is not closed"
    elif last_end != size:
        return f"{size - last_end} bytes after the last element"
    return None


def contexts(extra_sop_classes: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """Every storage SOP class pynetdicom knows (plus configured extras), with every transfer syntax:
    qrproxy stores as received, so there is no syntax it needs to refuse."""
    uids = [cx.abstract_syntax for cx in AllStoragePresentationContexts]
    uids += [u for u in extra_sop_classes or [] if u not in uids]
    return [(uid, list(STORE_SYNTAXES)) for uid in uids]


# The acceptor accepts the first of its syntaxes that the requestor offers: Explicit VR
# Little Endian first, so that a modality offering both in one context (pynetdicom's storescu does)
# has its files stored, and forwarded, as written, private elements keeping their VRs. DCMTK's
# storescp prefers the same.
STORE_SYNTAXES = ["1.2.840.10008.1.2.1"] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts != "1.2.840.10008.1.2.1"]


def configure_receive(spool: Spool) -> None:
    if spool.encrypted:
        kid, _ = spool.keys.current()  # type: ignore[union-attr]
        log.info(kv(event="spool-encryption", cipher="AES-256-GCM", current_key=kid))


_SHORT = struct.Struct("<HH2sH")


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHL", 2, elem, vr, 0, len(value)) + value
    return _SHORT.pack(2, elem, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble and file meta information (PS3.10 7.1) of a received instance, encoded with
    `struct` (pydicom's writer cost 0.4 ms per instance, a tenth of the whole receipt); the bytes
    are pydicom's, byte for byte (tests/test_dicomenc.py)."""
    body = b"".join([
        _meta_element(0x0001, b"OB", b"\0\1"),
        _meta_element(0x0002, b"UI", sop_class.encode("ascii", "replace")),
        _meta_element(0x0003, b"UI", sop_instance.encode("ascii", "replace")),
        _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii", "replace")),
        _meta_element(0x0012, b"UI", pdu.IMPLEMENTATION_UID.encode("ascii")),
        _meta_element(0x0013, b"SH", pdu.IMPLEMENTATION_VERSION.encode("ascii")),
        _meta_element(0x0016, b"AE", source_ae[:16].encode("ascii", "replace")) if source_ae else b"",
    ])
    return b"\0" * 128 + b"DICM" + _SHORT.pack(2, 0, b"UL", 4) + struct.pack("<L", len(body)) + body


class IncomingFile:
    """Where the association writes a received C-STORE data set: a new file in spool/incoming/,
    encrypting when the spool is; removed again if the transfer is cut off."""

    def __init__(self, spool: Spool, sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str):
        if spool.encrypted:
            self._f: Any = spool.open_incoming_writer(".dcm")
            self.path = Path(self._f.path)
            self.write = self._f.write
        else:
            # unbuffered: each PDV goes from the association's read buffer to the kernel, no copy
            # in between; hashed later, off this thread, together with the fsync
            self.path = spool.new_incoming(".dcm")
            self._f = open(self.path, "xb", buffering=0)
            self.write = self._write_all  # type: ignore[method-assign]
        self.write(file_meta(sop_class, sop_instance, transfer_syntax, source_ae))

    def _write_all(self, data: Any) -> None:
        view = memoryview(data)
        while view:
            view = view[self._f.write(view):]  # a raw file may take less than asked

    def close(self) -> None:
        self._f.close()

    def discard(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass
        _unlink(self.path)


def _hash_and_fsync(spool: Spool, path: Path) -> tuple[int, str]:
    if spool.encrypted:
        # read back through the decrypting reader, which also authenticates every chunk
        digest = spool.hash(path)
        fsync_file(path)
        return digest
    return hash_and_fsync(path)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class StoreSCP:
    def __init__(self, config: Config, engine: Engine, sessions: sessionmaker[Session], spool: Spool, io_pool: Executor,
                 notify_forward: Callable[[list[str]], None], arrivals: Arrivals):
        self.cfg = config
        self.sessions = sessions
        self.spool = spool
        self.io_pool = io_pool  # fsyncs of received files overlap with parsing and indexing
        self.notify_forward = notify_forward  # the forwarder: new queue rows for these nodes
        self.arrivals = arrivals  # retrievals waiting for instances (scu/retrieve.py)
        self.engine = engine
        self.index = IndexWriter()

    def _ignored(self, calling: str, sop_class: str) -> bool:
        ign = self.cfg.store.ignore_sop_classes
        return sop_class in ign.get(calling, ()) or sop_class in ign.get("*", ())

    def _retrieved_from(self, assoc: Any, calling: str) -> str | None:
        """The `retrieve` node this instance is a cache fill from, or None for new data to route.

        A C-STORE sub-operation of qrproxy's own C-GET arrives on an association qrproxy requested;
        one of an upstream C-MOVE to qrproxy comes from the calling AE of a `retrieve` node. Neither
        is forwarded anywhere: the PACS already has it."""
        if assoc.is_requestor:
            found = self.cfg.node_for_ae(assoc.acceptor.ae_title or "")
            return found[0] if found else (assoc.acceptor.ae_title or "").strip() or "upstream"
        found = self.cfg.node_for_ae(calling)
        if found is not None and "retrieve" in found[1].roles:
            return found[0]
        return None

    def _parse(self, f: BinaryIO, req: Any) -> tuple[Dataset, str] | Dataset:
        """The dataset without its bulk values (deferred: `f` must stay open while it is used), or a
        failure status saying what is wrong. `f` is the plaintext (spool.open)."""
        try:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            ds = dcmread(f, defer_size=4096)
            ts = str(ds.file_meta.TransferSyntaxUID)
            problem = None if ts == DEFLATED else truncation(ds, size, f)
        except CryptoError:
            raise
        except (InvalidDicomError, EOFError, RecursionError, ValueError, TypeError, OSError, NotImplementedError, KeyError,
                AttributeError) as exc:
            return _status(CANNOT_UNDERSTAND, f"cannot parse data set: {exc}")
        if problem:
            return _status(CANNOT_UNDERSTAND, f"data set truncated: {problem}")
        sop_instance = str(ds.get("SOPInstanceUID", "") or "").strip()
        sop_class = str(ds.get("SOPClassUID", "") or "").strip()
        if not sop_instance:
            return _status(CANNOT_UNDERSTAND, "SOP Instance UID missing")
        if len(sop_instance) > 64 or not UID_RE.match(sop_instance):
            return _status(CANNOT_UNDERSTAND, "SOP Instance UID is not a valid UID")
        if sop_instance != str(req.AffectedSOPInstanceUID).strip():
            return _status(DATASET_MISMATCH, "SOP Instance UID differs from the C-STORE request")
        if sop_class and sop_class != str(req.AffectedSOPClassUID).strip():
            return _status(DATASET_MISMATCH, "SOP Class UID differs from the C-STORE request")
        return ds, ts

    def handle(self, event: Any) -> int | Dataset:
        t0 = time.monotonic()
        assoc = event.assoc
        calling = (assoc.requestor.ae_title or "").strip()
        called = called_ae_title(assoc)
        req = event.request
        sop_class = str(req.AffectedSOPClassUID)
        sop_instance = str(req.AffectedSOPInstanceUID)
        path = Path(event.dataset_path)

        def fail(status: Dataset, level: int = logging.WARNING) -> Dataset:
            _unlink(path)
            log.log(level, kv(event="c-store", calling=calling, called=called, sop=sop_instance[:64],
                              status=f"0x{status.Status:04X}", reason=status.ErrorComment))
            return status

        if self._ignored(calling, sop_class):
            _unlink(path)
            log.info(kv(event="c-store", calling=calling, called=called, sop=sop_instance, status="0x0000",
                        action="ignored", sop_class=sop_class))
            return 0x0000

        spool = self.spool
        try:
            free = spool.free_bytes()
        except OSError:
            free = 0
        if free < self.cfg.store.min_free_space:
            return fail(_status(OUT_OF_RESOURCES, f"spool below free-space floor ({free // 1_000_000} MB free)"),
                        logging.ERROR)

        # Hashed and fsynced in a worker thread while this one parses and routes it.
        sync = self.io_pool.submit(_hash_and_fsync, spool, path)
        try:
            # Parsed and routed while open: deferred values (defer_size) are read from this handle.
            with spool.open(path) as f:
                parsed = self._parse(f, req)
                if isinstance(parsed, Dataset):
                    return fail(parsed)
                ds, ts = parsed
                try:
                    # the values are converted here, on first access: an unknown VR or a malformed
                    # value in an indexed or routed attribute is the sender's data set, not our fault
                    hdr = Header.from_dataset(ds)
                    decision = route(self.cfg, ds, calling, called)
                except (NotImplementedError, ValueError, TypeError, KeyError, AttributeError, EOFError,
                        RecursionError, InvalidDicomError) as exc:
                    return fail(_status(CANNOT_UNDERSTAND, f"cannot read attribute values: {exc}"))
        except (CryptoError, OSError) as exc:
            # Our own file failed to read back (disk error, or changed under us): a local failure.
            return fail(_status(OUT_OF_RESOURCES, f"spool file unreadable after writing: {exc}"), logging.ERROR)

        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        source = self._retrieved_from(assoc, calling)
        destinations = [] if source else decision.destinations
        # The copy's sender (retention's per-node limits): on qrproxy's own C-GET, the node asked.
        sender = (assoc.acceptor.ae_title or "").strip() if source and assoc.is_requestor else calling
        final: Path | None = None
        try:
            relpath, final = spool.reserve()
            # Durable in place before the transaction starts, so the database write lock is held
            # for the inserts only, never across an fsync.
            size, digest = sync.result()
            committed = Committed(relpath, size, digest)
            spool.place(path, final)

            def record() -> Any:
                with self.sessions.begin() as session:
                    return self.index.record_received(session, hdr, committed, ts, sender, called, peer,
                                                      destinations, origin="retrieved" if source else "received",
                                                      priority=decision.priority)

            try:
                rec = record()
            except IntegrityError:
                # A cached series row vanished meanwhile (or another writer raced us): retry uncached.
                self.index.forget()
                rec = record()
        except (OSError, CryptoError) as exc:
            if final is not None:
                _unlink(final)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            return fail(_status(OUT_OF_RESOURCES, f"cannot write to the spool: {reason}"), logging.ERROR)
        except Exception as exc:
            if final is not None:
                _unlink(final)
            log.exception("index commit failed for %s", sop_instance)
            return fail(_status(OUT_OF_RESOURCES, f"index unavailable: {type(exc).__name__}"), logging.ERROR)

        if rec.duplicate_of is not None:
            _unlink(final)
            action = "duplicate-identical"
        else:
            action = "superseded-previous" if rec.superseded else "stored"
            if rec.enqueued:
                self.notify_forward(rec.enqueued)
        if source:
            action += f" (retrieved from {source})"
            self.arrivals.arrived()
        log.info(kv(event="c-store", calling=calling, called=called, sop=sop_instance, status="0x0000",
                    action=action, to=",".join(rec.enqueued) or "-", route=decision.route or "-",
                    bytes=committed.size, ms=int((time.monotonic() - t0) * 1000)))
        close_on_store(self.cfg.worklist.remove_on_store, self.engine, self.sessions, hdr)  # worklist.remove_on_store: the study arrived, its item is done
        return 0x0000

    def sink_for(self, assoc: Any, command: Any, context: Any) -> IncomingFile | None:
        """The file a C-STORE data set is written to as it arrives (None: any other data set, which
        the association keeps in memory)."""
        if command.field != 0x0001:
            return None
        source = assoc.acceptor.ae_title if assoc.is_requestor else assoc.requestor.ae_title
        return IncomingFile(self.spool, str(command.AffectedSOPClassUID), str(command.AffectedSOPInstanceUID),
                            context.transfer_syntax, source or "")

    def on_partial_discarded(self, assoc: Any) -> None:
        """The association dropped the partial file of a transfer cut off mid-data set: it was never
        acknowledged."""
        log.info(kv(event="c-store-partial-removed", calling=assoc.requestor.ae_title))

"""What the receiving peers hold (Orthanc's REST API, storescp's files and log): the ground truth
a test checks forwarding against, never what qrproxy says about itself."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from peers import OrthancServer, StoreSCP

from .waits import wait_until


def orthanc_index(orthanc: OrthancServer) -> dict[str, str]:
    """SOP Instance UID -> Orthanc instance id, as Orthanc reports it."""
    return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in orthanc.get("/instances?expand")}


def wait_orthanc_has(orthanc: OrthancServer, sops: Iterable[str], timeout: float = 60) -> dict[str, str]:
    want = set(sops)
    last: dict[str, str] = {}

    def check() -> bool:
        nonlocal last
        last = orthanc_index(orthanc)
        return want <= set(last)

    wait_until(check, timeout, lambda: f"Orthanc has {len(want & set(last))} of {len(want)} instances "
                                       f"(missing e.g. {sorted(want - set(last))[:3]})")
    return last


def storescp_sops(scp: StoreSCP) -> set[str]:
    """SOP Instance UIDs of the files storescp wrote (DCMTK names them <modality>.<SOP Instance UID>)."""
    return {p.name.split(".", 1)[1] for p in scp.received_files() if "." in p.name}


def storescp_deliveries(scp: StoreSCP) -> Counter[str]:
    """How many C-STOREs storescp received per SOP Instance UID (its log: one 'storing DICOM file' each)."""
    counts: Counter[str] = Counter()
    for m in re.finditer(r"storing DICOM file: (\S+)", scp.log_text()):
        name = Path(m.group(1)).name
        if "." in name:
            counts[name.split(".", 1)[1]] += 1
    return counts


def wait_storescp_has(scp: StoreSCP, sops: Iterable[str], timeout: float = 60) -> None:
    want = set(sops)
    wait_until(lambda: want <= storescp_sops(scp) and want <= set(storescp_deliveries(scp)), timeout,
               lambda: f"{scp.name} has {len(want & storescp_sops(scp))} of {len(want)} instances")

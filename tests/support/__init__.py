"""Helpers shared by the test modules (``from support import ...``); the peers themselves are
tests/peers.py, test data tests/dicomgen.py.

    qrproxy   config dicts (proxy_config, node), its spool, its CLI (cli, queue_rows, Soft)
    waits     wait_until, settles, stays: bounded polling, never a fixed sleep
    dcmtk     DCMTK storescu and echoscu as the modality, and what storescu reports per file
    received  what Orthanc and storescp hold: the ground truth for forwarding
    pyscu     pynetdicom as SCU (pynetdicom_store, echo_ok) and ScriptedSCP
"""

from .dcmtk import ECHOSCU, STORESCU, assert_all_success, dcmtk_env, echoscu, store_responses, storescu, storescu_argv
from .pyscu import EXPLICIT_LE, ScriptedSCP, echo_ok, pynetdicom_store
from .qrproxy import Soft, changed_count, cli, node, proxy_config, queue_rows, spool_files
from .received import orthanc_index, storescp_deliveries, storescp_sops, wait_orthanc_has, wait_storescp_has
from .waits import settles, stays, wait_until

__all__ = [
    "ECHOSCU", "EXPLICIT_LE", "STORESCU", "ScriptedSCP", "Soft", "assert_all_success", "changed_count", "cli", "dcmtk_env",
    "echo_ok", "echoscu", "node", "orthanc_index", "proxy_config", "pynetdicom_store", "queue_rows", "settles", "spool_files",
    "stays", "store_responses", "storescp_deliveries", "storescp_sops", "storescu", "storescu_argv",
    "wait_orthanc_has", "wait_storescp_has", "wait_until",
]

"""Verification SOP Class (C-ECHO): always answered once the association is accepted.

The calling-AE policy is enforced at association negotiation (scp/associations.py), so a peer that got
this far is allowed to echo.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.sop_class import Verification

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]


def contexts() -> list[tuple[str, list[str]]]:
    return [(Verification, TRANSFER_SYNTAXES)]


def handle_echo(event: Any) -> int:
    return 0x0000

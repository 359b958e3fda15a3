"""Failure and warning responses shared by the SCPs: a status with an Error Comment."""

from __future__ import annotations

from pydicom.dataset import Dataset


def status(code: int, comment: str) -> Dataset:
    """A status Dataset with (0000,0902) Error Comment, cut to its 64-character limit (LO)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class Refused(Exception):
    """A request an SCP turns down with `status` and an Error Comment (`comment`, cut to 64)."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]

"""The SQLAlchemy index of what qrproxy knows: typed models (models.py), engines and Alembic upgrade
(session.py), the public writer API with the merge rules of docs/dicom.md "What the index believes"
(writers.py), the one C-FIND keyword-to-column table (columns.py), dataset merging (dsmerge.py) and
pseudonyms (uidmap.py).

It may import config, net, store and the foundations. Rows are written through writers.py's public
functions; no other package reaches into its private helpers.
"""

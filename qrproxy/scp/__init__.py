"""The inbound DICOM services, one module per service: echo, find (C-FIND Q/R), mwl, mpps, store
(C-STORE into the spool), move (C-MOVE and C-GET), commitment (N-ACTION); and the association level:
admission (access.py), the association log and AE policy (associations.py).

It may import jobs, scu and everything below; each service gets its collaborators from app.py.
"""

"""The durable spool: files received and kept (spool.py: incoming/ to objects/, fsync, rename, fsync
of the folder before anyone is told yes), AES-256-GCM at rest (crypto.py) and its key file
(keys.py), transfer syntax conversion (codec.py).

It may import config, net and the foundations; it knows nothing of the index, so the index can say
what the spool holds without the spool knowing of rows.
"""

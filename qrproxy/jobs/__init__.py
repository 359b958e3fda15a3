"""Work that runs on a schedule or in its own thread: upstream refreshes (refresh.py), prefetch of
priors (prefetch.py), the storage commitment transaction thread (commitment.py), retention
(retention.py) and spool housekeeping (maintenance.py).

It may import scu and everything below it; the services it needs (retriever, forwarder) are passed
in by app.py.
"""

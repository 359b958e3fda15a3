"""The associations qrproxy opens: every one goes through upstream.py (timeouts, AE titles, TLS);
forwarding the queue (forward.py), retrieving from the upstream (retrieve.py), storage commitment
toward upstream nodes (commitment.py), the MPPS relay (mpps.py).

It may import every package below it (config, net, store, index, rules, query) and the
foundations, never the inbound services (scp) or the jobs that drive it.
"""

"""Configuration as data: the pydantic schema of conf/qrproxy.yml (schema.py), sizes, durations and
relative dates (units.py), tag names as site engineers write them (tags.py).

A leaf: every package may import it; it imports only qrproxy.logs. Reading and cross-checking a
file, which needs other packages' checkers, is cli/load.py's.
"""

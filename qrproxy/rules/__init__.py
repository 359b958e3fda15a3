"""What a site configures to happen to data: routing (routes.py), mutations and their checks
(mutations.py, mutation_checks.py), PS3.15 anonymization (anonymize.py), value templates and tag
paths (templates.py, tagpath.py). Pure functions where they can be, so they test without I/O.

It may import config, net, store, index and the foundations.
"""

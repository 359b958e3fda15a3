"""Answering C-FIND: PS3.4 matching as SQL and Python (matching.py), where an answer comes from
(modes.py: cache-first, upstream-first, cache-only), query-through to the upstream and remembering
its answers (through.py), the hot answer cache (hotcache.py), and worklist items as pure functions
and rows (worklist.py, worklist_index.py).

It may import config, net, store, index, rules and the foundations.
"""

"""What operators look at and act with: the HTTP endpoint (web.py: /health, /status, /metrics),
prometheus counters (metrics.py), the facts of `qrproxy status` (status.py), operator actions on
the forward queue (queue_actions.py).

It may import every package except app and cli.
"""

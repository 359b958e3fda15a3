"""The `qrproxy` command: argparse verbs (main.py) and reading the config file with every problem
named by file, line and key (load.py, exit 2).

The top of the tree: it may import every package, and it is the only one that imports qrproxy.app.
"""

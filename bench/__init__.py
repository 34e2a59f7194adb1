"""``make bench``: hitl-service measured against the floor of its own stack.

Run ``python -m bench --help``; ``bench/README.md`` explains the scenarios,
how the floor is built and how to read the table.
"""

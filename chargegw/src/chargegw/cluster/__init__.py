"""Cluster layer: several processes and nodes sharing one database.

Owns: the session directory (which process holds which device), process heartbeats,
liveness sweeps, re-assertion after outages, online flags and rebalancing (``directory``).
May import: the kernel, ``chargegw.store``, ``chargegw.net`` and ``chargegw.domain``.
Never imports drivers, api or the app.
"""

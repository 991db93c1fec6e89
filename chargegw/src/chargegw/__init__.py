"""chargegw: the charging-pile gateway and platform built on chargeproto.

``chargegw serve`` holds the piles' TCP connections (AP3000 and BKV on one port),
answers them as their protocols require, keeps their state and an audit log in
PostgreSQL, and serves the HTTP API for charging sessions, commands, cards and pricing.
The composition is :class:`chargegw.app.Gateway`; see docs/operator-guide.md.
"""

__version__ = "0.1.0"

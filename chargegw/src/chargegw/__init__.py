"""chargegw: the charging-pile gateway and platform built on chargeproto.

The gateway itself (TCP server, sessions, persistence, API) is being built; this
distribution currently only reserves the package and its dependency on chargeproto.
"""

__version__ = "0.1.0"

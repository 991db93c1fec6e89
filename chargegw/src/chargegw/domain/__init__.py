"""Domain layer: the protocol-neutral business of the platform.

Owns the state machines and their SQL: charging orders and settlement (``orders``), the
durable command outbox (``outbox``), cards and pricing (``billing``), parameter profiles
(``params``), firmware upgrades (``firmware``), API keys (``auth``), device selectors and
the periodic engine passes. Each module keeps its state machine as a table with enum
states and its repository of SQL statements.
May import: the kernel, ``chargegw.store`` and ``chargegw.net``. Never imports drivers,
cluster, api or the app: protocol-specific work reaches the engines through the handlers
they register with the drivers, and what both share is in ``ports``.
"""

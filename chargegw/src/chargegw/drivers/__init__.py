"""Protocol drivers: chargeproto messages in, replies and protocol-neutral updates out.

The drivers are the only place that knows protocol details: reply rules, port
numbering, reason codes, order-number formats.
May import: the kernel, ``chargegw.store`` (types only), ``chargegw.net`` and the domain
services they report to (orders, outbox) and ``chargegw.domain.ports``. They hold no SQL
and never import the engines (params, firmware, billing): the engines register the
handlers they need (``driver.on(message_type, handler)``, wired in ``chargegw.app``).
"""

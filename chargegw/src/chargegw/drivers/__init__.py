"""Protocol drivers: chargeproto messages in, replies and protocol-neutral updates out.

The drivers are the only place that knows protocol details: reply rules, port
numbering, reason codes, order-number formats.
"""

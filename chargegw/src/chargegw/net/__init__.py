"""Network layer: the asyncio device server and the sessions behind its connections.

Owns: TCP accept, per-connection read budgets and bounded write queues (``transport``),
which devices live behind which connection and their liveness (``sessions``).
May import: the kernel (``chargegw.core``, ``config``, ``logs``, ``metrics``, ``audit``) and
``chargegw.store``. Never imports drivers, domain engines, cluster, api or the app.
"""

"""Store layer: PostgreSQL connection, embedded server, migrations, partitions, the batch
writer for frame-rate rows, and the classification of database errors.

May import: the kernel (``chargegw.core``, ``config``, ``logs``, ``metrics``, ``audit``)
only. Everything above it uses it; it knows nothing of protocols, engines or HTTP.
"""

"""HTTP layer: the FastAPI application and one router per resource.

Owns: request and response models, authentication dependencies, the error shape and the
OpenAPI document (``app`` is the factory; ``commands``, ``params``, ``firmware``,
``billing``, ``cluster`` are the resource routers). Routers call domain services through
dependencies; they hold no SQL.
May import: the kernel, ``chargegw.store``, ``chargegw.domain`` and ``chargegw.cluster``.
Never imports the composition root (``chargegw.app``).
"""

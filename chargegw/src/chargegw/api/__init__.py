"""HTTP layer: the FastAPI application and one router per resource.

Owns: request and response models, authentication dependencies, the error shape and the
OpenAPI document (``app`` is the factory; ``devices`` the read endpoints; ``commands``,
``params``, ``firmware``, ``billing``, ``cluster`` the resource routers, listed in
``routers.ROUTERS``). Routers are module-level and get what they act through as FastAPI
dependencies (``deps``: the pool, ``ApiServices``); they hold no SQL, the repositories of
``chargegw.domain`` and ``chargegw.cluster`` do.
May import: the kernel, ``chargegw.store``, ``chargegw.domain``, the drivers' command
modules (what a command's parameters are) and ``chargegw.cluster``. Never imports the
composition root (``chargegw.app``).
"""

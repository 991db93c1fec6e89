"""``python -m chargegw.loadtest``: the ``chargegw loadtest`` command, wired or not."""

from .cli import loadtest

loadtest(prog_name="chargegw loadtest")

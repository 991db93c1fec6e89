"""``python -m chargesim.loadtest``: the ``chargegw loadtest`` command, wired or not."""

from chargesim.loadtest.cli import loadtest

loadtest(prog_name="chargegw loadtest")

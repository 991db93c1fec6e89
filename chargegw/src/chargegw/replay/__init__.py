"""Replay recorded device traffic against a gateway and compare its replies.

``chargegw replay CAPTURE`` (docs/replay.md) feeds the device side of a capture file
(:mod:`chargegw.capture`) to a fresh in-process gateway or a running one, pairs each
reply with the recorded one, compares them field by field (volatile fields by rule,
:mod:`chargegw.replay.rules`) and compares the resulting state with the recorded run's.

The engine is :func:`chargegw.replay.engine.replay` (its report:
:class:`chargegw.replay.report.ReplayReport`); ``--record-baseline`` is
:mod:`chargegw.replay.baseline`. The package imports nothing on its own, so the
command line stays quick to start.
"""

"""Operating a node: the checks of ``chargegw doctor``, backup and restore, database
statistics. The top layer, beside the CLI that calls it: it may import every layer below
and is imported by the CLI only."""

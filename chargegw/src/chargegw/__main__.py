"""``python -m chargegw`` runs the command line."""

from chargegw.cli import main

main()

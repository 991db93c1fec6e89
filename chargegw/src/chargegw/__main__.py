"""``python -m chargegw`` runs the command line."""

from .cli import main

main()

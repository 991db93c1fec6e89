"""``python -m chargeproto``: the ``chargeproto`` command line."""

from ._cli import main

if __name__ == "__main__":
    main(prog_name="chargeproto")

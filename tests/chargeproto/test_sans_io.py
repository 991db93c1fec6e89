"""chargeproto is sans-IO: it imports and decodes with socket, asyncio, selectors and
time unavailable, and importing it does not pull in the gateway.

The one exception is construct, a dependency, which imports ``time`` itself: it is
loaded before the blocker goes up (see the script)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("socket", "asyncio", "selectors", "time")

_SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    # construct, a dependency, does "from time import sleep" in construct.lib.bitstream;
    # it is imported first, then every blocked module is purged from sys.modules so
    # that chargeproto's own imports of them go through the blocker below.
    import construct

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: chargeproto must be sans-IO")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())

    try:
        import time
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not work")

    import chargeproto
    from chargeproto import ap3000

    frame = bytes.fromhex("444e5910003b37ab0401002198080200000905ee02")
    message = ap3000.decode(frame)
    assert message.voltage_v == 220.0, message
    assert ap3000.encode(message) == frame
    events = ap3000.Ap3000StreamDecoder().feed(b"link" + frame)
    assert [type(e).__name__ for e in events] == ["KeepaliveReceived", "MessageReceived"]
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED + ("chargegw",))
    assert not leaked, leaked
    print("ok")
    """
)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )


def test_imports_and_decodes_without_io_modules() -> None:
    result = _run(_SCRIPT.format(blocked=BLOCKED))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_does_not_import_the_gateway() -> None:
    result = _run(
        "import sys, chargeproto, chargeproto.ap3000\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'chargegw'))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

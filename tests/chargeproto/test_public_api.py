"""The public API loads lazily: ``import chargeproto`` is cheap, each protocol is
imported on first use and each codec compiled on first use, and every public name
still resolves (for type checkers too, through the TYPE_CHECKING imports)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import chargeproto
from chargeproto import ap3000, bkv
from chargeproto._layout import Codec, LazyCodec

SOURCE = Path(chargeproto.__file__).parent


def _python(script: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


_LOADED = (
    "import sys\n"
    "def loaded():\n"
    "    names = ('construct', 'click', 'chargeproto.ap3000', 'chargeproto.bkv',"
    " 'chargeproto._stream', 'chargeproto._record', 'chargeproto._cli')\n"
    "    return sorted(n for n in names if n in sys.modules)\n"
)


def test_import_chargeproto_loads_no_protocol_and_no_construct() -> None:
    out = _python(_LOADED + "import chargeproto\nprint(loaded())")
    assert out == "[]"


def test_one_protocol_does_not_load_the_other() -> None:
    script = _LOADED + (
        "import chargeproto\n"
        "m = chargeproto.ap3000.decode('444e5910003b37ab0401002198080200000905ee02')\n"
        "print(loaded())\n"
    )
    assert _python(script) == "['chargeproto.ap3000', 'construct']"
    script = _LOADED + (
        "from chargeproto import bkv\n"
        "bkv.decode('fcff0018000000000000008220052000486920200730164545a7fcee')\n"
        "print(loaded())\n"
    )
    assert _python(script) == "['chargeproto.bkv', 'construct']"


def test_the_command_line_loads_only_the_protocol_of_its_input() -> None:
    script = _LOADED + (
        "from click.testing import CliRunner\n"
        "from chargeproto._cli import main\n"
        "r = CliRunner().invoke(main, ['decode', '444e5910003b37ab0401002198080200000905ee02'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(loaded())\n"
    )
    out = _python(script)
    assert "chargeproto.bkv" not in out and "chargeproto.ap3000" in out


def test_codecs_compile_on_first_use_only() -> None:
    script = (
        "from chargeproto import ap3000\n"
        "from chargeproto._layout import LazyCodec\n"
        "lazy = [c for c in ap3000.MESSAGE_CLASSES if isinstance(c.__dict__['codec'], LazyCodec)]\n"
        "assert len(lazy) == len(ap3000.MESSAGE_CLASSES), len(lazy)\n"
        "ap3000.decode('444e5910003b37ab0401002198080200000905ee02')\n"
        "compiled = [c.__name__ for c in ap3000.MESSAGE_CLASSES"
        " if not isinstance(c.__dict__['codec'], LazyCodec)]\n"
        "print(compiled)\n"
    )
    assert _python(script) == "['Heartbeat']"


def test_a_compiled_codec_replaces_the_descriptor() -> None:
    codec = ap3000.Settlement.codec
    assert isinstance(codec, Codec)
    assert ap3000.Settlement.__dict__["codec"] is codec
    assert ap3000.Settlement.codec is codec


def test_a_bad_declaration_is_still_found_at_import() -> None:
    import dataclasses

    from construct import Int8ul, Struct

    from chargeproto._layout import lazy_codec

    @dataclasses.dataclass(frozen=True, slots=True)
    class Broken(ap3000.Ap3000Message):
        value: int

    with pytest.raises(TypeError, match="wire field other has no field other"):
        lazy_codec(Broken, Struct("other" / Int8ul), endian="<", head=("phy_id", "msg_id"))
    lazy_codec(Broken, Struct("value" / Int8ul), endian="<", head=("phy_id", "msg_id"))
    assert isinstance(Broken.__dict__["codec"], LazyCodec)


@pytest.mark.parametrize("module", [chargeproto, ap3000, bkv], ids=lambda m: m.__name__)
def test_every_public_name_resolves(module: object) -> None:
    for name in module.__all__:  # type: ignore[attr-defined]
        assert getattr(module, name) is not None, name


def test_lazy_names_are_declared_for_type_checkers() -> None:
    """Each name ``__getattr__`` provides is imported under TYPE_CHECKING and listed in
    ``__all__`` and ``dir()``."""
    tree = ast.parse((SOURCE / "__init__.py").read_text())
    checked: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                checked |= {alias.asname or alias.name for alias in stmt.names}
    lazy = set(chargeproto._LAZY)
    assert checked == lazy
    assert lazy <= set(chargeproto.__all__)
    assert lazy <= set(dir(chargeproto))
    with pytest.raises(AttributeError):
        chargeproto.no_such_name  # type: ignore[attr-defined]  # noqa: B018


# --- hex text in -------------------------------------------------------------------------


def test_ap3000_decode_accepts_hex_text_like_bkv() -> None:
    frame = "444e5910003b37ab0401002198080200000905ee02"
    assert ap3000.decode(frame) == ap3000.decode(bytes.fromhex(frame))
    assert ap3000.decode("44 4e 59 10-00:3b37ab04_01002198080200000905ee02").voltage_v == 220.0
    for bad, offset in (("444e59zz", 3), ("444e591", 3)):
        with pytest.raises(chargeproto.HexSyntaxError) as ap3000_error:
            ap3000.decode(bad)
        with pytest.raises(chargeproto.HexSyntaxError) as bkv_error:
            bkv.decode(bad)
        assert str(ap3000_error.value) == str(bkv_error.value)
        assert ap3000_error.value.offset == bkv_error.value.offset == offset


def test_records_are_json() -> None:
    message = ap3000.decode("444e5910003b37ab0401002198080200000905ee02")
    record = chargeproto.to_record(message)
    assert json.loads(json.dumps(record)) == record

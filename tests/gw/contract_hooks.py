"""Schemathesis hooks of the contract test (tests/gw/test_contract.py), loaded by the
``st`` process through ``SCHEMATHESIS_HOOKS``.

A list's ``cursor`` is opaque: only the server issues valid ones, so a generated string
is a malformed cursor (a 422, rightly) even though it fits the schema. Schema-valid cases
are sent without it; schema-violating ones keep it. Cursors are tested in test_api.py.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: Any) -> None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    if case.query and "cursor" in case.query:
        del case.query["cursor"]

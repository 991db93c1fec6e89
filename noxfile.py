"""Developer sessions. Each runs inside the uv-managed environment of the lock file."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "none"

UV_RUN = ("uv", "run", "--frozen")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (the README's test command)."""
    session.run(*UV_RUN, "pytest", *session.posargs, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.run(*UV_RUN, "ruff", "check", ".", external=True)
    session.run(*UV_RUN, "ruff", "format", "--check", "chargeproto", "tests", external=True)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on chargeproto."""
    session.run(*UV_RUN, "mypy", external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Codec benchmarks (AP3000, BKV); each writes its section of docs/benchmarks.md."""
    for script in ("benchmarks/bench_ap3000.py", "benchmarks/bench_bkv.py"):
        session.run(
            *UV_RUN,
            "python",
            script,
            "--write",
            "docs/benchmarks.md",
            *session.posargs,
            external=True,
        )

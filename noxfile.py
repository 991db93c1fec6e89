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
def screenshots(session: nox.Session) -> None:
    """The console's browser tests, saving the screenshots of docs/console.md."""
    session.run(
        *UV_RUN,
        "pytest",
        "tests/console",
        *session.posargs,
        env={"CHARGEGW_SCREENSHOTS": "docs/console"},
        external=True,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Codec benchmarks (AP3000, BKV) and the gateway's hot path per frame; each writes
    its section of docs/benchmarks.md. The hot path also counts instructions per frame
    under valgrind (callgrind) and fails above benchmarks/hotpath_budget.json; arguments
    after `--` go to the codec benchmarks only."""
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
    session.run(
        *UV_RUN,
        "python",
        "benchmarks/bench_hotpath.py",
        "--write",
        "docs/benchmarks.md",
        "--check",
        external=True,
    )


@nox.session(name="bench-webhooks")
def bench_webhooks(session: nox.Session) -> None:
    """Webhook delivery: `chargegw serve --workers 3`, a local receiver, 5,000 simulated
    piles; deliveries/s and event-to-2xx latency (docs/webhooks.md). Writes its section of
    docs/benchmarks.md. PostgreSQL: CHARGEGW_TEST_DSN, else the local server (a database
    is created and dropped); arguments after `--` go to benchmarks/bench_webhooks.py."""
    session.run(
        *UV_RUN,
        "python",
        "benchmarks/bench_webhooks.py",
        "--write",
        "docs/benchmarks.md",
        *session.posargs,
        external=True,
    )


#: the bounded default of `nox -s load` (arguments after `--` replace it)
LOAD_DEFAULT = (
    "--start", "both",
    "--piles", "2000",
    "--bkv-share", "0.2",
    "--accel", "60",
    "--duration", "60",
    "--ramp", "15",
    "--storm-at", "45",
    "--storm-window", "5",
    "--latency-probes", "40",
)  # fmt: skip


#: `nox -s load -- overload`: the overload profile (about 4-6 minutes): 20,000 piles on two
#: workers at accel 10 (about 1,800 frames/s) until all are online; then the capacity
#: search, 150 % of the capacity for 60 s, 50 % for 45 s
LOAD_OVERLOAD_DEFAULT = (
    "--start", "chargegw",
    "--workers", "2",
    "--piles", "20000",
    "--bkv-share", "0.2",
    "--accel", "10",
    "--ramp", "40",
    "--settle", "40",
    "--profile", "overload",
)  # fmt: skip


@nox.session
def load(session: nox.Session) -> None:
    """Load test: baseline, then chargegw, same piles (docs/loadtest.md).

    Writes loadtest-report.json and the load section of docs/benchmarks.md. PostgreSQL:
    CHARGEGW_LOADTEST_DSN, else an embedded one. `nox -s load -- --piles 100000 ...`
    replaces the default arguments. `nox -s load -- overload` runs the overload profile
    instead (LOAD_OVERLOAD_DEFAULT; options after `overload` are added and win, e.g.
    `nox -s load -- overload --capacity 9000`), writes loadtest-overload-report.json and
    the overload section of docs/benchmarks.md.
    """
    args, report = tuple(session.posargs) or LOAD_DEFAULT, "loadtest-report.json"
    if args[:1] == ("overload",):
        args, report = (*LOAD_OVERLOAD_DEFAULT, *args[1:]), "loadtest-overload-report.json"
    session.run(
        *UV_RUN,
        "python",
        "-m",
        "chargesim.loadtest",
        *args,
        "--report",
        report,
        "--benchmarks",
        "docs/benchmarks.md",
        external=True,
    )


#: the bounded default of `nox -s load-http` (arguments after `--` replace it): 20,000
#: piles at accel 5 (about 900 frames/s: the device path well below saturation on two
#: cores; at accel 10 its heartbeat p99 passed 100 ms before any HTTP load) and, in the
#: steady phase, 15 s without HTTP load, then 60 s of it at the issue's rates; the per-key
#: control rate limit (20/s by default) is lifted for the 50 starts and 50 stops a second
LOAD_HTTP_DEFAULT = (
    "--start", "chargegw",
    "--workers", "2",
    "--piles", "20000",
    "--bkv-share", "0.2",
    "--accel", "5",
    "--ramp", "40",
    "--settle", "40",
    "--duration", "180",
    "--http-load", "detail=500,list=20,orders=20,start=50,stop_after=5,duration=60,delay=15",
    "--set", "control_rate_per_key=0",
)  # fmt: skip


@nox.session(name="load-http")
def load_http(session: nox.Session) -> None:
    """The HTTP API under load while 20,000 simulated piles run (docs/loadtest.md, "HTTP
    API load"): device detail and list, order list, starts and stops at fixed rates;
    latency per endpoint, start to ACK, and the piles' heartbeat round trip before and
    during the load. Writes loadtest-http-report.json and its section of
    docs/benchmarks.md. PostgreSQL: CHARGEGW_LOADTEST_DSN, else an embedded one."""
    args = session.posargs or LOAD_HTTP_DEFAULT
    session.run(
        *UV_RUN,
        "python",
        "-m",
        "chargesim.loadtest",
        *args,
        "--report",
        "loadtest-http-report.json",
        "--benchmarks",
        "docs/benchmarks.md",
        external=True,
    )


#: the default of `nox -s chaos` (arguments after `--` replace it): about 10 minutes
CHAOS_DEFAULT = ("--duration", "540", "--piles", "500", "--seed", "1")


@nox.session
def chaos(session: nox.Session) -> None:
    """Chaos run: chargegw serve --workers 3 under faults, then the invariants
    (docs/chaos.md). Writes chaos-report.json; fails on any violation. PostgreSQL:
    CHARGEGW_TEST_DSN, else an embedded one."""
    args = session.posargs or CHAOS_DEFAULT
    session.run(
        *UV_RUN,
        "python",
        "-m",
        "chargesim.chaos",
        "--report",
        "chaos-report.json",
        *args,  # a --report here wins
        external=True,
    )

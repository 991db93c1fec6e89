"""The alert rules, their unit tests and the dashboard in deploy/, and the runbook they
point to: checked with promtool (Debian's prometheus package) and against the gateway's
own metric definitions and commands.

The live counterpart, against a real Prometheus scraping `chargegw serve --workers 2`, is
tests/gw/test_prometheus_live.py."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import click
import yaml
from prometheus_client.metrics_core import Metric

from chargegw.cli import main
from chargegw.metrics import Metrics

from .promql import (
    PROMETHEUS_DIR,
    RULE_FILES,
    RULE_TESTS,
    RUNBOOK,
    RUNBOOK_URL,
    alerts,
    dashboard,
    dashboard_queries,
    github_anchor,
    metric_names,
    recorded_names,
    rules,
    runbook_anchors,
    tool,
)

#: metrics of other exporters the rules and the dashboard read: Prometheus' own `up`
#: and the node exporter's file systems (the PostgreSQL host's disk)
FOREIGN = {
    "up",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
    "node_filesystem_readonly",
}


def _run(*args: str) -> str:
    result = subprocess.run(
        [tool("promtool"), *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_checks_the_config_and_the_rules() -> None:
    _run("check", "config", "prometheus.yml")  # also checks the rule files it loads
    out = _run("check", "rules", *(str(p) for p in RULE_FILES))
    assert f"SUCCESS: {len(rules())} rules found" in out


def test_promtool_unit_tests_pass() -> None:
    out = _run("test", "rules", *(str(p) for p in RULE_TESTS))
    assert out.count("SUCCESS") == len(RULE_TESTS), out


def test_promtool_fails_a_unit_test_whose_alert_does_not_fire(tmp_path: Path) -> None:
    """The unit tests are not vacuous: with a typo in the rule's metric name, the alert
    never fires and its unit test fails (the same test passes on the real rules)."""
    cases = [
        case
        for path in RULE_TESTS
        for case in yaml.safe_load(path.read_text())["tests"]
        if any(
            check["alertname"] == "ChargegwDatabaseWriteFailures"
            for check in case.get("alert_rule_test", [])
        )
    ]
    assert cases
    typo = tmp_path / "typo.yml"
    typo.write_text(
        "\n".join(path.read_text() for path in RULE_FILES).replace(
            "rate(chargegw_db_write_failures_total[2m])",
            "rate(chargegw_db_write_failure_total[2m])",
        )
    )
    outcomes = {}
    for name, rule_file in (("real", RULE_FILES[0]), ("typo", typo)):
        test_file = tmp_path / f"{name}_test.yml"
        test_file.write_text(
            yaml.safe_dump(
                {"rule_files": [str(rule_file)], "evaluation_interval": "1m", "tests": cases}
            )
        )
        result = subprocess.run(
            [tool("promtool"), "test", "rules", str(test_file)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        outcomes[name] = (result.returncode, result.stdout + result.stderr)
    assert len(RULE_FILES) == 1  # the typo file stands for all of them
    assert outcomes["real"][0] == 0, outcomes["real"][1]
    assert outcomes["typo"][0] != 0
    assert "alertname: ChargegwDatabaseWriteFailures" in outcomes["typo"][1]


def test_every_alert_has_severity_annotations_and_a_runbook_section() -> None:
    anchors = runbook_anchors()
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), Counter(names).most_common(3)
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        anchor = github_anchor(name)
        assert annotations["runbook_url"] == f"{RUNBOOK_URL}#{anchor}", name
        assert anchor in anchors, f"docs/runbook.md has no section '## {name}'"


def test_every_alert_fires_in_a_unit_test_and_some_tests_prove_silence() -> None:
    firing: set[str] = set()
    silent = 0
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    firing.add(check["alertname"])
                else:
                    silent += 1
    missing = {rule["alert"] for rule in alerts()} - firing
    assert not missing, f"alerts without a unit test where they fire: {sorted(missing)}"
    assert silent >= 1


def _exposed_names(family: Metric) -> set[str]:
    """The sample names a metric family is exposed under."""
    if family.type == "counter":
        return {family.name + "_total"}
    if family.type == "histogram":
        return {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
    return {family.name}


def test_rules_and_dashboard_read_only_metrics_the_gateway_defines() -> None:
    """A typo in a metric name fails here without any Prometheus: every name a rule or a
    panel reads is defined in chargegw.metrics, made by a recording rule, or foreign."""
    defined = {name for family in Metrics().registry.collect() for name in _exposed_names(family)}
    known = defined | recorded_names() | FOREIGN
    queries = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules()]
    queries += dashboard_queries()
    unknown = {
        (where, name) for where, expr in queries for name in metric_names(expr) if name not in known
    }
    assert not unknown, sorted(unknown)
    used = {name for _, expr in queries for name in metric_names(expr)}
    assert "chargegw_start_commands_total" in used and "chargegw:devices_online:sum" in used


def test_metric_names_reads_selectors_only() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (protocol, le) (rate(a_bucket{le="2.0", x=~"y|z"}[5m])))'
        " > 2 and on (instance) b:rec:ratio offset 1h - (c or vector(0)) * 1e3 / absent(d{e='f'})"
    )
    assert metric_names(expr) == {"a_bucket", "b:rec:ratio", "c", "d"}


def test_dashboard_is_a_grafana_model_on_a_datasource_variable() -> None:
    model = dashboard()
    assert model["schemaVersion"] == 39 and model["uid"] == "chargegw"
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = model["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == [
        "Overview",
        "Commands and orders",
        "Devices and connections",
        "Database",
        "Per worker",
    ]
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].strip(), panel["title"]
    # no two panels overlap
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine


def test_a_typo_in_a_panel_query_is_caught() -> None:
    defined = {name for family in Metrics().registry.collect() for name in _exposed_names(family)}
    assert metric_names("sum(rate(chargegw_frames_totl[5m]))") - defined == {"chargegw_frames_totl"}


def test_the_runbook_cites_only_commands_that_exist() -> None:
    cited = re.findall(r"chargegw ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", RUNBOOK.read_text())
    assert len(cited) > 10
    ctx = click.Context(main)
    for name, sub in cited:
        command = main.get_command(ctx, name)
        assert command is not None, f"chargegw {name}"
        if isinstance(command, click.Group):
            assert command.get_command(ctx, sub) is not None, f"chargegw {name} {sub}"


def test_links_of_the_runbook_and_the_slo_page_resolve() -> None:
    docs = RUNBOOK.parent
    for page in (RUNBOOK, docs / "slo.md"):
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            if target.startswith("http"):
                continue
            name, _, anchor = target.partition("#")
            path = docs / name if name else page
            assert path.exists(), f"{page.name}: {target}"
            if anchor:
                headings = [
                    line.lstrip("#")
                    for line in path.read_text().splitlines()
                    if re.match(r"#{1,6} ", line)
                ]
                assert anchor in {github_anchor(h) for h in headings}, f"{page.name}: {target}"

"""The deployment files: systemd unit, production config, Prometheus alerts, Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from nproxyd.core import config
from nproxyd.core.errors import ConfigError
from nproxyd.runtime.catalogue import series_names

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "nproxyd.service"
PRODUCTION_CONFIG = ROOT / "deploy" / "config" / "nproxyd.toml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "nproxyd.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# Every series /metrics exposes (the metric catalogue, a histogram's three series) and `up`.
CONTRACT_METRICS = series_names() | {"up"}

_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right"}
)
_CREDENTIALS = ("database-dsn", "nowpayments-api-key", "smtp-password")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group() not in _PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def balanced(expr: str) -> bool:
    """Whether every bracket of ``expr`` (outside strings) closes in order."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def unit_settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit file, values in order of appearance."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def runnable_unit(tmp_path: Path) -> Path:
    """The unit with /usr/bin/nproxyd pointed at an executable that exists here."""
    script = Path(sys.executable).with_name("nproxyd")
    executable = str(script) if script.exists() else "/bin/true"
    text = UNIT.read_text(encoding="utf-8").replace("/usr/bin/nproxyd", executable)
    path = tmp_path / UNIT.name
    path.write_text(text, encoding="utf-8")
    return path


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (apt-get install prometheus)")
    return path


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        target["expr"]
        for panel in document["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def heading_anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of the Markdown headings."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def credentials_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "database-dsn").write_text("postgresql://nproxyd:s3cret@db:5432/nproxy\n")
    (directory / "nowpayments-api-key").write_text("np-key\n")
    (directory / "smtp-password").write_text("smtp-s3cret\n")
    return directory


class TestSystemdUnit:
    def test_verify_accepts_the_unit(self, tmp_path: Path) -> None:
        """`systemd-analyze verify` finds no error and no warning about the unit."""
        result = subprocess.run(
            [systemd_analyze(), "verify", "--man=no", str(runnable_unit(tmp_path))],
            capture_output=True,
            text=True,
            check=False,
        )
        complaints = [line for line in result.stderr.splitlines() if "nproxyd" in line]
        assert result.returncode == 0, result.stderr
        assert complaints == []

    def test_security_exposure_is_ok_or_better(self, tmp_path: Path) -> None:
        """`systemd-analyze security --offline=true` rates the unit OK or SAFE, as documented."""
        result = subprocess.run(
            [systemd_analyze(), "security", "--offline=true", str(runnable_unit(tmp_path))],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 and "offline" in result.stderr:
            pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
        match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
        assert match, result.stdout + result.stderr
        score, rating = float(match.group(1)), match.group(2)
        documented = re.search(r"exposure level[^\n]*?([\d.]+) OK", OPERATIONS.read_text())
        assert rating in {"SAFE", "OK"}
        assert documented
        assert score <= float(documented.group(1))

    def test_unit_carries_the_operational_contract(self) -> None:
        """The unit notifies, watches, restarts except on config errors, and migrates first."""
        settings = unit_settings()
        assert settings["Type"] == ["notify"]
        assert settings["NotifyAccess"] == ["main"]
        assert settings["WatchdogSec"] == ["30"]
        assert settings["Restart"] == ["on-failure"]
        assert "78" in settings["RestartPreventExitStatus"][0].split()
        assert settings["ExecStartPre"][0].endswith(" migrate")
        assert settings["ExecStart"][0].endswith(" run")
        assert settings["DynamicUser"] == ["yes"]
        assert settings["MemoryDenyWriteExecute"] == ["yes"]
        assert settings["Environment"] == ["NPROXYD__DAEMON__STATE_DIR=%S/nproxyd"]

    def test_credentials_match_the_production_config(self, tmp_path: Path) -> None:
        """Every LoadCredential= id is a *_file name of the production config, and vice versa."""
        loaded = {value.split(":", 1)[0] for value in unit_settings()["LoadCredential"]}
        directory = credentials_dir(tmp_path)
        production = config.load(str(PRODUCTION_CONFIG), {"CREDENTIALS_DIRECTORY": str(directory)})
        file_keys = {
            production.database.dsn_file,
            production.payment.nowpayments.api_key_file,
            production.email.smtp.password_file,
        }
        assert loaded == set(_CREDENTIALS)
        assert file_keys == loaded

    def test_stop_timeout_exceeds_shutdown_grace(self, tmp_path: Path) -> None:
        """TimeoutStopSec= leaves the daemon its shutdown grace before systemd kills it."""
        directory = credentials_dir(tmp_path)
        production = config.load(str(PRODUCTION_CONFIG), {"CREDENTIALS_DIRECTORY": str(directory)})
        stop_seconds = float(unit_settings()["TimeoutStopSec"][0])
        assert stop_seconds > production.daemon.shutdown_grace_seconds
        assert stop_seconds > config.DaemonConfig().shutdown_grace_seconds

    def test_runtime_dependencies_work_without_writable_executable_memory(self) -> None:
        """CPython and every runtime dependency import and run an event loop under PR_SET_MDWE."""
        script = textwrap.dedent(
            """
            import ctypes, mmap, sys
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
                sys.exit(3)
            import ssl, anyio, asyncpg, aiohttp, aiosmtplib, msgspec, structlog, tenacity
            import nproxyd.core.config, nproxyd.runtime.metrics
            ssl.create_default_context()
            anyio.run(anyio.sleep, 0)
            nproxyd.runtime.metrics.Metrics(["renewal-scheduler"]).render()
            import nproxyd.runtime.memory  # ctypes: malloc_trim after large ticks
            trim = nproxyd.runtime.memory.malloc_trim()
            if trim is not None:
                trim()
            try:
                mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            except PermissionError:
                print("write+execute refused")
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=False
        )
        if result.returncode == 3:
            pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "write+execute refused"


class TestProductionConfig:
    def test_production_example_loads_with_credentials(self, tmp_path: Path) -> None:
        """deploy/config/nproxyd.toml loads, reading its secrets from $CREDENTIALS_DIRECTORY."""
        directory = credentials_dir(tmp_path)
        loaded = config.load(str(PRODUCTION_CONFIG), {"CREDENTIALS_DIRECTORY": str(directory)})
        assert loaded.database.dsn == "postgresql://nproxyd:s3cret@db:5432/nproxy"
        assert loaded.billing.payment_provider == "nowpayments"
        assert loaded.payment.nowpayments.api_key == "np-key"
        assert loaded.email.transport == "smtp"
        assert loaded.email.smtp.security == "starttls"
        assert loaded.email.smtp.password == "smtp-s3cret"
        assert loaded.log.format == "json"
        assert loaded.http.listen

    def test_production_example_fails_without_its_credentials(self, tmp_path: Path) -> None:
        """Without the credential files the production config is a configuration error."""
        with pytest.raises(ConfigError) as caught:
            config.load(str(PRODUCTION_CONFIG), {"CREDENTIALS_DIRECTORY": str(tmp_path)})
        assert caught.value.key == "database.dsn_file"


class TestPrometheusRules:
    def test_metric_name_extraction(self) -> None:
        """The extractor keeps metric names and drops functions, labels, ranges and keywords."""
        expr = (
            'histogram_quantile(0.95, sum by (actor, le) (rate(a_bucket{x="y(z"}[5m])))'
            " > 3 * 1e3 and on (instance) b offset 5m or vector(1) unless c"
        )
        assert metric_names(expr) == {"a_bucket", "b", "c"}
        assert balanced(expr)
        assert not balanced("sum(rate(a[5m])")

    def test_every_rule_is_complete(self) -> None:
        """Every alert has expr, for, a severity and summary/description/runbook annotations."""
        rules = alert_rules()
        assert len(rules) >= 8
        for rule in rules:
            assert rule["alert"].startswith("Nproxyd")
            assert rule["expr"].strip()
            assert re.fullmatch(r"\d+[smh]", str(rule["for"]))
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert {"summary", "description", "runbook"} <= set(rule["annotations"])

    def test_rules_only_use_contract_metrics(self) -> None:
        """Every metric an alert selects is a contract metric, and its brackets balance."""
        used: set[str] = set()
        for rule in alert_rules():
            assert balanced(rule["expr"]), rule["alert"]
            names = metric_names(rule["expr"])
            assert names, rule["alert"]
            assert names <= CONTRACT_METRICS, (rule["alert"], names - CONTRACT_METRICS)
            used |= names
        assert "nproxyd_ready" in used

    def test_required_alerts_exist(self) -> None:
        """The stalled-actor, restart, outbox, dead-mail, renewal-failure, key-pool and readiness
        alerts exist, dead mail alerting from the gauge so it lasts while mail is dead."""
        exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
        assert "nproxyd_actor_last_success_timestamp_seconds" in exprs["NproxydActorStalled"]
        assert "increase(nproxyd_actor_restarts_total[15m]) > 0" in exprs["NproxydActorRestarting"]
        assert "deriv(nproxyd_outbox_pending" in exprs["NproxydOutboxGrowing"]
        assert "nproxyd_mail_dead > 0" in exprs["NproxydMailDead"]
        assert 'nproxyd_renewal_failures_total{kind="permanent"}' in exprs["NproxydRenewalRejected"]
        assert 'nproxyd_renewal_failures_total{kind="transient"}' in exprs["NproxydRenewalFailing"]
        assert (
            'outcome=~"transient|rate_limited|unauthorized"' in exprs["NproxydPaymentChecksFailing"]
        )
        assert "nproxyd_outbox_oldest_pending_age_seconds > 15 * 60" in exprs["NproxydOutboxStuck"]
        assert 'nproxyd_provider_keys{status="active"} == 0' in exprs["NproxydNoActiveProviderKeys"]
        assert "nproxyd_ready == 0" in exprs["NproxydNotReady"]
        assert "up{" in exprs["NproxydDown"]

    def test_runbooks_point_at_operations_anchors(self) -> None:
        """Every runbook annotation names a heading that exists in docs/operations.md."""
        anchors = heading_anchors(OPERATIONS.read_text(encoding="utf-8"))
        rules = alert_rules()
        assert rules
        for rule in rules:
            page, _, anchor = rule["annotations"]["runbook"].partition("#")
            assert page == "docs/operations.md"
            assert anchor in anchors, anchor

    def test_promtool_checks_the_rules(self) -> None:
        """`promtool check rules` accepts alerts.yml."""
        result = subprocess.run(
            [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_promtool_unit_tests_pass(self) -> None:
        """`promtool test rules` passes: the alerts fire when, and only when, they are due."""
        result = subprocess.run(
            [promtool(), "test", "rules", ALERTS_TEST.name],
            cwd=ALERTS_TEST.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


class TestGrafanaDashboard:
    def test_dashboard_is_valid_json_with_a_datasource_variable(self) -> None:
        """The dashboard is JSON, schemaVersion 39, every panel on the ${DS_PROMETHEUS} source."""
        document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        variables = {item["name"]: item for item in document["templating"]["list"]}
        assert document["schemaVersion"] == 39
        assert variables["DS_PROMETHEUS"]["type"] == "datasource"
        for panel in document["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]

    def test_dashboard_only_uses_contract_metrics(self) -> None:
        """Every panel query selects only contract metrics, and together they cover all of them."""
        used: set[str] = set()
        for expr in dashboard_exprs():
            assert balanced(expr), expr
            names = metric_names(expr)
            assert names, expr
            assert names <= CONTRACT_METRICS, (expr, names - CONTRACT_METRICS)
            used |= names
        assert used == CONTRACT_METRICS
        assert any("histogram_quantile(0.95" in expr for expr in dashboard_exprs())

    def test_dashboard_queries_parse_as_promql(self, tmp_path: Path) -> None:
        """Every panel query, Grafana variables filled in, is PromQL that promtool accepts."""
        tool = promtool()
        rules = [
            {"record": f"dashboard:query_{index}", "expr": _fill_grafana_variables(expr)}
            for index, expr in enumerate(dashboard_exprs())
        ]
        path = tmp_path / "dashboard_rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        result = subprocess.run(
            [tool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def _fill_grafana_variables(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*")

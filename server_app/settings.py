"""Server settings: a pydantic-settings class, read from `SPLITKERAS_*` variables,
injected into routes with `Depends` and overridden in tests."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from splitkeras.codecs import FAMILIES, parse_accepted
from splitkeras.guard import GuardConfig

__all__ = ["ServerSettings"]


class ServerSettings(BaseSettings):
    """What `splitkeras serve` configures.

    Example:
        >>> ServerSettings(split_dir="out", key="s3cret", checkpoint_every=50)  # doctest: +SKIP
    """

    model_config = SettingsConfigDict(env_prefix="SPLITKERAS_", extra="ignore")

    split_dir: Path = Field(description="folder written by `splitkeras split` (holds split.json)")
    key: str | None = Field(default=None, validation_alias=AliasChoices("key", "SPLITKERAS_SERVER_KEY"),
                            description="key a device needs to open a session; generated if unset")
    checkpoint_dir: Path | None = Field(default=None, description="default: SPLIT_DIR/checkpoints")
    checkpoint_every: int = Field(default=100, ge=1, description="save every N applied steps")
    step_ttl_seconds: float = Field(default=300.0, gt=0, allow_inf_nan=False,
                                    description="drop unfinished steps after this")
    max_batch: int = Field(default=256, ge=1, description="largest batch a request may carry")
    max_pending_steps: int = Field(default=4, ge=1, le=64, description="forwards of one session that may "
                                   "wait for their backwards at once (pipelining; 1: none)")
    # micro-batching across devices (server_app.micro_batch; docs/protocol.md "Micro-batching"): off at 0
    batch_window_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                                   description="gather the forwards that arrive within this many ms into one "
                                   "union forward and one update (0: off, every step alone)")
    max_devices_per_batch: int = Field(default=8, ge=1, description="a micro-batch closes early once this "
                                       "many sessions' forwards are in")
    batch_backward_timeout_seconds: float = Field(default=10.0, gt=0, allow_inf_nan=False,
                                                  description="a group applies with the backwards that came "
                                                  "this long after its first one (the rest expire)")
    max_sessions: int = Field(default=1024, ge=1, description="sessions held at once; a new one then "
                              "replaces the least recently used idle one")
    session_ttl_seconds: float = Field(default=3600.0, gt=0, allow_inf_nan=False,
                                       description="close a session after this long without a request")
    read_timeout_seconds: float = Field(default=30.0, gt=0, allow_inf_nan=False,
                                        description="a request's head must arrive within this, and its "
                                        "body without a longer pause (the connection is closed)")
    # the guards (splitkeras.guard, docs/protocol.md "Guards")
    guard: bool = Field(default=True, description="check every step and refuse what would poison the "
                        "shared segment")
    guard_factor: float = Field(default=1000.0, gt=1, allow_inf_nan=False,
                                description="a tensor may be at most this times its running scale")
    guard_warmup: int = Field(default=10, ge=0, description="accepted requests per tensor before the "
                              "relative bound applies")
    guard_max_abs: float = Field(default=1e10, gt=0, allow_inf_nan=False,
                                 description="the largest |value| a tensor of a step may hold")
    guard_max_weight: float = Field(default=1e6, gt=0, allow_inf_nan=False,
                                    description="the largest |value| a trainable weight may take")
    max_grad_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                        description="clip the gradients a device sends to this L2 norm")
    max_refused_steps: int = Field(default=10, ge=1, description="close a session after this many "
                                   "refused steps (out_of_bounds, update_refused)")
    jit_compile: bool | str = Field(default="auto")
    unsafe_deserialization: bool = False
    cors_origins: list[str] = Field(default_factory=list, description="origins whose pages may call "
                                    "the server (CORS); none by default")
    segment: str | None = Field(default=None, description="the server segment to serve; default: "
                                "the split's only one")
    next_url: str | None = Field(default=None, description="in a chain: the server of the next "
                                 "server segment")
    next_key: str | None = Field(default=None, description="the next server's key; default: this "
                                 "server's")
    device_page: bool = Field(default=False, description="serve the device page at /device/ (a browser "
                              "tab trains the device segments); off by default")
    device_page_dir: Path | None = Field(default=None, description="the built device page; default: "
                                         "mobile_export/dist/device-page (`npm run build:page`)")
    codecs: str = Field(default=",".join(FAMILIES), description="the codec families a session may use, "
                        "comma-separated (float32, float16, bfloat16, int8, topk); docs/protocol.md, Codecs")

    @field_validator("codecs")
    @classmethod
    def _codec_families(cls, value: str) -> str:
        return ",".join(parse_accepted(value))

    @property
    def accepted_codecs(self) -> tuple[str, ...]:
        """The codec families sessions may use (`--codecs`)."""
        return parse_accepted(self.codecs)

    # rounds of device aggregation (server_app.aggregation, docs/protocol.md "Fleet rounds")
    aggregate: Literal["off", "fedavg", "relay"] = Field(default="off", description="average the devices' "
                                                         "segments each round (fedavg) or pass them on (relay)")
    round_steps: int | None = Field(default=None, ge=1, description="steps a device trains per round; "
                                    "None: one epoch")
    round_quorum: int = Field(default=2, ge=1, description="uploads that close a fedavg round")
    round_deadline_seconds: float = Field(default=60.0, gt=0, allow_inf_nan=False,
                                          description="a fedavg round closes this long after its first upload")
    round_norm_factor: float = Field(default=10.0, gt=1, allow_inf_nan=False,
                                     description="refuse an upload whose update norm is over this times the "
                                     "median of accepted ones")

    # the segment on tf.distribute (splitkeras.distributed, docs/scaling.md)
    strategy: Literal["off", "mirrored", "multi-worker"] = Field(default="off", description="train the segment "
                                                                 "under MirroredStrategy (this host's devices) or "
                                                                 "MultiWorkerMirroredStrategy (TF_CONFIG)")
    replicas: int | None = Field(default=None, ge=1, description="mirrored: how many devices (default: every "
                                 "GPU, else 1); without GPUs, that many logical CPU devices")
    collective_timeout_seconds: float = Field(default=30.0, gt=0, allow_inf_nan=False,
                                              description="multi-worker: a collective waiting longer for a "
                                              "peer fails (the worker is reported lost)")
    global_step_ms: float = Field(default=50.0, gt=0, allow_inf_nan=False,
                                  description="multi-worker: an idle worker joins a global step this often")

    def guard_config(self) -> GuardConfig | None:
        """The guards' bounds, or None when `guard` is off."""
        if not self.guard:
            return None
        return GuardConfig(factor=self.guard_factor, warmup=self.guard_warmup, max_abs=self.guard_max_abs,
                           max_weight=self.guard_max_weight, max_grad_norm=self.max_grad_norm)

    @property
    def resolved_checkpoint_dir(self) -> Path:
        """`--checkpoint-dir`, else SPLIT_DIR/checkpoints, or SPLIT_DIR/checkpoints/SEGMENT when
        a segment is named (several servers of one split folder each keep their own)."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        base = Path(self.split_dir) / "checkpoints"
        return base / self.segment if self.segment else base

    @property
    def resolved_device_page_dir(self) -> Path:
        """`device_page_dir`, else where `npm --prefix mobile_export run build:page` writes."""
        if self.device_page_dir is not None:
            return Path(self.device_page_dir)
        from server_app.device_page import default_page_dir

        return default_page_dir()

    @property
    def key_file(self) -> Path:
        return Path(self.split_dir) / ".splitkeras" / "server.key"

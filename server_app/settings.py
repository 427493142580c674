"""Server settings: a pydantic-settings class, read from `SPLITKERAS_*` variables,
injected into routes with `Depends` and overridden in tests."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    step_ttl_seconds: float = Field(default=300.0, gt=0, description="drop unfinished steps after this")
    max_batch: int = Field(default=256, ge=1, description="largest batch a request may carry")
    max_sessions: int = Field(default=1024, ge=1)
    jit_compile: bool | str = Field(default="auto")
    unsafe_deserialization: bool = False
    segment: str | None = Field(default=None, description="the server segment to serve; default: "
                                "the split's only one")
    next_url: str | None = Field(default=None, description="in a chain: the server of the next "
                                 "server segment")
    next_key: str | None = Field(default=None, description="the next server's key; default: this "
                                 "server's")

    @property
    def resolved_checkpoint_dir(self) -> Path:
        """`--checkpoint-dir`, else SPLIT_DIR/checkpoints, or SPLIT_DIR/checkpoints/SEGMENT when
        a segment is named (several servers of one split folder each keep their own)."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        base = Path(self.split_dir) / "checkpoints"
        return base / self.segment if self.segment else base

    @property
    def key_file(self) -> Path:
        return Path(self.split_dir) / ".splitkeras" / "server.key"

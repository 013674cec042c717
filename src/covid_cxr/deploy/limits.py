"""What one request to the web service may cost; apart from the server so that ``serve --help`` can show the
defaults without importing FastAPI."""

from __future__ import annotations

from dataclasses import dataclass

from covid_cxr.errors import ConfigError


@dataclass(frozen=True)
class ServerLimits:
    """What one request may cost; the defaults fit any real radiograph."""

    max_upload_bytes: int = 64 * 2**20
    max_pixels: int = 40_000_000
    max_batch: int = 8
    decode_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_batch", "decode_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server limit {name} must be >= 1; got {getattr(self, name)}")

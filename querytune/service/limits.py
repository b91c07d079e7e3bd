"""What the service accepts and how it batches: the limits of ``querytune serve``, declared once with
:func:`~querytune.options.option` (the command's flags, their help and their checks are generated from them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..options import check_fields, option


@dataclass
class ServiceLimits:
    """How the service batches and what it accepts (``querytune serve`` flags of the same names)."""

    max_batch: int = option(32, "most images in one trunk pass; requests arriving together share it", min=1)
    max_wait_ms: float = option(5.0, "how long a batch waits for more requests after its first one", min=0)
    max_images: int | None = option(None, "most images in one request (default and at most: --max-batch)", min=1)
    max_body_mb: float = option(20.0, "largest request body, in MB", min=0, min_open=True)
    max_pixels: int = option(40_000_000, "largest image, width x height, decoded", min=1)
    read_timeout: float = option(30.0, "seconds a client may take to send its request", min=0, min_open=True)
    max_inflight_per_client: int = option(16, "most unanswered requests of one client address; more get 429",
                                          min=1)
    header_timeout: float = option(10.0, "seconds a client may take to send a request's headers, from connecting or "
                                         "from its last answer; then 408 and the connection is closed",
                                   min=0, min_open=True)
    max_connections: int = option(1000, "most open connections; more are answered 503 and closed (lowered at start "
                                        "to what the open-file limit, ulimit -n, allows)", min=1)
    max_connections_per_client: int = option(64, "most open connections of one client address; more get 503", min=1)
    max_decode_mb: float = option(512.0, "most memory one request's images may take decoded, in MB (from their "
                                         "headers: width x height x bytes per pixel); more get 413",
                                  min=0, min_open=True)
    max_decode_inflight_mb: float = option(1024.0, "most memory the images being decoded at once may take, in MB; "
                                                   "requests past it wait their turn", min=0, min_open=True)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_images is not None and self.max_images > self.max_batch:
            raise ConfigError(f"--max-images {self.max_images} must be at most --max-batch {self.max_batch}")
        if self.max_connections_per_client > self.max_connections:
            raise ConfigError(f"--max-connections-per-client {self.max_connections_per_client} must be at most "
                              f"--max-connections {self.max_connections}")
        if self.max_decode_mb > self.max_decode_inflight_mb:
            raise ConfigError(f"--max-decode-mb {self.max_decode_mb:g} must be at most --max-decode-inflight-mb "
                              f"{self.max_decode_inflight_mb:g}")

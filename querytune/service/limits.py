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

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_images is not None and self.max_images > self.max_batch:
            raise ConfigError(f"--max-images {self.max_images} must be at most --max-batch {self.max_batch}")

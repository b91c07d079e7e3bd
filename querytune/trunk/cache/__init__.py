"""On-disk feature cache for the frozen-backbone methods.

- :mod:`.entry`: an entry's key, format and reader (:class:`FeatureCache`), its checksum check;
- :mod:`.build`: building entries under faults (full disks, kills, concurrent builders, torchrun ranks);
- :mod:`.housekeeping`: listing and removing entries (``querytune cache ls|rm|prune``).
"""

from __future__ import annotations

from .build import Building, ShardWriter, build_cache, cache_splits, ensure_cache, human_size, open_or_build_cache
from .entry import CacheKey, FeatureCache, backbone_fingerprint, read_meta, verify_entry
from .housekeeping import default_cache_root, list_entries, prune_entries, remove_entry

__all__ = ["Building", "CacheKey", "FeatureCache", "ShardWriter", "backbone_fingerprint", "build_cache", "cache_splits",
           "default_cache_root", "ensure_cache", "human_size", "list_entries", "open_or_build_cache", "prune_entries",
           "read_meta", "remove_entry", "verify_entry"]

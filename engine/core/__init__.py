"""The shared core: requests, KV-cache manager and scheduler (stdlib only)."""

from servebench.engine.core.config import CacheConfig, SchedulerConfig
from servebench.engine.core.kv_cache_manager import KVCacheManager
from servebench.engine.core.recorder import TraceRecorder
from servebench.engine.core.request import Request, RequestStatus
from servebench.engine.core.sampling_params import SamplingParams
from servebench.engine.core.scheduler import Scheduler, SchedulerStats
from servebench.engine.core.scheduler_output import SchedulerOutput

__all__ = [
    "CacheConfig",
    "KVCacheManager",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "TraceRecorder",
]

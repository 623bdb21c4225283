"""A request as the scheduler and both executors see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from servebench.engine.core.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is; every status from FINISHED_STOPPED on is final (`finished`)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # recompute: back in the waiting queue, KV freed
    SWAPPED = 3  # swap: KV held in CPU swap space
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_REJECTED = 7  # prompt longer than max_model_len (or empty)
    FINISHED_SHED = 8  # dropped by admission control: waiting queue full or TTFT SLO already missed
    FINISHED_ERROR = 9  # its step failed because of it (e.g. its sampling parameters); the others went on

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


# The token of a step still running (async scheduling): the next step is scheduled before it is known, and the
# executor reads it from the device.
PENDING = -1

FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_REJECTED: "rejected",
    RequestStatus.FINISHED_SHED: "shed",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)
class Request:
    """One generation request.

    `lora_id` names the LoRA adapter (None or 0: the base model). `mm_hashes[k]` is
    the content hash of image k, whose placeholder tokens are
    `prompt_token_ids[offset : offset + length]` with `(offset, length) = mm_positions[k]`
    (sorted by offset, not overlapping). The prefix-cache chain hash starts from
    (lora_id, cache_salt) and adds to each block the hashes of the images it
    overlaps, so equal token ids under another adapter, salt or image never hit.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    priority: int = 0
    eos_token_id: int | None = None
    lora_id: int | None = None
    mm_hashes: tuple[str, ...] = ()
    mm_positions: tuple[tuple[int, int], ...] = ()
    cache_salt: tuple = ()
    deadline: float | None = None  # absolute TTFT deadline, for SLO-aware policies
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    all_token_ids: list[int] = field(default_factory=list)  # prompt, then every sampled token
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 until then
    num_preemptions: int = 0
    num_mm_handled: int = 0  # images before the scheduled tokens (encoded or skipped) since (re)admission
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float = 0.0
    finish_time: float | None = None
    stop_reason: int | str | None = None
    # Derived once, read on every step (plain slots are cheaper than properties in the hot loop).
    num_prompt_tokens: int = field(init=False)
    max_num_tokens: int = field(init=False)  # prompt + max_tokens; the scheduler caps it at max_model_len
    stop_ids: frozenset[int] = field(init=False)  # stop_token_ids, plus EOS unless ignore_eos
    # KVCacheManager's bookkeeping, kept on the request so the hot path needs no lookup by id:
    block_table: list[int] = field(init=False, default_factory=list)  # GPU block ids
    num_cached_blocks: int = field(init=False, default=0)  # leading blocks of the table already indexed
    num_kv_slots: int = field(init=False, default=0)  # tokens its GPU blocks hold

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        params = self.sampling_params
        max_tokens = params.max_tokens if params.max_tokens is not None else 1 << 62
        self.max_num_tokens = self.num_prompt_tokens + max_tokens
        stops = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stops.add(self.eos_token_id)
        self.stop_ids = frozenset(stops)
        if self.mm_positions:
            self._check_mm()

    def _check_mm(self) -> None:
        if len(self.mm_positions) != len(self.mm_hashes):
            raise ValueError(f"request {self.request_id}: mm_positions and mm_hashes differ in length")
        end = 0
        for offset, length in self.mm_positions:
            if offset < end or length < 1 or offset + length > self.num_prompt_tokens:
                raise ValueError(
                    f"request {self.request_id}: mm_positions must be sorted, disjoint, non-empty "
                    f"ranges inside the prompt, got {self.mm_positions}"
                )
            end = offset + length

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASON.get(self.status)

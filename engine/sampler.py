"""Token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds; log-probabilities."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from servebench.engine.core.request import Request
from servebench.engine.host_to_device import to_device
from servebench.engine.outputs import Logprob


@dataclass(slots=True)
class Logprobs:
    """Log-probabilities of some rows of a step (raw model distribution, before temperature and top-k/p)."""

    token_ids: torch.Tensor  # [rows, 1 + k]: the chosen token, then the k most likely
    logprobs: torch.Tensor  # [rows, 1 + k], float32
    ranks: torch.Tensor  # [rows]: the chosen token's rank in the vocabulary (1: the most likely)

    @classmethod
    def of(cls, logits: torch.Tensor, chosen: torch.Tensor, k: int) -> Logprobs:
        lp = logits.float().log_softmax(dim=-1)
        chosen_lp = lp.gather(-1, chosen[:, None])
        top_lp, top_ids = lp.topk(k, dim=-1)
        return cls(torch.cat([chosen[:, None], top_ids], dim=1), torch.cat([chosen_lp, top_lp], dim=1),
                   (lp > chosen_lp).sum(dim=-1) + 1)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Logprobs:
        return Logprobs(fn(self.token_ids), fn(self.logprobs), fn(self.ranks))

    def tolist(self, ks: list[int]) -> list[dict[int, Logprob]]:
        """Row i as {chosen token: ..., then its `ks[i]` most likely tokens}, as vLLM's `logprobs` entries."""
        rows = []
        columns = self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist(), ks
        for ids, lps, rank, k in zip(*columns):
            entry = {ids[0]: Logprob(lps[0], rank)}
            for j in range(1, k + 1):
                entry.setdefault(ids[j], Logprob(lps[j], j))
            rows.append(entry)
        return rows


@dataclass(slots=True)
class SamplerOutput:
    tokens: torch.Tensor  # [rows] int64
    logprobs: Logprobs | None  # rows whose request asked for logprobs, in row order; None if none did
    failed: dict[int, Exception]  # rows that could not be sampled: their requests fail, the batch goes on


class Sampler:
    """Samples one token per logits row.

    Random rows use the exponential-race trick (argmax of p / Exp(1) noise is a draw from p), so a
    seeded request only needs its own noise row from its own generator: its tokens then depend on its
    seed alone, whatever else shares the batch.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        try:
            tokens, failed = self._sample(logits, reqs), {}
        except Exception:  # one request's parameters must not fail the whole batch
            tokens, failed = self._sample_rows(logits, reqs)
        rows = [i for i, r in enumerate(reqs) if r.sampling_params.logprobs is not None]
        logprobs = None
        if rows:
            k = max(reqs[i].sampling_params.logprobs for i in rows)
            index = to_device(rows, logits.device, torch.long)
            try:
                logprobs = Logprobs.of(logits[index], tokens[index], k)
            except Exception as e:  # the requests that asked for logprobs fail, not the batch
                failed |= dict.fromkeys(rows, e)
        return SamplerOutput(tokens, logprobs, failed)

    def _sample_rows(self, logits: torch.Tensor,
                     reqs: list[Request]) -> tuple[torch.Tensor, dict[int, Exception]]:
        """After the batch failed: one row at a time, so that a row that fails alone names its request."""
        tokens = logits.argmax(dim=-1)  # a placeholder for failed rows; their requests end with an error
        failed = {}
        for i, req in enumerate(reqs):
            try:
                tokens[i] = self._sample(logits[i:i + 1], [req])[0]
            except Exception as e:
                failed[i] = e
        return tokens, failed

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        greedy_tokens = logits.argmax(dim=-1)
        params = [r.sampling_params for r in reqs]
        if all(p.greedy for p in params):
            return greedy_tokens
        temps = to_device([1.0 if p.greedy else p.temperature for p in params], self.device, torch.float32)
        logits = logits / temps[:, None]
        top_k = [p.top_k if p.top_k > 0 else logits.shape[-1] for p in params]
        top_p = [p.top_p for p in params]
        if any(k < logits.shape[-1] for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, to_device(top_k, self.device, torch.long),
                                  to_device(top_p, self.device, torch.float32))
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, r in enumerate(reqs):
            if r.sampling_params.seed is not None:
                noise[i].exponential_(generator=self._generator(r))
        sampled = probs.div_(noise).argmax(dim=-1)
        is_greedy = to_device([p.greedy for p in params], self.device, torch.bool)
        return torch.where(is_greedy, greedy_tokens, sampled)

    def _generator(self, req: Request) -> torch.Generator:
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(req.sampling_params.seed)
            self._generators[req.request_id] = gen
        return gen


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf every token outside a row's top-k and outside its top-p nucleus (at least one stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    mask = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    mask |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(mask, float("-inf")))

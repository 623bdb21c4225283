"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

import itertools
from typing import Any

from servebench.engine.config import EngineArgs
from servebench.engine.core.sampling_params import SamplingParams
from servebench.engine.llm_engine import LLMEngine
from servebench.engine.lora import LoRARequest
from servebench.engine.outputs import RequestOutput
from tqdm import tqdm

Prompt = str | dict[str, Any]  # text, or {"prompt_token_ids": [...]} (optionally with "prompt")


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineArgs.from_kwargs(model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of `prompts`. `lora_request`: the adapter
        of every prompt, or one per prompt (None: the base model); needs enable_lora=True."""
        prompts = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        params = _per_prompt(sampling_params if sampling_params is not None else SamplingParams(), prompts,
                             "sampling_params")
        loras = _per_prompt(lora_request, prompts, "lora_request")
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                ids.append(self._add(prompt, p, lora))
        except (ValueError, TypeError):
            for rid in ids:  # all or nothing: no half-submitted batch left in the engine
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _add(self, prompt: Prompt, params: SamplingParams, lora: LoRARequest | None) -> str:
        rid = str(next(self._ids))
        if isinstance(prompt, str):
            self.engine.add_request(rid, prompt, None, params, lora_request=lora)
        elif isinstance(prompt, dict) and ("prompt_token_ids" in prompt or "prompt" in prompt):
            self.engine.add_request(rid, prompt.get("prompt"), prompt.get("prompt_token_ids"), params,
                                    lora_request=lora)
        else:
            raise TypeError(
                f"a prompt must be a str or a dict with prompt_token_ids, got {type(prompt).__name__}")
        return rid

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(final_only=True):
                    done[out.request_id] = out
                    bar.update(1)
        return [done[rid] for rid in ids]


def _per_prompt(value: Any, prompts: list[Prompt], name: str) -> list:
    """One value for every prompt, or a list with one per prompt."""
    values = value if isinstance(value, list) else [value] * len(prompts)
    if len(values) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(values)} {name}")
    return values

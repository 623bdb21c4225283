"""Model definitions; one Llama-family class covers Llama 2/3, CodeLlama, Mistral, Qwen2/2.5 and Qwen3."""

from servebench.engine.models.llama import AttentionMetadata, LlamaForCausalLM

__all__ = ["AttentionMetadata", "LlamaForCausalLM"]

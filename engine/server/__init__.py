"""OpenAI-compatible HTTP server over `LLMEngine`: `python -m engine.server --model DIR`, or `build_app`."""

"""OpenAI-compatible HTTP server over `LLMEngine`: `servebench-serve --model DIR`, or `build_app`."""

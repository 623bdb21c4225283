"""`python -m engine.server --model DIR [vLLM engine flags]`: serve the OpenAI API with uvicorn."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from engine.config import EngineArgs


def _flag_type(hint: typing.Any) -> type:
    """The argparse type of an EngineArgs field: `int | None` parses as int."""
    if isinstance(hint, types.UnionType):
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the API's model name (default: --model)")
    # Every EngineArgs field becomes a flag under vLLM's spelling (--max-model-len, --enable-prefix-caching
    # and --no-enable-prefix-caching, ...).
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(hints[f.name])
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=kind, required=f.default is dataclasses.MISSING,
                           default=None if f.default is dataclasses.MISSING else f.default)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Heavy imports after parsing, so that --help is instant.
    import uvicorn

    from engine.llm_engine import LLMEngine
    from engine.server.api import build_app

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)}
    try:
        engine = LLMEngine(EngineArgs(**fields))
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"python -m engine.server: error: {e}") from None
    app = build_app(engine, args.served_model_name or args.model, args.model, args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()

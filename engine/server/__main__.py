"""`servebench-serve --model DIR [vLLM engine flags]` (or `python -m servebench.engine.server`): serve
the OpenAI API with uvicorn."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import types
import typing
from pathlib import Path

from servebench.engine.config import EngineArgs
from servebench.engine.lora import LoRARequest


def _flag_type(hint: typing.Any) -> typing.Callable[[str], typing.Any]:
    """The argparse type of an EngineArgs field: `int | None` parses as int, a dict as a JSON object (vLLM's
    --compilation-config '{"cudagraph_mode": "FULL_DECODE_ONLY"}')."""
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return _json_object if hint is dict else hint


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="servebench-serve", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the API's model name (default: --model)")
    p.add_argument("--max-request-body-bytes", type=int, default=None,
                   help="larger bodies get 413 (default: 32 bytes a token of max-model-len, >= 1 MiB)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="PEFT LoRA adapters served as models of these names (needs --enable-lora)")
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


def lora_modules(specs: list[str], model_name: str) -> list[LoRARequest]:
    """--lora-modules NAME=PATH ... as LoRARequests with ids 1, 2, ... in order."""
    loras = []
    for i, spec in enumerate(specs, start=1):
        name, sep, path = spec.partition("=")
        if not (sep and name and path):
            raise ValueError(f"--lora-modules: expected NAME=PATH, got {spec!r}")
        if name == model_name or name in (lora.lora_name for lora in loras):
            raise ValueError(f"--lora-modules: the name {name!r} is already served")
        loras.append(LoRARequest(name, i, path))
    return loras


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Heavy imports after parsing, so that --help is instant.
    import uvicorn
    from servebench.engine.dummy import resolve_model
    from servebench.engine.server.api import build_app
    from servebench.engine.server.engine_process import EngineProcess

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)}
    name = args.served_model_name or args.model
    try:
        loras = lora_modules(args.lora_modules, name)
        with tempfile.TemporaryDirectory() as tmp:
            # With --load-format dummy a conf/model shape name (tiny_llama, llama2_7b, ...) serves too.
            if args.load_format == "dummy":
                fields["model"] = str(resolve_model(args.model, Path(tmp))[1])
            engine = EngineProcess(EngineArgs(**fields), loras)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        raise SystemExit(f"servebench-serve: error: {e}") from None
    app = build_app(engine, name, args.model, args.api_key, args.max_request_body_bytes, loras)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()

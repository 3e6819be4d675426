"""`lathe serve | demo | models make-tiny`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lathe.settings import Settings, default_data_dir

DEFAULT_MODEL_NAME = "tiny-qwen3"


def parse_model(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    if not (Path(path).expanduser() / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a model folder (no config.json)")
    return name, Path(path).expanduser().resolve()


def parse_json_object(value: str) -> dict:
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return obj


def default_tiny_model(data_dir: Path) -> Path:
    """The built-in tiny model, built on first use under the data dir."""
    from lathe.models.tiny import TinyModelSpec, make_tiny

    path = data_dir / "models" / DEFAULT_MODEL_NAME
    if not (path / "config.json").exists():
        print(f"building the tiny default model in {path} ...", file=sys.stderr)
        make_tiny(path, TinyModelSpec())
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lathe.api.app import create_app

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    models = dict(args.model) if args.model else {DEFAULT_MODEL_NAME: default_tiny_model(data_dir)}
    settings = Settings(
        models=models,
        data_dir=data_dir,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        max_lora_rank=args.max_lora_rank,
        long_poll_seconds=args.long_poll_seconds,
        threads=args.threads,
        microbatch_tokens=args.microbatch_tokens,
        kv_cache_tokens=args.kv_cache_tokens,
        max_pending_samples=args.max_pending_samples,
        client_config=args.client_config,
    )
    app = create_app(settings)
    print(f"lathe serving {', '.join(models)} on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from lathe.models.tiny import make_tiny, spec_from_args

    try:
        spec = spec_from_args(args)
    except ValueError as e:
        print(f"lathe: {e}", file=sys.stderr)
        return 2
    out = make_tiny(args.out, spec)
    print(out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lathe.demo import run_demo

    return run_demo(steps=args.steps, data_dir=args.data_dir)


def build_parser() -> argparse.ArgumentParser:
    from lathe.models.tiny import add_make_tiny_arguments

    parser = argparse.ArgumentParser(prog="lathe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API server")
    serve.add_argument(
        "--model",
        action="append",
        type=parse_model,
        metavar="NAME=PATH",
        help="serve the Hugging Face folder PATH as base model NAME (repeatable); "
        "default: a built-in tiny model",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--data-dir", help="database and checkpoints (default $LATHE_HOME or ~/.lathe)"
    )
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--max-lora-rank", type=int, default=128)
    serve.add_argument("--long-poll-seconds", type=float, default=30.0)
    serve.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    serve.add_argument(
        "--microbatch-tokens",
        type=int,
        default=16384,
        help="padded tokens per training micro-batch",
    )
    serve.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=65536,
        help="KV positions the sampler may hold; requests wait beyond it",
    )
    serve.add_argument(
        "--max-pending-samples",
        type=int,
        default=4096,
        help="sample requests queued or running before /asample answers 429",
    )
    serve.add_argument(
        "--client-config",
        type=parse_json_object,
        default={},
        metavar="JSON",
        help="overrides of what /client/config tells the SDK, e.g. '{\"fwdbwd_max_chunk_len\": 8}'",
    )
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="train a tiny model on a toy task through the tinker SDK")
    demo.add_argument("--steps", type=int, default=None, help="training steps")
    demo.add_argument("--data-dir", help="where the demo server keeps its data (default: temp)")
    demo.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    tiny = models_sub.add_parser("make-tiny", help="write a tiny random model folder")
    add_make_tiny_arguments(tiny)
    tiny.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

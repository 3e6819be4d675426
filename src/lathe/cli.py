"""`lathe serve | status | demo | keys | checkpoint | models make-tiny | models hf-cache`."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path

from lathe.settings import Limits, Settings, default_data_dir
from lathe.store.keys import LOCAL_USER

DEFAULT_MODEL_NAME = "tiny-qwen3"


def fail(message: str) -> int:
    print(f"lathe: {message}", file=sys.stderr)
    return 2


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


LIMIT_NAMES = [f.name for f in dataclasses.fields(Limits)]


def parse_limit(value: str) -> tuple[str, int]:
    name, sep, number = value.partition("=")
    if not sep or name not in LIMIT_NAMES or not number.isdigit():
        raise argparse.ArgumentTypeError(
            f"expected NAME=INTEGER with NAME one of {', '.join(LIMIT_NAMES)}; got {value!r}"
        )
    return name, int(number)


def data_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()


def default_tiny_model(data_dir: Path) -> Path:
    """The built-in tiny model, built on first use under the data dir."""
    from lathe.testing.tiny_models import TinyModelSpec, make_tiny

    path = data_dir / "models" / DEFAULT_MODEL_NAME
    if not (path / "config.json").exists():
        print(f"building the tiny default model in {path} ...", file=sys.stderr)
        make_tiny(path, TinyModelSpec())
    return path


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_keys(data_dir: Path):  # noqa: ANN201 - a KeyStore, imported lazily for a fast CLI
    from lathe.store.db import Store
    from lathe.store.keys import KeyStore, server_secret

    return KeyStore(Store.open(data_dir / "lathe.db"), server_secret(data_dir))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lathe.api.app import create_app

    data_dir = data_dir_of(args)
    if args.dev and not is_loopback(args.host):
        return fail("--dev accepts any key, so it only binds loopback addresses (127.0.0.1)")
    if not args.dev and not is_loopback(args.host) and not open_keys(data_dir).has_keys():
        return fail(
            f"refusing to serve on {args.host} with no API keys: create one with "
            "`lathe keys create NAME` (or serve on 127.0.0.1)"
        )
    models = dict(args.model) if args.model else {DEFAULT_MODEL_NAME: default_tiny_model(data_dir)}
    try:
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
            reap_seconds=args.reap_seconds,
            deterministic=args.deterministic,
            max_resident_adapters=args.max_resident_adapters,
            session_timeout_seconds=args.session_timeout,
            dev=args.dev,
            jwt=args.jwt,
            limits=Limits(**dict(args.limit or [])),
        )
    except ValueError as e:
        return fail(str(e))
    app = create_app(settings)
    mode = " (dev mode: any tml- key)" if args.dev else ""
    print(
        f"lathe serving {', '.join(models)} on http://{args.host}:{args.port}{mode}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    keys = open_keys(data_dir_of(args))
    if args.keys_command == "create":
        key, key_id = keys.create_key(args.name)
        print(key)
        print(f"key {key_id} for user {args.name!r}; it is shown only once", file=sys.stderr)
    elif args.keys_command == "list":
        rows = keys.list_keys()
        print(f"{'KEY_ID':>6}  {'USER':20}  {'PREFIX':12}  {'CREATED':20}  STATUS")
        for r in rows:
            status = "revoked" if r["revoked"] else "active"
            created = r["created_at"].strftime("%Y-%m-%d %H:%M:%S")
            print(
                f"{r['key_id']:>6}  {r['user']:20}  {r['prefix'] + '…':12}  {created:20}  {status}"
            )
    else:
        n = keys.revoke(args.name_or_key_id)
        if n == 0:
            return fail(f"no active key matches {args.name_or_key_id!r}")
        print(f"revoked {n} key(s)")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from lathe.store import admin
    from lathe.store.tinker_paths import PathError

    data_dir = data_dir_of(args)
    keys = open_keys(data_dir)
    store = keys.store
    try:
        match args.checkpoint_command:
            case "list":
                for row in admin.listing(store, keys, args.user, args.run):
                    print(
                        f"{row.tinker_path}  {row.size_bytes:>12,} B  "
                        f"{row.created_at:%Y-%m-%d %H:%M:%S}{'  public' if row.public else ''}"
                    )
            case "info":
                print(json.dumps(admin.info(store, args.path), indent=2))
            case "download":
                print(admin.download(store, args.path, Path(args.out)))
            case "delete":
                admin.delete(store, args.path)
                print(f"deleted {args.path}")
            case "merge":
                base = Path(args.base_dir) if args.base_dir else None
                print(admin.merge(store, args.path, Path(args.out), base))
            case "import":
                name, path = args.base
                print(
                    admin.import_peft(
                        store,
                        keys,
                        data_dir / "checkpoints",
                        Path(args.peft_dir),
                        name,
                        path,
                        args.user or LOCAL_USER,
                        args.name,
                    )
                )
    except (admin.AdminError, PathError, FileExistsError) as e:
        return fail(str(e))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    key = args.api_key or os.environ.get("TINKER_API_KEY") or "tml-local"
    try:
        r = httpx.get(
            f"{args.url.rstrip('/')}/api/v1/status", headers={"X-API-Key": key}, timeout=10
        )
    except httpx.HTTPError as e:
        return fail(f"cannot reach {args.url}: {e}")
    if r.status_code != 200:
        return fail(f"{r.status_code}: {r.json().get('detail', r.text)}")
    print(json.dumps(r.json(), indent=2))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from lathe.testing.tiny_models import make_tiny, spec_from_args

    try:
        spec = spec_from_args(args)
    except ValueError as e:
        return fail(str(e))
    print(make_tiny(args.out, spec))
    return 0


def cmd_hf_cache(args: argparse.Namespace) -> int:
    from lathe.models.hf_cache import install

    try:
        print(install(args.model, args.name, args.cache_dir))
    except (ValueError, OSError) as e:
        return fail(str(e))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lathe.demo import run_demo

    return run_demo(steps=args.steps, data_dir=args.data_dir)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
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
    serve.add_argument(
        "--dev",
        action="store_true",
        help="local mode: any tml- key is accepted as one local user (loopback only)",
    )
    serve.add_argument(
        "--jwt",
        action="store_true",
        help="issue short-lived JWTs (/auth/token) for the SDK's whoami",
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
        help="padded tokens per training step; work of several adapters is co-batched up to it",
    )
    serve.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=65536,
        help="KV positions the sampler may hold per base model; requests wait beyond it",
    )
    serve.add_argument(
        "--max-pending-samples",
        type=int,
        default=4096,
        help="sample requests queued or running before /asample answers 429",
    )
    serve.add_argument(
        "--limit",
        action="append",
        type=parse_limit,
        metavar="NAME=N",
        help=f"override a per-request or per-user limit ({', '.join(LIMIT_NAMES)})",
    )
    serve.add_argument(
        "--client-config",
        type=parse_json_object,
        default={},
        metavar="JSON",
        help="overrides of what /client/config tells the SDK, e.g. '{\"fwdbwd_max_chunk_len\": 8}'",
    )
    serve.add_argument(
        "--max-resident-adapters",
        type=int,
        default=256,
        help="training adapters kept in memory; idle ones are swapped to disk",
    )
    serve.add_argument(
        "--session-timeout",
        type=float,
        default=600.0,
        help="seconds without a heartbeat after which a session ends (checkpoints stay)",
    )
    serve.add_argument(
        "--deterministic",
        action="store_true",
        help="batch-invariant training: a tenant's results are bitwise the same alone or "
        "co-batched (slower)",
    )
    serve.add_argument(
        "--reap-seconds",
        type=float,
        default=60.0,
        help="how often checkpoints past their TTL are deleted",
    )
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=cmd_serve)


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", help="default $LATHE_HOME or ~/.lathe")
    keys = sub.add_parser("keys", help="manage users' API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser(
        "create", parents=[data_dir], help="print a new key for user NAME (shown once)"
    )
    create.add_argument("name")
    keys_sub.add_parser("list", parents=[data_dir], help="list keys (never the keys themselves)")
    revoke = keys_sub.add_parser(
        "revoke", parents=[data_dir], help="revoke a key by id, or all keys of a user"
    )
    revoke.add_argument("name_or_key_id")
    keys.set_defaults(func=cmd_keys)


def add_checkpoint_parser(sub: argparse._SubParsersAction) -> None:
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", help="default $LATHE_HOME or ~/.lathe")
    ckpt = sub.add_parser("checkpoint", help="inspect, export, merge and import checkpoints")
    ck = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    ls = ck.add_parser("list", parents=[data_dir], help="list checkpoints")
    ls.add_argument("--user", help="only this user's")
    ls.add_argument("--run", help="only this training run's")
    for name, text in (
        ("info", "show a checkpoint's metadata and check its files"),
        ("delete", "delete a checkpoint"),
    ):
        p = ck.add_parser(name, parents=[data_dir], help=text)
        p.add_argument("path", help="tinker://<run>/<kind>/<name>")
    dl = ck.add_parser("download", parents=[data_dir], help="copy the PEFT adapter files out")
    dl.add_argument("path")
    dl.add_argument("--out", required=True)
    merge = ck.add_parser(
        "merge",
        parents=[data_dir],
        help="write a Hugging Face model folder with the adapter merged in",
    )
    merge.add_argument("path")
    merge.add_argument("--out", required=True)
    merge.add_argument("--base-dir", help="the base model folder (default: where it was served)")
    imp = ck.add_parser(
        "import", parents=[data_dir], help="make a training run from an outside PEFT LoRA adapter"
    )
    imp.add_argument("peft_dir")
    imp.add_argument(
        "--base",
        required=True,
        type=parse_model,
        metavar="NAME=PATH",
        help="the served base model name and its folder",
    )
    imp.add_argument("--user", help=f"owner (default {LOCAL_USER!r}, the --dev user)")
    imp.add_argument("--name", default="imported", help="checkpoint name")
    ckpt.set_defaults(func=cmd_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    from lathe.testing.tiny_models import add_make_tiny_arguments

    parser = argparse.ArgumentParser(prog="lathe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_keys_parser(sub)
    add_checkpoint_parser(sub)

    status = sub.add_parser("status", help="what a running server holds and does")
    status.add_argument(
        "--url", default=os.environ.get("TINKER_BASE_URL") or "http://127.0.0.1:8000"
    )
    status.add_argument("--api-key", help="default $TINKER_API_KEY, or the --dev key")
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="train a tiny model on a toy task through the tinker SDK")
    demo.add_argument("--steps", type=int, default=None, help="training steps")
    demo.add_argument("--data-dir", help="where the demo server keeps its data (default: temp)")
    demo.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    tiny = models_sub.add_parser("make-tiny", help="write a tiny random model folder")
    add_make_tiny_arguments(tiny)
    tiny.set_defaults(func=cmd_make_tiny)
    cache = models_sub.add_parser(
        "hf-cache",
        help="make a model folder's tokenizer findable offline under a hub name",
        description="Copy the tokenizer and config of a model folder into the Hugging Face "
        "cache as NAME, so that tools which load a tokenizer by model name (tinker-cookbook, "
        "AutoTokenizer) find it with HF_HUB_OFFLINE=1.",
    )
    cache.add_argument("--model", required=True, type=Path, help="the model folder")
    cache.add_argument("--name", required=True, help="hub name, e.g. Qwen/Qwen3-4B-Instruct-2507")
    cache.add_argument(
        "--cache-dir",
        type=Path,
        help="hub cache (default: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub)",
    )
    cache.set_defaults(func=cmd_hf_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("lathe").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `lathe` command: serve, engine, status, demo, keys, checkpoint, models."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, get_args, get_type_hints

from lathe.settings import SHARED_ENGINE, TORCHRUN_ENV, Limits, Settings, default_data_dir
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


def tiny_model_path(data_dir: Path) -> Path:
    return data_dir / "models" / DEFAULT_MODEL_NAME


def default_tiny_model(data_dir: Path) -> Path:
    """The built-in tiny model, built on first use under the data dir.

    Built by a child `lathe models make-tiny` (which needs torch), so that the process serving
    the API never loads torch.
    """
    path = tiny_model_path(data_dir)
    if not (path / "config.json").exists():
        print(f"building the tiny default model in {path} ...", file=sys.stderr)
        make_tiny = [sys.executable, "-m", "lathe", "models", "make-tiny", "--out", str(path)]
        subprocess.run(make_tiny, check=True, stdout=subprocess.DEVNULL)
    return path


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_keys(data_dir: Path, database_url: str | None = None):  # noqa: ANN201 - a KeyStore
    from lathe.store.db import Store  # imported here: the CLI starts fast
    from lathe.store.keys import KeyStore, server_secret

    return KeyStore(Store.open(data_dir / "lathe.db", database_url), server_secret(data_dir))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The Settings the `lathe serve` flags name (ValueError if they are invalid). Without
    --model: the built-in tiny model under the data dir, which cmd_serve builds."""
    given = [f.name for f in dataclasses.fields(Settings) if hasattr(args, f.name)]
    values = {name: getattr(args, name) for name in given}  # `lathe engine` has fewer flags
    values["models"] = dict(args.models or []) or {
        DEFAULT_MODEL_NAME: tiny_model_path(args.data_dir)
    }
    if "limits" in values:
        values["limits"] = Limits(**dict(args.limits or []))
    return Settings(**values)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        return fail(str(e))
    if settings.ranks > 1 and settings.shared_engine:
        return fail("a shared engine's ranks are `lathe engine --ranks N`'s, not lathe serve's")
    if settings.ranks > 1 and settings.engine != "process":
        return fail("--ranks above 1 needs the engine in its own process (--engine process)")
    if settings.dev and not is_loopback(settings.host):
        return fail("--dev accepts any key, so it only binds loopback addresses (127.0.0.1)")
    if (
        not settings.dev
        and not is_loopback(settings.host)
        and not open_keys(settings.data_dir, settings.database_url).has_keys()
    ):
        return fail(
            f"refusing to serve on {settings.host} with no API keys: create one with "
            "`lathe keys create NAME` (or serve on 127.0.0.1)"
        )
    if not args.models:
        default_tiny_model(settings.data_dir)
    import uvicorn

    from lathe.api.app import create_app
    from lathe.client.choice import new_engine_client

    # Hold the port from the start: a port in use fails now, before models load, and the
    # engine (whose torch.distributed groups open ports of their own) cannot take it meanwhile.
    config = uvicorn.Config(
        "lathe.api.app:create_app",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
    )
    try:
        sock = config.bind_socket()
    except SystemExit:  # uvicorn has logged why (address in use, say)
        return fail(f"cannot listen on {settings.host}:{settings.port}")
    app = create_app(settings, new_engine_client(settings))
    mode = " (dev mode: any tml- key)" if settings.dev else ""
    print(
        f"lathe serving {', '.join(settings.models)} on "
        f"http://{settings.host}:{settings.port}{mode}",
        file=sys.stderr,
    )
    config.app = app
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def under_torchrun() -> bool:
    """This process is one of the ranks torchrun started (it set their environment)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def cmd_engine(args: argparse.Namespace) -> int:
    """The engine alone, serving the API replicas that name it with --engine tcp://...; under
    torchrun, one rank of an engine group (rank 0 serves)."""
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        return fail(str(e))
    if not SHARED_ENGINE.fullmatch(args.listen):
        return fail(f"--listen must be tcp://HOST:PORT, not {args.listen!r}")
    torchrun = under_torchrun()
    if torchrun and settings.ranks > 1:
        return fail("under torchrun the group's size is torchrun's: leave out --ranks")
    if torchrun and not args.models:
        return fail("under torchrun give every rank its --model NAME=PATH (a local folder)")
    if not args.models:
        default_tiny_model(settings.data_dir)
    from lathe.client.choice import engine_spec
    from lathe.client.engine_service import EngineService
    from lathe.store import checkpoint_files
    from lathe.store.keys import server_secret

    serving = os.environ.get("RANK", "0") == "0"  # the rank that writes files and serves
    if serving and (swept := checkpoint_files.sweep_unfinished(settings.checkpoint_dir)):
        print(f"removed {swept} checkpoint folder(s) left half-written by a crash", file=sys.stderr)
    spec, secret = engine_spec(settings), server_secret(settings.data_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if serving:
        print(
            f"lathe engine serving {', '.join(settings.models)} on {args.listen}: start API "
            f"replicas with `lathe serve --engine {args.listen} --data-dir {settings.data_dir}`",
            file=sys.stderr,
        )
    if torchrun:
        from lathe.client.group_engine import run_rank

        run_rank(spec, args.listen, secret, stop)
        return 0
    from lathe.client.own_process import OwnProcessEngine

    EngineService(OwnProcessEngine(spec), args.listen, secret).run(stop)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    keys = open_keys(data_dir_of(args), args.database_url)
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
    keys = open_keys(data_dir, args.database_url)
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
                from lathe.engine import offline  # torch: only for the commands that need it

                base = Path(args.base_dir) if args.base_dir else None
                print(offline.merge(store, args.path, Path(args.out), base))
            case "import":
                from lathe.engine import offline

                name, path = args.base
                print(
                    offline.import_peft(
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


def serve_flag(f: dataclasses.Field) -> str:
    """The `lathe serve` flag of a Settings field: its name in kebab-case unless it names one."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def parse_path(value: str) -> Path:
    return Path(value).expanduser()


SCALAR_TYPES = {int: int, float: float, str: str, Path: parse_path}
# Settings fields given as NAME=VALUE flags (repeatable, collected by settings_from_args) or JSON.
STRUCTURED_TYPES: dict[Any, dict[str, Any]] = {
    dict[str, Path]: {"action": "append", "type": parse_model},  # --model NAME=PATH
    Limits: {"action": "append", "type": parse_limit},  # --limit NAME=N
    dict[str, Any]: {"type": parse_json_object},  # --client-config JSON
}


def settings_argument(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """add_argument's keywords for a Settings field: the type from its annotation, the default
    and the help from the field."""
    meta = f.metadata
    kwargs: dict[str, Any] = {"dest": f.name, "help": meta["doc"].replace("%", "%%")}
    kwargs.update({key: meta[key] for key in ("metavar", "choices") if meta[key]})
    if hint in STRUCTURED_TYPES:
        kwargs.update(STRUCTURED_TYPES[hint])
    elif hint is bool:
        if f.default is not False:
            raise TypeError(f"Settings.{f.name}: a bool flag can only turn an option on")
        kwargs["action"] = "store_true"
    else:
        (scalar,) = [t for t in get_args(hint) or (hint,) if t is not type(None)]  # int | None
        kwargs["type"] = SCALAR_TYPES[scalar]
        if "choices" not in kwargs:  # else argparse shows them
            kwargs.setdefault("metavar", serve_flag(f)[2:].replace("-", "_").upper())
    if kwargs.get("action") is None:
        kwargs["default"] = f.default_factory() if callable(f.default_factory) else f.default
    return kwargs


def limits_epilog() -> str:
    rows = [
        f"  {f.name:24}  {f.metadata['doc']} (default: {f.default})"
        for f in dataclasses.fields(Limits)
    ]
    return "limits (--limit NAME=N):\n" + "\n".join(rows)


class ServeHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The table of limits as written; a flag's default after its help where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if d is None or d is False or d == {} or d is argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: %(default)s)"


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """`lathe serve`: one flag per Settings field (settings.py has their docs and defaults)."""
    serve = sub.add_parser(
        "serve",
        help="run the API server",
        formatter_class=ServeHelpFormatter,
        epilog=limits_epilog(),
    )
    hints = get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        serve.add_argument(serve_flag(f), **settings_argument(f, hints[f.name]))
    serve.set_defaults(func=cmd_serve)


def add_engine_parser(sub: argparse._SubParsersAction) -> None:
    """`lathe engine`: the engine's own flags of `lathe serve`, and the address to serve on."""
    engine = sub.add_parser(
        "engine",
        help="run the engine alone, shared by API replicas (lathe serve --engine tcp://...)",
        description="Run the engine as a service that several `lathe serve --engine "
        "tcp://HOST:PORT` replicas share (same --data-dir, one --database-url). The link is "
        "encrypted and authenticated with keys derived from the data dir's secret.key.",
        formatter_class=ServeHelpFormatter,
    )
    engine.add_argument(
        "--listen",
        required=True,
        metavar="tcp://HOST:PORT",
        help="where the API replicas reach the engine",
    )
    hints = get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        if f.metadata["engine"]:
            engine.add_argument(serve_flag(f), **settings_argument(f, hints[f.name]))
    engine.set_defaults(func=cmd_engine)


def data_dir_parser() -> argparse.ArgumentParser:
    """--data-dir and --database-url, for the commands that open a server's store."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data-dir", help="default $LATHE_HOME or ~/.lathe")
    parser.add_argument("--database-url", help="as lathe serve's (default: SQLite in the data dir)")
    return parser


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    data_dir = data_dir_parser()
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
    data_dir = data_dir_parser()
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
    from lathe.testing.tiny_spec import add_make_tiny_arguments

    parser = argparse.ArgumentParser(prog="lathe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_engine_parser(sub)
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

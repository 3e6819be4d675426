"""The `lathe` command line: make-tiny, serve's flags (made from Settings), defaults, errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

import httpx
import tinker

from lathe.cli import build_parser, serve_flag, settings_from_args
from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.settings import Limits, Settings, default_data_dir


def lathe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lathe", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_make_tiny_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "llama"
    r = lathe(
        "models",
        "make-tiny",
        "--family",
        "llama",
        "--out",
        str(out),
        "--layers",
        "3",
        "--hidden-size",
        "32",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "8",
        "--vocab-size",
        "400",
        "--seed",
        "5",
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["vocab_size"]) == ("llama", 3, 400)
    from lathe.models.loading import load_model

    assert load_model(out).config.num_hidden_layers == 3


def test_make_tiny_rejects_bad_sizes(tmp_path):
    r = lathe(
        "models", "make-tiny", "--out", str(tmp_path / "x"), "--heads", "3", "--kv-heads", "2"
    )
    assert r.returncode != 0 and "num_heads" in r.stderr


def test_serve_rejects_a_model_argument_that_is_not_a_folder(tmp_path):
    r = lathe("serve", "--model", f"x={tmp_path}")
    assert r.returncode == 2 and "config.json" in r.stderr
    r = lathe("serve", "--model", "no-equals-sign")
    assert r.returncode == 2 and "NAME=PATH" in r.stderr


def test_serve_without_models_serves_the_builtin_tiny_model(tmp_path):
    with LocalServer({}, tmp_path / "data") as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            rest = tinker.RestClient(base_url=srv.base_url, api_key=LOCAL_API_KEY)
            caps = rest.get_server_capabilities().result().supported_models
            assert [m.model_name for m in caps] == ["tiny-qwen3"]
            tc = sc.create_lora_training_client(base_model="tiny-qwen3", rank=4).result()
            tok = tc.get_tokenizer()
            assert tok.decode(tok.encode("hello 12")) == "hello 12"
        # heartbeats: known sessions are kept alive, unknown ones are refused
        h = {"X-API-Key": LOCAL_API_KEY}
        sid = httpx.post(f"{srv.base_url}/api/v1/create_session", json={}, headers=h).json()
        ok = httpx.post(f"{srv.base_url}/api/v1/session_heartbeat", json=sid, headers=h)
        assert ok.status_code == 200
        gone = httpx.post(
            f"{srv.base_url}/api/v1/session_heartbeat", json={"session_id": "sess-none"}, headers=h
        )
        assert gone.status_code == 404 and "detail" in gone.json()
    assert (tmp_path / "data" / "models" / "tiny-qwen3" / "config.json").exists()


def test_hf_cache_makes_the_tokenizer_loadable_offline_by_hub_name(tiny_qwen3, tmp_path):
    cache = tmp_path / "hub"
    name = "Qwen/Qwen3-4B-Instruct-2507"
    args = ("models", "hf-cache", "--model", str(tiny_qwen3), "--name", name)
    r = lathe(*args, "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr
    assert lathe(*args, "--cache-dir", str(cache)).stdout == r.stdout  # idempotent
    script = (
        "import sys; from transformers import AutoTokenizer;"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]);"
        "print(t.convert_tokens_to_ids('<|im_end|>'), len(t))"
    )
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    loaded = subprocess.run(
        [sys.executable, "-c", script, name], capture_output=True, text=True, env=env, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr
    expected = json.loads((tiny_qwen3 / "tokenizer.json").read_text())["added_tokens"]
    im_end = next(t["id"] for t in expected if t["content"] == "<|im_end|>")
    assert loaded.stdout.split()[0] == str(im_end)

    bad = lathe("models", "hf-cache", "--model", str(tiny_qwen3), "--name", "../x")
    assert bad.returncode != 0 and "ORG/NAME" in bad.stderr


def serve_argv(settings: Settings) -> list[str]:
    """The `lathe serve` command line that asks for these settings."""
    argv = ["serve"]
    for f in dataclasses.fields(Settings):
        flag, value = serve_flag(f), getattr(settings, f.name)
        if f.name == "models":
            argv += [a for name, path in value.items() for a in (flag, f"{name}={path}")]
        elif f.name == "limits":
            argv += [a for k, v in vars(value).items() for a in (flag, f"{k}={v}")]
        elif isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def test_every_setting_is_a_serve_flag_documented_by_its_field(tmp_path):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {s: a for a in sub.choices["serve"]._actions for s in a.option_strings}
    for f in dataclasses.fields(Settings):
        action = flags[serve_flag(f)]
        assert (action.dest, action.help) == (f.name, f.metadata["doc"])
    r = lathe("serve", "--help", env={**os.environ, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    for f in dataclasses.fields(Settings):
        assert f"{serve_flag(f)} " in r.stdout and f.metadata["doc"] in r.stdout, f.name
    for f in dataclasses.fields(Limits):  # set with --limit NAME=N, listed after the flags
        assert re.search(rf"^  {f.name} +{re.escape(f.metadata['doc'])}", r.stdout, re.M), f.name


def test_serve_flags_round_trip_into_settings(tmp_path):
    models = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        models[name] = (tmp_path / name).resolve()
    changed = {  # every field away from its default, so that a flag dropped shows
        "models": models,
        "data_dir": tmp_path / "data",
        "database_url": "postgresql+psycopg://u:p@db.example/lathe",
        "host": "0.0.0.0",
        "port": 9001,
        "dtype": "bfloat16",
        "device": "cuda:1",
        "engine": "thread",
        "ranks": 2,
        "max_lora_rank": 8,
        "long_poll_seconds": 2.5,
        "default_max_tokens": 17,
        "threads": 3,
        "microbatch_tokens": 512,
        "checkpoint_activations_above": 100,
        "kv_cache_tokens": 1024,
        "max_pending_samples": 9,
        "client_config": {"fwdbwd_max_chunk_len": 8, "x": [1, "y"]},
        "reap_seconds": 0.5,
        "deterministic": True,
        "compile": "off",
        "max_resident_adapters": 5,
        "session_timeout_seconds": 42.0,
        "dev": True,
        "jwt": True,
        "log_level": "debug",
        "limits": Limits(**{f.name: 1000 + i for i, f in enumerate(dataclasses.fields(Limits))}),
    }
    settings = Settings(**changed)
    default = Settings(models={"x": tmp_path})
    for f in dataclasses.fields(Settings):
        assert getattr(settings, f.name) != getattr(default, f.name), f.name
    assert settings_from_args(build_parser().parse_args(serve_argv(settings))) == settings
    # and with no flags, the defaults of Settings (the tiny model under the default data dir)
    plain = settings_from_args(build_parser().parse_args(["serve"]))
    assert plain == Settings(models=plain.models)
    assert list(plain.models) == ["tiny-qwen3"] and plain.data_dir == default_data_dir()


def test_serve_reports_invalid_settings_without_a_traceback(tmp_path):
    for args, message in (
        (("--max-lora-rank", "0"), "max_lora_rank must be at least 1"),
        (("--device", "gpu0"), "device must be cpu, cuda or cuda:N"),
        (("--long-poll-seconds", "50"), "long_poll_seconds must be in (0, 45)"),
        (("--limit", "max_num_samples=0"), "limit max_num_samples must be at least 1"),
    ):
        r = lathe("serve", "--data-dir", str(tmp_path), *args)
        assert r.returncode == 2 and r.stderr.startswith(f"lathe: {message}"), r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "models").exists()  # failed before building the tiny model

"""The `lathe` command line: make-tiny, serve's defaults and its argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import tinker

from lathe.local_server import LOCAL_API_KEY, LocalServer


def lathe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lathe", *args], capture_output=True, text=True, timeout=120
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

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

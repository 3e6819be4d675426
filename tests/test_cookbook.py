"""tinker-cookbook recipes, unedited, against a live `lathe serve`.

The recipes run in their own environment (`make .venv-cookbook/.installed`: tinker-cookbook
0.5.5 with tinker 0.38.0) as subprocesses, exactly as a user runs them. The tiny model is
served under a name the cookbook knows, so it picks the `qwen3_instruct` renderer and finds
the tokenizer in a Hugging Face cache laid out by `lathe models hf-cache`; everything is
offline.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lathe.local_server import LocalServer

ROOT = Path(__file__).resolve().parent.parent
COOKBOOK_PYTHON = ROOT / ".venv-cookbook" / "bin" / "python"
NAME = "Qwen/Qwen3-4B-Instruct-2507"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cookbook(tiny_qwen3, tmp_path_factory):
    """(server, env for the recipes, work folder)."""
    if not COOKBOOK_PYTHON.exists():
        pytest.fail("the cookbook environment is missing: run `make .venv-cookbook/.installed`")
    work = tmp_path_factory.mktemp("cookbook")
    hf_home = work / "hf"
    r = subprocess.run(
        [sys.executable, "-m", "lathe", "models", "hf-cache", "--model", str(tiny_qwen3)]
        + ["--name", NAME, "--cache-dir", str(hf_home / "hub")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TINKER_API_KEY": "tml-local",
        "TINKER_TELEMETRY": "0",
    }
    with LocalServer({NAME: tiny_qwen3}, work / "data") as srv:
        yield srv, env, work


def recipe(cookbook, module: str, **options) -> subprocess.CompletedProcess:
    srv, env, _ = cookbook
    args = [
        f"{k}={v}" for k, v in {"model_name": NAME, "base_url": srv.base_url, **options}.items()
    ]
    r = subprocess.run(
        [str(COOKBOOK_PYTHON), "-m", f"tinker_cookbook.recipes.{module}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def arithmetic_chats(path: Path, n: int = 512) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            x, y = rng.randrange(50), rng.randrange(50)
            messages = [
                {"role": "user", "content": f"What is {x} + {y}?"},
                {"role": "assistant", "content": str(x + y)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


SFT_OPTIONS = {
    "learning_rate": 3e-3,
    "lora_rank": 8,
    "batch_size": 32,
    "max_length": 64,
    "eval_every": 0,
    "save_every": 5,
}


@pytest.fixture(scope="module")
def sft_run(cookbook) -> Path:
    """The chat SFT recipe on 512 generated chats (16 steps); its log folder."""
    work = cookbook[2]
    data = arithmetic_chats(work / "arithmetic.jsonl")
    log = work / "sft"
    recipe(
        cookbook,
        "chat_sl.train",
        dataset=data,
        log_path=log,
        behavior_if_log_dir_exists="delete",
        **SFT_OPTIONS,
    )
    return log


def test_chat_sft_learns_and_writes_checkpoint_records(sft_run):
    steps = jsonl(sft_run / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(16))
    first = sum(s["train_mean_nll"] for s in steps[:2]) / 2
    last = sum(s["train_mean_nll"] for s in steps[-2:]) / 2
    assert last < first - 1.0, (first, last)  # random weights start near ln(512) = 6.2
    records = jsonl(sft_run / "checkpoints.jsonl")
    assert [r["name"] for r in records] == ["000005", "000010", "000015", "final"]
    assert all(r["state_path"].startswith("tinker://") for r in records)


def test_chat_sft_resumes_from_its_last_record(cookbook, sft_run):
    """Without the final record, a rerun resumes from the step-15 record's state (weights and
    Adam moments) and runs batch 15 again. The recipe writes a record after it has submitted
    that record's batch, so the saved weights already include batch 15: the rerun's loss on it
    must be the saved state's loss on that batch, which a separate client measures."""
    records = jsonl(sft_run / "checkpoints.jsonl")
    (sft_run / "checkpoints.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records if r["name"] != "final")
    )
    data = cookbook[2] / "arithmetic.jsonl"
    r = recipe(
        cookbook,
        "chat_sl.train",
        dataset=data,
        log_path=sft_run,
        behavior_if_log_dir_exists="resume",
        **SFT_OPTIONS,
    )
    state = records[2]["state_path"]
    assert f"Resumed training from {state}" in r.stdout + r.stderr
    replayed = jsonl(sft_run / "metrics.jsonl")[16:]
    assert [s["step"] for s in replayed] == [15]
    assert jsonl(sft_run / "checkpoints.jsonl")[-1]["name"] == "final"
    srv, env, _ = cookbook
    script = ROOT / "tests" / "scripts" / "cookbook_batch_nll.py"
    options = [str(SFT_OPTIONS["batch_size"]), str(SFT_OPTIONS["max_length"]), state, "15"]
    measured = subprocess.run(
        [str(COOKBOOK_PYTHON), str(script), srv.base_url, NAME, str(data), *options],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert measured.returncode == 0, measured.stderr[-3000:]
    expected = float(measured.stdout.split()[-1])
    assert replayed[0]["train_mean_nll"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss_fn", [None, "ppo"], ids=["default-loss", "ppo"])
def test_math_rl_warm_started_from_sft(cookbook, sft_run, loss_fn):
    """RL on the arithmetic environment from the SFT weights: the sampler's logprobs and the
    trainer's agree (the KL between them the recipe logs stays tiny)."""
    final = next(r for r in jsonl(sft_run / "checkpoints.jsonl") if r["name"] == "final")
    log = cookbook[2] / f"rl-{loss_fn or 'default'}"
    recipe(
        cookbook,
        "math_rl.train",
        env="arithmetic",
        load_checkpoint_path=final["state_path"],
        log_path=log,
        learning_rate=1e-3,
        lora_rank=8,
        group_size=4,
        groups_per_batch=8,
        max_tokens=5,
        max_steps=3,
        eval_every=0,
        save_every=0,
        behavior_if_log_dir_exists="delete",
        **({"loss_fn": loss_fn} if loss_fn else {}),
    )
    steps = jsonl(log / "metrics.jsonl")
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert abs(s["optim/kl_sample_train_v1"]) < 0.01
        assert abs(s["optim/kl_sample_train_v2"]) < 0.01


def hh_rlhf_style(path: Path, n: int, seed: int) -> str:
    """Preference pairs in the format of Anthropic/hh-rlhf: the chosen reply is the sum, the
    rejected one a refusal."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            x, y = rng.randrange(50), rng.randrange(50)
            prompt = f"\n\nHuman: What is {x} + {y}?\n\nAssistant: "
            pair = {"chosen": prompt + str(x + y), "rejected": prompt + "I do not know."}
            f.write(json.dumps(pair) + "\n")
    return str(path)


def test_dpo_with_its_hub_dataset_served_from_local_files(cookbook):
    """The DPO recipe (forward_backward_custom against a reference snapshot) reads
    `Anthropic/hh-rlhf` by hub name only: a test-only wrapper answers that name from local
    files. At step 0 the policy is its reference, so the loss is exactly ln 2."""
    srv, env, work = cookbook
    local = {
        "Anthropic/hh-rlhf": {
            "train": hh_rlhf_style(work / "hh-train.jsonl", 256, seed=1),
            "test": hh_rlhf_style(work / "hh-test.jsonl", 16, seed=2),
        }
    }
    log = work / "dpo"
    options = {
        "model_name": NAME,
        "base_url": srv.base_url,
        "dataset": "hhh",
        "log_path": log,
        "behavior_if_log_dir_exists": "delete",
        "learning_rate": 1e-2,
        "batch_size": 16,
        "max_length": 64,
        "max_steps": 10,
    }
    wrapper = ROOT / "tests" / "scripts" / "offline_hub_datasets.py"
    r = subprocess.run(
        [str(COOKBOOK_PYTHON), str(wrapper), "tinker_cookbook.recipes.preference.dpo.train"]
        + [f"{k}={v}" for k, v in options.items()],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "OFFLINE_DATASETS": json.dumps(local)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    steps = jsonl(log / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(10))
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(steps[0]["margin"]) < 1e-4
    assert steps[-1]["dpo_loss"] < 0.2 and steps[-1]["accuracy"] == 1.0
    assert jsonl(log / "checkpoints.jsonl")[-1]["name"] == "final"

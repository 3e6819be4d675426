"""tinker-cookbook recipes, unedited, against a live `lathe serve`.

Each cookbook release runs in its own environment (`make .venv-cookbook/.installed` for
0.5.5, `make .venv-cookbook061/.installed` for 0.6.1, both with tinker 0.38.0), its recipes as
subprocesses, exactly as a user runs them. Every test below runs once per release. The tiny
model is served under a name the cookbook knows, so it picks the `qwen3_instruct` renderer and
finds the tokenizer in a Hugging Face cache laid out by `lathe models hf-cache`; everything is
offline.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lathe.local_server import LocalServer

ROOT = Path(__file__).resolve().parent.parent
COOKBOOK_VENVS = {"0.5.5": ROOT / ".venv-cookbook", "0.6.1": ROOT / ".venv-cookbook061"}
NAME = "Qwen/Qwen3-4B-Instruct-2507"

pytestmark = pytest.mark.slow


@dataclass
class Cookbook:
    version: str
    python: Path
    server: LocalServer
    env: dict[str, str]
    work: Path

    def run(
        self, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.python), *args],
            capture_output=True,
            text=True,
            timeout=600,
            env={**self.env, **(env or {})},
        )


@pytest.fixture(scope="module", params=list(COOKBOOK_VENVS))
def cookbook(request, tiny_qwen3, tmp_path_factory):
    version = request.param
    python = COOKBOOK_VENVS[version] / "bin" / "python"
    if not python.exists():
        venv = COOKBOOK_VENVS[version].name
        pytest.fail(f"the cookbook {version} environment is missing: run `make {venv}/.installed`")
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
        yield Cookbook(version, python, srv, env, work)


def options(cookbook: Cookbook, **values) -> list[str]:
    values = {"model_name": NAME, "base_url": cookbook.server.base_url, **values}
    return [f"{k}={v}" for k, v in values.items()]


def recipe(
    cookbook: Cookbook, module: str, offline_datasets: dict | None = None, **values
) -> subprocess.CompletedProcess:
    """Runs `python -m tinker_cookbook.recipes.MODULE key=value...`; asserts it exits 0.
    With `offline_datasets`, hub datasets of those names are answered from local files."""
    module = f"tinker_cookbook.recipes.{module}"
    if offline_datasets is None:
        r = cookbook.run(["-m", module, *options(cookbook, **values)])
    else:
        wrapper = ROOT / "tests" / "scripts" / "offline_hub_datasets.py"
        r = cookbook.run(
            [str(wrapper), module, *options(cookbook, **values)],
            env={"OFFLINE_DATASETS": json.dumps(offline_datasets)},
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
    work = cookbook.work
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
    data = cookbook.work / "arithmetic.jsonl"
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
    # 0.5.5 appends the replayed step; 0.6.1 first drops the rows from the resume step on.
    steps = jsonl(sft_run / "metrics.jsonl")
    replays = [15] if cookbook.version == "0.5.5" else []
    assert [s["step"] for s in steps] == list(range(16)) + replays
    replayed = steps[-1:]
    assert jsonl(sft_run / "checkpoints.jsonl")[-1]["name"] == "final"
    script = ROOT / "tests" / "scripts" / "cookbook_batch_nll.py"
    shape = [str(SFT_OPTIONS["batch_size"]), str(SFT_OPTIONS["max_length"]), state, "15"]
    measured = cookbook.run([str(script), cookbook.server.base_url, NAME, str(data), *shape])
    assert measured.returncode == 0, measured.stderr[-3000:]
    expected = float(measured.stdout.split()[-1])
    assert replayed[0]["train_mean_nll"] == pytest.approx(expected, rel=1e-5)


MATH_RL_OPTIONS = {
    "env": "arithmetic",
    "learning_rate": 1e-3,
    "lora_rank": 8,
    "group_size": 4,
    "groups_per_batch": 8,
    "max_tokens": 5,
    "eval_every": 0,
    "save_every": 0,
    "behavior_if_log_dir_exists": "delete",
}


def final_record(sft_run: Path) -> dict:
    return next(r for r in jsonl(sft_run / "checkpoints.jsonl") if r["name"] == "final")


@pytest.mark.parametrize("loss", ["default", "ppo"])
def test_math_rl_warm_started_from_sft(cookbook, sft_run, loss):
    """RL on the arithmetic environment from the SFT weights: the sampler's logprobs and the
    trainer's agree (the KL between them the recipe logs stays tiny). 0.6.1's default loss,
    stable_reinforce, is not served (see the next test); its run names importance_sampling,
    0.5.5's default."""
    if loss == "default":
        loss_fn = {} if cookbook.version == "0.5.5" else {"loss_fn": "importance_sampling"}
    else:
        loss_fn = {"loss_fn": loss}
    log = cookbook.work / f"rl-{loss}"
    recipe(
        cookbook,
        "math_rl.train",
        load_checkpoint_path=final_record(sft_run)["state_path"],
        log_path=log,
        max_steps=3,
        **MATH_RL_OPTIONS,
        **loss_fn,
    )
    # 0.6.1 ends the log with a row of token totals alone.
    steps = [s for s in jsonl(log / "metrics.jsonl") if "optim/kl_sample_train_v1" in s]
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert abs(s["optim/kl_sample_train_v1"]) < 0.01
        assert abs(s["optim/kl_sample_train_v2"]) < 0.01


def test_math_rl_with_its_default_stable_reinforce_is_refused_clearly(cookbook):
    """0.6.1 defaults to stable_reinforce, whose objective Tinker has not published; the run
    stops at its first sampler with a message that says so and names the served losses."""
    if cookbook.version == "0.5.5":
        pytest.skip("0.5.5 defaults to importance_sampling")
    args = options(cookbook, log_path=cookbook.work / "rl-refused", max_steps=1, **MATH_RL_OPTIONS)
    r = cookbook.run(["-m", "tinker_cookbook.recipes.math_rl.train", *args])
    assert r.returncode != 0
    assert "stable_reinforce" in r.stderr and "importance_sampling" in r.stderr, r.stderr[-3000:]


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
    work = cookbook.work
    local = {
        "Anthropic/hh-rlhf": {
            "train": hh_rlhf_style(work / "hh-train.jsonl", 256, seed=1),
            "test": hh_rlhf_style(work / "hh-test.jsonl", 16, seed=2),
        }
    }
    log = work / "dpo"
    recipe(
        cookbook,
        "preference.dpo.train",
        offline_datasets=local,
        dataset="hhh",
        log_path=log,
        behavior_if_log_dir_exists="delete",
        learning_rate=1e-2,
        batch_size=16,
        max_length=64,
        max_steps=10,
    )
    steps = jsonl(log / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(10))
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(steps[0]["margin"]) < 1e-4
    assert steps[-1]["dpo_loss"] < 0.2 and steps[-1]["accuracy"] == 1.0
    assert jsonl(log / "checkpoints.jsonl")[-1]["name"] == "final"


def gsm8k_style(path: Path, n: int) -> str:
    """Questions in the format of openai/gsm8k: the answer ends with `#### N`."""
    rng = random.Random(3)
    with path.open("w") as f:
        for _ in range(n):
            x, y = rng.randrange(50), rng.randrange(50)
            row = {
                "question": f"What is {x} + {y}?",
                "answer": f"{x} + {y} = {x + y}\n#### {x + y}",
            }
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_rl_loop_with_gsm8k_served_from_local_files(cookbook):
    """The minimal RL loop samples groups for GSM8K-style questions and trains on those whose
    rewards differ. The random tiny model earns no reward, so here it shows the loop's sampling
    and bookkeeping run unedited; the learning side of RL is math_rl's test above."""
    work = cookbook.work
    log = work / "rl-loop"
    recipe(
        cookbook,
        "rl_loop",
        offline_datasets={"openai/gsm8k": {"train": gsm8k_style(work / "gsm8k.jsonl", 16)}},
        log_path=log,
        batch_size=4,
        group_size=2,
        max_tokens=8,
        lora_rank=8,
        save_every=0,
        max_steps=2,
        # 0.6.1 defaults to stable_reinforce, not served; 0.5.5 has only importance_sampling.
        **({"loss_fn": "importance_sampling"} if cookbook.version == "0.6.1" else {}),
    )
    steps = jsonl(log / "metrics.jsonl")
    assert [s["step"] for s in steps] == [0, 1]
    assert all(s["reward/total"] == 0.0 for s in steps)


def test_on_policy_distillation_from_the_sft_teacher(cookbook, sft_run):
    """A fresh student distils the SFT run's final sampler weights (the teacher) on its own
    samples of DeepMath-style prompts (answered from local files); the reverse KL to the teacher
    the recipe logs falls."""
    work = cookbook.work
    prompts = work / "deepmath.jsonl"
    rng = random.Random(4)
    prompts.write_text(
        "".join(
            json.dumps({"question": f"What is {rng.randrange(50)} + {rng.randrange(50)}?"}) + "\n"
            for _ in range(256)
        )
    )
    log = work / "distillation"
    recipe(
        cookbook,
        "distillation.on_policy_distillation",
        offline_datasets={"zwhe99/DeepMath-103K": {"train": str(prompts)}},
        teacher_model=NAME,
        teacher_checkpoint=final_record(sft_run)["sampler_path"],
        log_path=log,
        behavior_if_log_dir_exists="delete",
        learning_rate=1e-2,
        lora_rank=8,
        group_size=4,
        groups_per_batch=32,
        max_tokens=6,
        eval_every=0,
        save_every=0,
        max_steps=8,
    )
    steps = [s for s in jsonl(log / "metrics.jsonl") if "teacher_kl" in s]
    assert [s["step"] for s in steps] == list(range(8))
    kl = [s["teacher_kl"] for s in steps]
    assert sum(kl[-2:]) < 0.8 * sum(kl[:2]), kl

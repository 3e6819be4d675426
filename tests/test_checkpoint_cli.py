"""`lathe checkpoint list | info | download | delete | merge | import` on a live data dir."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import peft
import pytest
import tinker
import torch
import transformers
from tinker import types

from lathe.local_server import LocalServer

from conftest import API_KEY

BASE = "tiny-qwen3"
DATUM = types.Datum(
    model_input=types.ModelInput.from_ints([5, 9, 13, 21, 34, 55]),
    loss_fn_inputs={"target_tokens": [9, 13, 21, 34, 55, 89]},
)


def lathe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lathe", *args], capture_output=True, text=True, timeout=120
    )


def hf_logprobs(model, datum: types.Datum) -> np.ndarray:
    ids = torch.tensor([datum.model_input.to_ints()])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].tolist())
    return logp.gather(-1, targets[:, None])[:, 0].numpy()


@pytest.fixture(scope="module")
def live(tiny_qwen3, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with LocalServer({BASE: tiny_qwen3}, data, "--long-poll-seconds", "2") as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY) as sc:
            yield srv, sc, data


def test_list_info_download_merge_delete(live, tiny_qwen3, tmp_path):
    srv, sc, data = live
    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=2).result()
    for _ in range(3):
        tc.forward_backward([DATUM], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    path = tc.save_state("cli").result().path
    ours = np.asarray(
        tc.forward([DATUM], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    )
    d = ("--data-dir", str(data))

    r = lathe("checkpoint", "list", *d)
    assert r.returncode == 0 and path in r.stdout
    r = lathe("checkpoint", "list", "--run", tc.model_id, *d)
    assert path in r.stdout
    info = json.loads(lathe("checkpoint", "info", path, *d).stdout)
    assert info["base_model"] == BASE and info["lora"]["rank"] == 4
    assert info["has_optimizer"] and info["damaged_files"] == []

    out = tmp_path / "peft"
    assert lathe("checkpoint", "download", path, "--out", str(out), *d).returncode == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    model = peft.PeftModel.from_pretrained(hf, out).eval()
    np.testing.assert_allclose(hf_logprobs(model, DATUM), ours, atol=1e-4)

    merged = tmp_path / "merged"
    r = lathe("checkpoint", "merge", path, "--out", str(merged), *d)
    assert r.returncode == 0, r.stderr
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    np.testing.assert_allclose(hf_logprobs(plain, DATUM), ours, atol=1e-4)
    r = lathe("checkpoint", "merge", path, "--out", str(merged), *d)
    assert r.returncode == 2 and "lathe:" in r.stderr  # will not overwrite

    assert lathe("checkpoint", "delete", path, *d).returncode == 0
    assert path not in lathe("checkpoint", "list", *d).stdout
    with pytest.raises(tinker.NotFoundError):
        sc.create_training_client_from_state(path).result()
    r = lathe("checkpoint", "info", path, *d)
    assert r.returncode == 2 and "not found" in r.stderr
    r = lathe("checkpoint", "info", "tinker://bad", *d)
    assert r.returncode == 2 and "invalid path" in r.stderr


def test_import_an_outside_peft_adapter(live, tiny_qwen3, tmp_path):
    srv, sc, data = live
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same adapter always
    outside = peft.get_peft_model(hf, cfg)
    with torch.no_grad():  # a trained-looking adapter, not peft's zero-initialised B
        for name, p in outside.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    outside.save_pretrained(tmp_path / "outside")
    expected = hf_logprobs(outside.eval(), DATUM)

    r = lathe(
        "checkpoint",
        "import",
        str(tmp_path / "outside"),
        "--base",
        f"{BASE}={tiny_qwen3}",
        "--name",
        "from-peft",
        "--data-dir",
        str(data),
    )
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert path.startswith("tinker://") and path.endswith("/weights/from-peft")

    sampler = sc.create_sampling_client(model_path=path).result()
    full = DATUM.model_input.to_ints() + [DATUM.loss_fn_inputs["target_tokens"].tolist()[-1]]
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    np.testing.assert_allclose(scored[1:], expected, atol=1e-4)
    tc = sc.create_training_client_from_state(path).result()
    assert tc.get_info().lora_rank == 8
    before = tc.forward_backward([DATUM], "cross_entropy").result().metrics["loss:sum"]
    tc.optim_step(types.AdamParams(learning_rate=0.005)).result()
    assert tc.forward([DATUM], "cross_entropy").result().metrics["loss:sum"] < before

    partial = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen3),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    partial.save_pretrained(tmp_path / "partial")
    r = lathe(
        "checkpoint",
        "import",
        str(tmp_path / "partial"),
        "--base",
        f"{BASE}={tiny_qwen3}",
        "--data-dir",
        str(data),
    )
    assert r.returncode == 2 and "cannot import" in r.stderr

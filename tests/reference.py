"""Independent references for numerical tests: transformers + peft with copied adapter values."""

import peft
import torch
import transformers

from lathe.engine.runner import Runner, load_base_model
from lathe.protocol import messages as m
from lathe.protocol.messages import LoraConfig

RANK = 4


def save_hf_qwen3(path):
    """A tiny random Qwen3 written by transformers itself (untied, vocab 128)."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def reference_logprobs(model, tokens, targets):
    """Per-token log p(target) of the reference model, with autograd: (N,) or (N, K)."""
    logits = model(torch.tensor([tokens])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    t = torch.as_tensor(targets)
    return logp.gather(-1, t.reshape(len(tokens), -1)).reshape(t.shape)


def grads_of(adapter):
    return {(n, k): t.grad for n, k, t in adapter.named_tensors()}


def make_runner(folder, seed=0, lora=None, compiled=False):
    """A runner with model s:train:0 whose B matrices are random (so A gets gradients too).

    compiled: the base model's elementwise parts compiled (models/fused.py)."""
    base = load_base_model("tiny", folder, torch.float32, "cpu", compiled)
    runner = Runner({"tiny": base})
    lora = lora or LoraConfig(rank=RANK)
    req = m.CreateModelRequest("s:train:0", "tiny", lora, seed=seed)
    assert runner.run_one(m.Work("r0", req)).error is None
    adapter = runner.models["s:train:0"].adapter
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B starts at zero; make it non-zero so A gets gradients too
        for b in adapter.b.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return runner, adapter


def make_reference(folder, adapter):
    """peft model holding the adapter's values, and its LoRA parameters by (module, kind)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    targets = sorted({name.rsplit(".", 1)[-1] for name in adapter.a})
    cfg = peft.LoraConfig(
        r=adapter.config.rank, lora_alpha=32, target_modules=targets, lora_dropout=0.0
    )
    model = peft.get_peft_model(hf, cfg)
    params = {}
    with torch.no_grad():
        for name, kind, t in adapter.named_tensors():
            p = model.get_parameter(f"base_model.model.{name}.{kind}.default.weight")
            p.copy_(t)
            params[(name, kind)] = p
    return model, params


def assert_rel_close(got, expected, tol=1e-5):
    """Relative error in norm: fp32 summation order differs between implementations."""
    err = float((got - expected).norm() / expected.norm())
    assert err < tol, f"relative error {err:.2e}"

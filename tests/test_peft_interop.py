"""lathe checkpoints and PEFT adapters interoperate, and merged models compute the same logits.

* lathe checkpoints load with `peft.PeftModel.from_pretrained` and give lathe's logits;
* `merge_checkpoint` folders load with plain transformers and give lathe's logits;
* adapters created by peft itself import with `read_peft_adapter`, give peft's logits and train;
* adapters lathe cannot represent exactly are refused with a ValueError naming the problem.

Every adapter has random non-zero B matrices (a fresh LoRA has B = 0 and would make every
comparison trivially pass), and each comparison also checks that the adapter changes the logits.

Tied embeddings + an adapted lm_head (peft 0.21.2, transformers 5.24): peft warns but computes
it as lathe does (delta on the logits only, input embedding untouched); its `save_pretrained`
also stores the full lm_head base matrix; `ensure_weight_tying=True` moves the adapter onto
embed_tokens as well (refused by lathe); and peft's `merge_and_unload` changes the shared
embedding too, which `merge_checkpoint` avoids. The tests below pin each of these.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lathe.engine import checkpoint_io
from lathe.engine.merge import merge_checkpoint
from lathe.engine.peft_io import read_peft_adapter
from lathe.engine.runner import BaseModel, load_base_model
from lathe.models.loading import load_model, load_state_dict
from lathe.models.lora import (
    Adapter,
    LoraConfig,
    lora_shapes,
    new_adapter,
    use_adapters,
    whole_batch,
)
from lathe.testing.tiny_models import TinyModelSpec, make_tiny

ATOL = 1e-4
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIE_WARNING = "tie_word_embeddings=True` and a tied layer is part of the adapter"
MODELS = ["qwen3-tied", "qwen3-untied", "llama-tied"]


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tiny_qwen3, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interop-models")
    return {
        "qwen3-tied": tiny_qwen3,
        "qwen3-untied": make_tiny(
            root / "qwen3-untied", TinyModelSpec(tie_word_embeddings=False, seed=1)
        ),
        "llama-tied": make_tiny(root / "llama-tied", TinyModelSpec(family="llama", seed=2)),
    }


def load_ours(folder: Path) -> BaseModel:
    return load_base_model("tiny", folder, torch.float32, "cpu")


def random_adapter(base: BaseModel, config: LoraConfig, seed: int = 0) -> Adapter:
    adapter = new_adapter(base.module, config, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in adapter.b.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return adapter


def token_ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(seed))


def our_logits(base: BaseModel, adapter: Adapter | None, ids: torch.Tensor) -> torch.Tensor:
    with use_adapters(whole_batch(adapter)):
        return base.module(ids)


def hf_model(folder: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def assert_logits_match(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> None:
    """Equal within ATOL, and the adapter visibly moved the logits (the test is not vacuous)."""
    assert float((expected - base).abs().max()) > 0.1, "the adapter does not change the logits"
    diff = float((got - expected).abs().max())
    assert diff < ATOL, f"max logit difference {diff:.2e}"


def write_lathe_checkpoint(
    folder: Path, out: Path, train_unembed: bool
) -> tuple[BaseModel, Adapter]:
    base = load_ours(folder)
    adapter = random_adapter(base, LoraConfig(rank=4, train_unembed=train_unembed))
    checkpoint_io.write_checkpoint(out, adapter, "tiny", {})
    return base, adapter


def make_peft_folder(
    folder: Path, out: Path, targets: list[str], safe_serialization: bool = True, **lora_kwargs
) -> peft.PeftModel:
    """An adapter made and saved by peft itself, with random B; returns the peft model too."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, **lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-lm_head warning, checked elsewhere
        model = peft.get_peft_model(hf_model(folder), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
        model.save_pretrained(out, safe_serialization=safe_serialization)
    return model


# --- a. lathe checkpoints load in peft ------------------------------------------------------


@pytest.mark.parametrize("train_unembed", [True, False], ids=["lm_head", "no-lm_head"])
@pytest.mark.parametrize("model", MODELS)
def test_lathe_checkpoint_loads_in_peft(folders, tmp_path, model, train_unembed):
    folder = folders[model]
    base, adapter = write_lathe_checkpoint(folder, tmp_path / "ck", train_unembed)
    hf = hf_model(folder)
    embedding = hf.model.embed_tokens.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = peft.PeftModel.from_pretrained(hf, tmp_path / "ck").eval()
    ids = token_ids()
    with torch.no_grad():
        assert_logits_match(
            our_logits(base, adapter, ids), reference(ids).logits, our_logits(base, None, ids)
        )
    # peft warns about an adapter on a tied lm_head, but computes it as lathe does: the
    # delta is added to the logits only and the (shared) input embedding is untouched.
    tied_head = model.endswith("-tied") and train_unembed
    assert any(TIE_WARNING in str(w.message) for w in caught) == tied_head
    torch.testing.assert_close(reference.get_input_embeddings().weight, embedding)


# --- b. merged folders load in plain transformers -------------------------------------------


@pytest.mark.parametrize("train_unembed", [True, False], ids=["lm_head", "no-lm_head"])
@pytest.mark.parametrize("model", MODELS)
def test_merged_checkpoint_loads_in_transformers(folders, tmp_path, model, train_unembed):
    folder = folders[model]
    base, adapter = write_lathe_checkpoint(folder, tmp_path / "ck", train_unembed)
    out = merge_checkpoint(folder, tmp_path / "ck", tmp_path / "merged")
    ids = token_ids()
    with torch.no_grad():
        expected = our_logits(base, adapter, ids)
        assert_logits_match(hf_model(out)(ids).logits, expected, our_logits(base, None, ids))
        # lathe itself serves the merged folder as a plain base model with the same logits
        assert_logits_match(load_model(out).module(ids), expected, our_logits(base, None, ids))

    base_config = json.loads((folder / "config.json").read_text())
    merged_config = json.loads((out / "config.json").read_text())
    untied_now = base_config["tie_word_embeddings"] and train_unembed
    if untied_now:  # lm_head has weights of its own now
        base_config["tie_word_embeddings"] = False
    assert merged_config == base_config
    base_weights, merged_weights = load_state_dict(folder), load_state_dict(out)
    extra = {"lm_head.weight"} if untied_now else set()
    assert set(merged_weights) == set(base_weights) | extra  # the base's key names, kept
    # The input embedding is never changed, even when lm_head shared it.
    assert torch.equal(
        merged_weights["model.embed_tokens.weight"], base_weights["model.embed_tokens.weight"]
    )
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()


def test_merge_sharded_bf16_base(folders, tmp_path):
    """A sharded bf16 base (written by transformers): shard names, key names and dtype are
    kept, lm_head goes into the embedding's shard and the index, and every merged weight is
    W + scale * (B @ A) in fp32, rounded once to bf16."""
    folder = folders["qwen3-tied"]
    base_dir = tmp_path / "bf16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    hf.save_pretrained(base_dir, max_shard_size="100KB")
    _, adapter = write_lathe_checkpoint(folder, tmp_path / "ck", True)
    out = merge_checkpoint(base_dir, tmp_path / "ck", tmp_path / "merged")

    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["lm_head.weight"] == index["model.embed_tokens.weight"]
    base_weights, merged_weights = load_state_dict(base_dir), load_state_dict(out)
    assert set(merged_weights) == set(base_weights) | {"lm_head.weight"}
    for name in adapter.a:
        source = "model.embed_tokens.weight" if name == "lm_head" else f"{name}.weight"
        delta = adapter.config.scale * (adapter.b[name] @ adapter.a[name]).detach()
        expected = (base_weights[source].float() + delta).to(torch.bfloat16)
        assert torch.equal(merged_weights[f"{name}.weight"], expected), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight.to(torch.bfloat16), merged_weights["lm_head.weight"])


def test_merge_refuses_non_empty_out_dir_and_leaves_no_temp(folders, tmp_path):
    folder = folders["qwen3-tied"]
    write_lathe_checkpoint(folder, tmp_path / "ck", True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        merge_checkpoint(folder, tmp_path / "ck", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine: it is replaced atomically
    merge_checkpoint(folder, tmp_path / "ck", tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "empty", "out"]


def test_peft_merge_and_unload_changes_tied_embedding(folders, tmp_path):
    """Why merge_checkpoint unties: peft 0.21.2's own merge of an lm_head adapter on a tied
    model adds the delta to the shared matrix, so the input embedding changes too and the
    merged model's logits are wrong. (If this starts failing after a peft upgrade, peft has
    fixed it; the rest of this file does not depend on it.)"""
    folder = folders["qwen3-tied"]
    base, adapter = write_lathe_checkpoint(folder, tmp_path / "ck", True)
    hf = hf_model(folder)
    embedding = hf.model.embed_tokens.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft.PeftModel.from_pretrained(hf, tmp_path / "ck").merge_and_unload()
    ids = token_ids()
    with torch.no_grad():
        diff = float((merged(ids).logits - our_logits(base, adapter, ids)).abs().max())
    assert not torch.equal(merged.get_input_embeddings().weight, embedding)
    assert diff > 0.1


# --- c. adapters made by peft import into lathe ---------------------------------------------


@pytest.mark.parametrize(
    ("model", "with_lm_head", "safetensors"),
    [("qwen3-tied", True, True), ("qwen3-untied", True, False), ("llama-tied", False, True)],
    ids=["qwen3-tied-lm_head-safetensors", "qwen3-untied-lm_head-bin", "llama-safetensors"],
)
def test_peft_adapter_imports(folders, tmp_path, model, with_lm_head, safetensors):
    folder = folders[model]
    targets = PROJECTIONS + (["lm_head"] if with_lm_head else [])
    reference = make_peft_folder(folder, tmp_path / "peft", targets, safetensors)
    weights_file = "adapter_model.safetensors" if safetensors else "adapter_model.bin"
    assert (tmp_path / "peft" / weights_file).is_file()

    base = load_ours(folder)
    adapter, base_name = read_peft_adapter(tmp_path / "peft", base.module)
    assert base_name == str(folder)  # peft records what the base was loaded from
    expected_config = LoraConfig(rank=8, train_unembed=with_lm_head, alpha=16.0)
    assert adapter.config == expected_config
    assert list(adapter.a) == list(lora_shapes(base.module, expected_config))
    for _, _, t in adapter.named_tensors():
        assert t.dtype == torch.float32 and t.is_leaf and t.requires_grad

    ids = token_ids()
    with torch.no_grad():
        expected, plain = reference(ids).logits, our_logits(base, None, ids)
    got = our_logits(base, adapter, ids)
    assert_logits_match(got.detach(), expected, plain)
    torch.log_softmax(got, -1)[..., 0].sum().backward()  # gradients reach the imported tensors
    for name, kind, t in adapter.named_tensors():
        assert t.grad is not None and float(t.grad.abs().max()) > 0, (name, kind)


def test_lathe_checkpoint_reads_as_peft_folder(folders, tmp_path):
    """A lathe checkpoint is a PEFT folder: read_peft_adapter gives back the same adapter."""
    base, adapter = write_lathe_checkpoint(folders["llama-tied"], tmp_path / "ck", True)
    again, base_name = read_peft_adapter(tmp_path / "ck", base.module)
    assert base_name == "tiny" and again.config == adapter.config
    assert list(again.a) == list(adapter.a)
    for (_, _, x), (_, _, y) in zip(adapter.named_tensors(), again.named_tensors(), strict=True):
        assert torch.equal(x, y)


def test_peft_adapter_keys_with_adapter_name(folders, tmp_path):
    """In-memory peft state dicts name the adapter (`lora_A.default.weight`); both spellings
    read the same."""
    folder = folders["qwen3-untied"]
    model = make_peft_folder(folder, tmp_path / "plain", PROJECTIONS)
    (tmp_path / "named").mkdir()
    shutil.copy(tmp_path / "plain" / "adapter_config.json", tmp_path / "named")
    named = {k: v.contiguous() for k, v in model.state_dict().items() if ".lora_" in k}
    assert all(".default.weight" in k for k in named)
    save_file(named, str(tmp_path / "named" / "adapter_model.safetensors"))

    base = load_ours(folder)
    plain, _ = read_peft_adapter(tmp_path / "plain", base.module)
    with_name, _ = read_peft_adapter(tmp_path / "named", base.module)
    assert list(plain.a) == list(with_name.a)
    for (_, _, x), (_, _, y) in zip(plain.named_tensors(), with_name.named_tensors(), strict=True):
        assert torch.equal(x, y)


def test_merge_accepts_a_peft_folder(folders, tmp_path):
    """merge_checkpoint also takes an outside PEFT folder (tied base, lm_head adapted)."""
    folder = folders["qwen3-tied"]
    reference = make_peft_folder(folder, tmp_path / "peft", PROJECTIONS + ["lm_head"])
    out = merge_checkpoint(folder, tmp_path / "peft", tmp_path / "merged")
    ids = token_ids()
    with torch.no_grad():
        plain = our_logits(load_ours(folder), None, ids)
        assert_logits_match(hf_model(out)(ids).logits, reference(ids).logits, plain)


# --- d. refusals ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_peft_folder(folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("valid-peft") / "adapter"
    make_peft_folder(folders["qwen3-tied"], out, PROJECTIONS + ["lm_head"])
    return out


@pytest.fixture(scope="module")
def tied_qwen3(folders) -> BaseModel:
    return load_ours(folders["qwen3-tied"])


def edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_rslora": True}, r"use_rslora=True: rsLoRA scales by alpha/sqrt\(r\)"),
        ({"peft_type": "IA3"}, "peft_type is 'IA3'; lathe reads LORA adapters only"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["score"]}, "modules_to_save"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"target_modules": ["q_proj", "c_attn"]}, r"\['c_attn'\] are not LoRA-capable"),
        ({"r": 4}, r"shape mismatch for model.layers.0.self_attn.q_proj"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_refuses_config(valid_peft_folder, tied_qwen3, tmp_path, changes, message):
    folder = edited_copy(valid_peft_folder, tmp_path / "edited", **changes)
    with pytest.raises(ValueError, match=message):
        read_peft_adapter(folder, tied_qwen3.module)


def test_refuses_dora(folders, tied_qwen3, tmp_path):
    make_peft_folder(folders["qwen3-tied"], tmp_path / "dora", PROJECTIONS, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True: DoRA adds a magnitude vector"):
        read_peft_adapter(tmp_path / "dora", tied_qwen3.module)


def test_refuses_partial_target_set(folders, tied_qwen3, tmp_path):
    make_peft_folder(folders["qwen3-tied"], tmp_path / "qv", ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"partial target set.*missing \['k_proj', 'o_proj'\]"):
        read_peft_adapter(tmp_path / "qv", tied_qwen3.module)


def test_refuses_layers_to_transform(folders, tied_qwen3, tmp_path):
    make_peft_folder(folders["qwen3-tied"], tmp_path / "l0", PROJECTIONS, layers_to_transform=[0])
    with pytest.raises(ValueError, match=r"partial target set.*model.layers.1"):
        read_peft_adapter(tmp_path / "l0", tied_qwen3.module)


def test_refuses_embedding_lora(folders, tied_qwen3, tmp_path):
    make_peft_folder(folders["qwen3-tied"], tmp_path / "emb", PROJECTIONS + ["embed_tokens"])
    with pytest.raises(ValueError, match=r"\['embed_tokens'\] are not LoRA-capable"):
        read_peft_adapter(tmp_path / "emb", tied_qwen3.module)


def test_refuses_ensure_weight_tying(folders, tied_qwen3, tmp_path):
    """With ensure_weight_tying peft also puts the lm_head adapter on embed_tokens."""
    make_peft_folder(
        folders["qwen3-tied"], tmp_path / "ewt", PROJECTIONS + ["lm_head"], ensure_weight_tying=True
    )
    weights = load_file(str(tmp_path / "ewt" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in weights
    with pytest.raises(ValueError, match="embed_tokens"):
        read_peft_adapter(tmp_path / "ewt", tied_qwen3.module)


def test_refuses_module_the_model_lacks(valid_peft_folder, tied_qwen3, tmp_path):
    folder = edited_copy(valid_peft_folder, tmp_path / "extra")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    for kind in ("lora_A", "lora_B"):  # a layer the 2-layer model does not have
        src = f"base_model.model.model.layers.0.self_attn.q_proj.{kind}.weight"
        weights[src.replace("layers.0", "layers.7")] = weights[src].clone()
    save_file(weights, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"not LoRA-capable linears of this model.*layers\.7"):
        read_peft_adapter(folder, tied_qwen3.module)


def test_refuses_different_base_weights(valid_peft_folder, tied_qwen3, tmp_path):
    """peft stores lm_head's base matrix next to its adapter; it must be this model's."""
    folder = edited_copy(valid_peft_folder, tmp_path / "resized")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in weights  # what save_embedding_layers="auto" writes for an lm_head target
    weights[key] = weights[key] + 0.01
    save_file(weights, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="stores its own 'lm_head.weight'"):
        read_peft_adapter(folder, tied_qwen3.module)

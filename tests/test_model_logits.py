"""Our model files reproduce transformers' logits on tiny random configs (fp32)."""

import pytest
import torch
import transformers

from lathe.models.loading import load_model
from lathe.sampling.kv_cache import KVPool, PackedAttention, Segment, SequenceKV

HF_CONFIGS = {
    "qwen3": lambda tied: transformers.Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # deliberately not hidden/heads, as in real Qwen3 checkpoints
        max_position_embeddings=512,
        tie_word_embeddings=tied,
    ),
    "llama": lambda tied: transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        rope_theta=500000.0,
        # A small original length so the llama3 frequency scaling changes some frequencies.
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def save_random_hf_model(family: str, tied: bool, path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family](tied))
    with torch.no_grad():  # norms start at one; randomise them so their use is tested too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path)
    return hf.eval()


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(family, tied, tmp_path):
    hf = save_random_hf_model(family, tied, tmp_path)
    ours = load_model(tmp_path).module
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_packed_cached_decoding_matches_full_forward(family, tmp_path):
    """Two sequences packed in one row, prefilled in chunks then decoded token by token,
    give the logits of plain full forwards."""
    save_random_hf_model(family, False, tmp_path)
    model = load_model(tmp_path).module
    seqs = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(seqs)
        cfg = model.config
        pool = KVPool(
            len(model.model.layers),
            8,
            cfg.num_key_value_heads,
            cfg.head_dim,
            torch.float32,
            torch.device("cpu"),
        )
        kvs = [SequenceKV(pool) for _ in range(2)]
        got = [[], []]
        # steps: (tokens of seq 0, tokens of seq 1) fed together
        for a, b in [(17, 5), (3, 12), *[(1, 1)] * 10]:
            parts, segments, positions, start = [], [], [], 0
            for i, n in enumerate((a, b)):
                kv = kvs[i]
                parts.append(seqs[i, kv.length : kv.length + n])
                positions += range(kv.length, kv.length + n)
                segments.append(Segment(kv, start, n))
                start += n
            ids = torch.cat(parts)[None]
            attention = PackedAttention(pool, segments, torch.device("cpu"))
            out = model(ids, torch.tensor([positions]), attention)[0]
            for i, seg in enumerate(segments):
                got[i].append(out[seg.start : seg.start + seg.n])
                seg.kv.advance(seg.n)
    for i in range(2):
        n = kvs[i].length
        torch.testing.assert_close(torch.cat(got[i]), full[i, :n], atol=1e-5, rtol=1e-5)

"""The official tinker SDK (0.38.0) against a live `lathe serve`: the quickstart loop."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from conftest import API_KEY

BASE = "tiny-qwen3"
TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun."


@pytest.fixture(scope="module")
def tokenizer(service):
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    return tc.get_tokenizer()


def make_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


def logprobs_of(result) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].tolist(), dtype=np.float64) for o in result.loss_fn_outputs]


def test_capabilities_list_the_served_model(service):
    caps = service.get_server_capabilities()
    names = [m.model_name for m in caps.supported_models]
    assert names == [BASE]


def test_training_loop_learns_samples_and_checkpoints(service, tokenizer, server):
    tc = service.create_lora_training_client(base_model=BASE, rank=8, seed=0).result()
    info = tc.get_info()
    assert info.model_data.model_name == BASE and info.lora_rank == 8
    batch = [make_datum(tokenizer, TEXT), make_datum(tokenizer, "Hello world! 12 + 30 = 42.")]

    losses = []
    for _ in range(12):
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b < a for a, b in zip(losses[:3], losses[1:4], strict=True)), losses

    # forward leaves the weights alone: the same loss before and after it
    before = tc.forward(batch, "cross_entropy").result()
    again = tc.forward(batch, "cross_entropy").result()
    assert before.metrics["loss:sum"] == again.metrics["loss:sum"]
    n_tokens = sum(d.model_input.length for d in batch)
    assert len(before.loss_fn_outputs) == 2
    assert sum(len(o["logprobs"].tolist()) for o in before.loss_fn_outputs) == n_tokens

    # sampling from the trained weights
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("The quick"))
    res = sampler.sample(
        prompt,
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=6, temperature=0.8, seed=3),
    ).result()
    assert len(res.sequences) == 2
    for seq in res.sequences:
        assert 1 <= len(seq.tokens) <= 6
        assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens)
        assert all(lp <= 0 for lp in seq.logprobs)
        assert seq.stop_reason in ("stop", "length")

    # the sampler and the trainer agree on the logprobs of the same tokens
    full = batch[0].model_input.to_ints() + [batch[0].loss_fn_inputs["target_tokens"].tolist()[-1]]
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    assert scored[0] is None
    np.testing.assert_allclose(np.array(scored[1:]), logprobs_of(before)[0], atol=1e-4)

    # save, restore with the optimizer: same loss and the same next step
    state_path = tc.save_state("after-12").result().path
    sampler_path = tc.save_weights_for_sampler("sampler-12").result().path
    assert state_path.endswith("/weights/after-12")
    assert sampler_path.endswith("/sampler_weights/sampler-12")
    restored = service.create_training_client_from_state_with_optimizer(state_path).result()
    assert restored.get_info().lora_rank == 8
    assert restored.forward(batch, "cross_entropy").result().metrics == before.metrics
    for client in (tc, restored):
        client.forward_backward(batch, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    next_tc = tc.forward(batch, "cross_entropy").result()
    next_restored = restored.forward(batch, "cross_entropy").result()
    assert next_tc.metrics["loss:sum"] != before.metrics["loss:sum"]
    for a, b in zip(logprobs_of(next_tc), logprobs_of(next_restored), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    # both checkpoints are listed
    rest = tinker.RestClient(base_url=server.base_url, api_key=API_KEY)
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {(c.checkpoint_id, c.checkpoint_type) for c in listed} == {
        ("weights/after-12", "training"),
        ("sampler_weights/sampler-12", "sampler"),
    }
    assert all(c.tinker_path in (state_path, sampler_path) and c.size_bytes > 0 for c in listed)

    # a sampler made from the named sampler checkpoint has the snapshot's weights
    from_path = service.create_sampling_client(model_path=sampler_path).result()
    assert from_path.compute_logprobs(types.ModelInput.from_ints(full)).result() == scored


def test_snapshot_does_not_change_after_more_training(service, tokenizer):
    tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=1).result()
    batch = [make_datum(tokenizer, TEXT)]
    prompt = types.ModelInput.from_ints(tokenizer.encode("The quick"))
    full = types.ModelInput.from_ints(tokenizer.encode(TEXT))
    for _ in range(2):
        tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    snap = tc.save_weights_and_get_sampling_client().result()
    scored_before = snap.compute_logprobs(full).result()
    for _ in range(3):
        tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    assert snap.compute_logprobs(full).result() == scored_before
    newer = tc.save_weights_and_get_sampling_client().result()
    assert newer.compute_logprobs(full).result() != scored_before
    assert snap.sample(prompt, 1, types.SamplingParams(max_tokens=3, temperature=0)).result()


def test_legacy_load_state_and_weights_only_restore(service, tokenizer):
    tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=2).result()
    batch = [make_datum(tokenizer, TEXT)]
    tc.forward_backward(batch, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    path = tc.save_state("one-step").result().path
    saved = tc.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    tc.forward_backward(batch, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    assert tc.forward(batch, "cross_entropy").result().metrics["loss:sum"] != saved
    tc.load_state(path).result()  # deprecated in the SDK, still served
    assert tc.forward(batch, "cross_entropy").result().metrics["loss:sum"] == saved
    weights_only = service.create_training_client_from_state(path).result()
    assert weights_only.forward(batch, "cross_entropy").result().metrics["loss:sum"] == saved


def test_seeded_models_start_identical(service, tokenizer):
    batch = [make_datum(tokenizer, TEXT)]
    hp = types.AdamParams(learning_rate=1e-2)
    losses = []
    for _ in range(2):
        tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=7).result()
        tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(hp).result()
        losses.append(tc.forward(batch, "cross_entropy").result().metrics["loss:sum"])
    assert losses[0] == losses[1]


def test_prompt_scoring_options(service, tokenizer):
    sampler = service.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(TEXT))
    full = sampler.compute_logprobs(prompt).result()
    last3 = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=3).result()
    assert last3[:-3] == [None] * (len(full) - 3)
    assert last3[-3:] == pytest.approx(full[-3:], abs=1e-6)
    # top-k prompt logprobs: row 0 has no context; the prompt token is never above the top-1
    res = sampler.sample(
        prompt,
        1,
        types.SamplingParams(max_tokens=2, temperature=0),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
        topk_sample_logprobs=2,
    ).result()
    topk = res.topk_prompt_logprobs
    assert topk[0] is None and len(topk) == len(full)
    for lp, row in zip(full[1:], topk[1:], strict=True):
        assert len(row) == 3 and row[0][1] >= lp - 1e-6
        assert [x[1] for x in row] == sorted((x[1] for x in row), reverse=True)
    seq = res.sequences[0]
    assert [row[0][0] for row in seq.topk_logprobs] == seq.tokens  # greedy picks the top-1
    # options not computed are refused with a clear message, never silently dropped
    with pytest.raises(tinker.BadRequestError, match="prompt_alt_tokens_k"):
        sampler.sample(
            prompt, 1, types.SamplingParams(max_tokens=1), prompt_alt_tokens_k=2
        ).result()

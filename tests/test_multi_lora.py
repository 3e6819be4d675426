"""The batched multi-adapter LoRA delta (models/multi_lora.py) against plain references:
per-group deltas, per-adapter gradients, untouched base rows and the frozen-stack cache."""

from __future__ import annotations

import pytest
import torch

from lathe.engine.runner import load_base_model
from lathe.models import lora_segments, lora_stacks, multi_lora
from lathe.models.lora import (
    ROW_BLOCK,
    Adapter,
    LoraConfig,
    LoraLinear,
    RowGroup,
    new_adapter,
    use_adapters,
    whole_batch,
)

T = 6  # tokens per sequence; a row group is one or more whole sequences


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    return load_base_model("tiny", tiny_qwen3, torch.float32, "cpu").module


def adapter(model, config: LoraConfig, seed: int) -> Adapter:
    """Random A and B (B = 0 would make every delta zero)."""
    ad = new_adapter(model, config, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for b in ad.b.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
    return ad


def mixed(model) -> list[Adapter]:
    """Ranks 4 and 8, and adapters that leave some modules untargeted."""
    return [
        adapter(model, LoraConfig(rank=4), 0),
        adapter(model, LoraConfig(rank=8, train_mlp=False, train_unembed=False), 1),
        adapter(model, LoraConfig(rank=4, alpha=7.0, train_attn=False), 2),
        adapter(model, LoraConfig(rank=8), 3),
    ]


def groups_of(owners: list[Adapter | None]) -> list[RowGroup]:
    """One group per sequence of T rows, sequence i using owners[i]."""
    return [RowGroup(i * T, (i + 1) * T, a) for i, a in enumerate(owners)]


def layers(model) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def reference_delta(module: LoraLinear, x: torch.Tensor, groups: list[RowGroup]) -> torch.Tensor:
    """Base output plus a loop over groups of x A^T B^T · scale."""
    y = module.base(x)
    for g in groups:
        if g.adapter is not None and module.name in g.adapter.a:
            a, b = g.adapter.a[module.name], g.adapter.b[module.name]
            rows = slice(g.start, g.stop)
            y[rows] = y[rows] + (x[rows] @ a.T @ b.T) * g.adapter.config.scale
    return y


# Which of mixed()'s adapters each sequence uses (None: the base model). In "one big", one
# adapter has most rows, so that its rows are cut into several segments.
ASSIGNMENTS = {
    "spread": [0, None, 1, 2, 0, 3, None, 1, 3],
    "one big": [0, 0, 0, 0, 0, 0, 1, None, 2, 3],
}


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
@pytest.mark.parametrize("row_invariant", [False, True])
def test_batched_delta_equals_a_per_group_loop(model, row_invariant, assignment):
    ads = [a.frozen_copy() for a in mixed(model)]
    owners = [None if i is None else ads[i] for i in ASSIGNMENTS[assignment]]
    groups = groups_of(owners)
    gen = torch.Generator().manual_seed(0)
    for module in layers(model):
        x = torch.randn(len(owners) * T, module.base.in_features, generator=gen)
        with torch.no_grad(), use_adapters(groups, row_invariant=row_invariant):
            got = module(x)
            ref = reference_delta(module, x, groups)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("row_invariant", [False, True])
def test_rows_are_planned_per_rank_and_padded_to_the_row_block(model, row_invariant):
    ads = mixed(model)
    block = ROW_BLOCK if row_invariant else 1
    groups = tuple(groups_of([ads[0], ads[1], None, ads[1]]))
    layout = multi_lora.RowPlan(groups, block).layout(4 * T, torch.device("cpu"))
    padded = lambda n: -(-n // block) * block  # noqa: E731

    # ranks 4 and 8: one batched op each; the base rows [2T, 3T) in neither
    attn = layout.buckets("model.layers.0.self_attn.q_proj")
    assert [(len(b.adapters), b.rows.shape) for b in attn] == [
        (1, (1, padded(T))),
        (1, (1, padded(2 * T))),
    ]
    assert set(attn[1].rows.index.tolist()) == set(range(T, 2 * T)) | set(range(3 * T, 4 * T))
    assert attn[1].rows.scale.view(-1).tolist() == [ads[1].config.scale] * (2 * T) + [0.0] * (
        padded(2 * T) - 2 * T
    )
    # ads[1] leaves the MLP out, so only ads[0] takes part there
    (mlp,) = layout.buckets("model.layers.0.mlp.up_proj")
    assert mlp.adapters == (ads[0],) and mlp.rows is attn[0].rows  # modules share row sets


def test_an_adapter_with_many_more_rows_is_cut_into_segments():
    assert lora_segments.segment_length([7, 7, 7], ROW_BLOCK) == 8  # equal: one segment each
    assert lora_segments.segment_length([40, 10, 10], 1) == 10  # 6 segments of 10, not 3 of 40
    rs = lora_segments.row_set([list(range(40)), list(range(40, 50))], [2.0, 0.5], 8, "cpu")
    assert rs.shape == (4, 16) and rs.owner.tolist() == [0, 0, 0, 1]
    assert rs.index.tolist() == [*range(40), *[32] * 8, *range(40, 50), *[40] * 6]
    assert rs.scale.view(-1).tolist() == [2.0] * 40 + [0.0] * 8 + [0.5] * 10 + [0.0] * 6


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_each_adapter_gets_the_gradients_of_its_rows_alone(model, assignment):
    ads = mixed(model)
    owners = [None if i is None else ads[i] for i in ASSIGNMENTS[assignment]]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (len(owners), T), generator=gen)
    weights = torch.randn(len(owners), T, model.config.vocab_size, generator=gen)

    def loss(rows: list[int]) -> torch.Tensor:  # a different weight on every logit
        return (model(ids[rows]) * weights[rows]).sum()

    params = [p for ad in ads for p in ad.parameters()]
    with use_adapters(groups_of(owners)):
        together = torch.autograd.grad(loss(list(range(len(owners)))), params)
    at = 0
    for ad in ads:
        with use_adapters(whole_batch(ad)):  # autograd through the plain single-adapter path
            alone = torch.autograd.grad(
                loss([i for i, o in enumerate(owners) if o is ad]), ad.parameters()
            )
        # Alone, the base model's matmuls have other shapes (fewer rows), so fp32 rounding
        # differs a little all along the backward pass: ~2e-6 of the largest entry.
        for got, ref in zip(together[at : at + len(alone)], alone, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
        at += len(alone)


@pytest.mark.parametrize("row_invariant", [False, True])
def test_base_rows_are_bitwise_the_base_models(model, row_invariant):
    ads = [a.frozen_copy() for a in mixed(model)]
    owners = [None, ads[0], ads[1], None, ads[2], ads[3], None]
    ids = torch.randint(0, 500, (len(owners), T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with use_adapters(groups_of(owners), row_invariant=row_invariant):
            mixed_logits = model(ids)
        with use_adapters(whole_batch(None), row_invariant=row_invariant):
            base_logits = model(ids)
    for i, owner in enumerate(owners):
        if owner is None:
            assert torch.equal(mixed_logits[i], base_logits[i])
        else:
            assert not torch.equal(mixed_logits[i], base_logits[i])


def run(model, ids, owners) -> torch.Tensor:
    with torch.no_grad(), use_adapters(groups_of(owners), row_invariant=True):
        return model(ids)


def alone(model, ids, owners) -> torch.Tensor:
    """Each sequence with its own adapter, one at a time (no batched delta, no cache)."""
    rows = []
    for i, owner in enumerate(owners):
        with torch.no_grad(), use_adapters(whole_batch(owner), row_invariant=True):
            rows.append(model(ids[i : i + 1]))
    return torch.cat(rows)


def test_frozen_stacks_are_reused_and_never_stale(model):
    cache = lora_stacks.frozen_stacks
    cache.clear()
    ids = torch.randint(0, 500, (4, T), generator=torch.Generator().manual_seed(3))
    first = [a.frozen_copy() for a in mixed(model)[:2]]
    owners = [first[0], None, first[1], first[0]]
    out = run(model, ids, owners)
    torch.testing.assert_close(out, alone(model, ids, owners), rtol=0, atol=1e-5)

    hits, misses = cache.hits, cache.misses
    assert torch.equal(run(model, ids, owners), out)  # the next decode step: all cached
    assert cache.hits > hits and cache.misses == misses

    second = [a.frozen_copy() for a in mixed(model)[2:]]  # a different adapter set
    owners2 = [second[1], second[0], None, second[1]]
    torch.testing.assert_close(
        run(model, ids, owners2), alone(model, ids, owners2), atol=1e-5, rtol=0
    )

    # New adapter objects, with other values, in the same places as a cached set's.
    del first, owners
    fresh = [adapter(model, LoraConfig(rank=4), 10).frozen_copy(), mixed(model)[1].frozen_copy()]
    owners3 = [fresh[0], None, fresh[1], fresh[0]]
    torch.testing.assert_close(
        run(model, ids, owners3), alone(model, ids, owners3), atol=1e-5, rtol=0
    )
    assert not torch.allclose(run(model, ids, owners3), out)

    # An in-place change to a frozen adapter is seen at once.
    with torch.no_grad():
        for b in fresh[1].b.values():
            b.mul_(-1)
    torch.testing.assert_close(
        run(model, ids, owners3), alone(model, ids, owners3), atol=1e-5, rtol=0
    )


def test_frozen_stack_cache_is_bounded(model):
    cache = lora_stacks.FrozenStacks(max_sets=2)
    name = "model.layers.0.self_attn.q_proj"
    sets = [tuple(a.frozen_copy() for a in mixed(model)[1::2]) for _ in range(4)]  # rank 8
    for s in sets:
        a, _ = cache.get(cache.entry(s), name, torch.float32)
        assert torch.equal(a[1], s[1].a[name])
    assert len(cache._sets) == 2
    cache.get(
        cache.entry(sets[0]), name, torch.float32
    )  # dropped as least recently used: stacked again
    assert cache.misses == 5 and cache.hits == 0


def test_trainable_adapters_are_stacked_every_pass_and_not_kept(model):
    lora_stacks.frozen_stacks.clear()
    multi_lora.saved_layouts.clear()
    ads = mixed(model)[:2]
    ids = torch.randint(0, 500, (2, T), generator=torch.Generator().manual_seed(4))
    run(model, ids, ads)
    assert len(lora_stacks.frozen_stacks._sets) == 0  # nor their layout, which holds them:
    assert len(multi_lora.saved_layouts._saved) == 0  # a model let go of is not kept here

    frozen = [a.frozen_copy() for a in ads]
    run(model, ids, frozen)
    assert len(multi_lora.saved_layouts._saved) == 1  # frozen ones' layout is kept

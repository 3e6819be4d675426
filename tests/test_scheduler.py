"""Scheduler policy with plain messages, no model."""

from __future__ import annotations

from lathe.engine.scheduler import Scheduler
from lathe.protocol import messages as m
from lathe.protocol.messages import LoraConfig


def fb(model: str, seq: int) -> m.Work:
    return m.Work(
        f"{model}/{seq}", m.ForwardBackwardRequest(model, seq, [], "cross_entropy", {}, False)
    )


def create(model: str) -> m.Work:
    return m.Work(f"{model}/0", m.CreateModelRequest(model, "base", LoraConfig(rank=4), None))


def sample(i: int, tenant: str = "", prompt: int = 1, n: int = 1, base: str = "base") -> m.Work:
    params = m.SamplingParams(max_tokens=1)
    req = m.SampleRequest("s", [1] * prompt, n, params, False, base_model=base)
    return m.Work(f"sample/{i}", req, tenant)


def drain(s: Scheduler) -> list[str]:
    """Run steps until nothing is left; sample requests finish in the step that admits them."""
    order = []
    while step := s.schedule():
        s.update(step, [w.request_id for w in step.admit])
        order += [w.request_id for w in step.batch + step.admit]
    return order


def test_model_requests_run_in_seq_order_whatever_the_arrival_order():
    s = Scheduler()
    s.submit(create("a"))
    for seq in (3, 1, 4, 2):
        s.submit(fb("a", seq))
    assert drain(s) == ["a/0", "a/1", "a/2", "a/3", "a/4"]
    assert s.pending() == 0


def test_a_gap_blocks_only_its_own_model():
    s = Scheduler()
    s.submit(create("a"))
    s.submit(create("b"))
    s.submit(fb("a", 2))  # seq 1 of model a has not arrived
    s.submit(fb("b", 1))
    s.submit(sample(0))
    assert drain(s) == ["a/0", "sample/0", "b/0", "b/1"]  # samples start at once
    assert s.waiting_models() == {"a": [2]}
    s.submit(fb("a", 1))
    assert drain(s) == ["a/1", "a/2"]


def test_unloading_a_model_hands_back_the_work_that_waited_for_it():
    s = Scheduler()
    s.submit(create("a"))
    s.submit(create("b"))
    s.submit(fb("a", 3))  # seq 1 and 2 never arrive: the session ends first
    s.submit(fb("a", 4))
    assert drain(s) == ["a/0", "b/0"]
    assert sorted(w.request_id for w in s.discard(["a"], "gone")) == ["a/3", "a/4"]
    assert s.pending() == 0 and s.waiting_models() == {}
    assert s.unloaded(fb("a", 7)) == "gone" and s.unloaded(fb("b", 1)) is None  # late work refused


def test_samples_are_admitted_beside_training_without_waiting_for_it():
    s = Scheduler()
    s.submit(create("a"))
    s.submit(sample(0))
    s.submit(fb("a", 1))
    s.submit(sample(1))
    s.submit(fb("a", 2))
    first = s.schedule()
    assert [w.request_id for w in first.batch] == ["a/0"]
    assert [w.request_id for w in first.admit] == ["sample/0", "sample/1"] and first.decode
    s.update(first)
    assert [w.request_id for w in s.schedule().batch] == ["a/1"]
    assert s.schedule().decode  # the admitted samples keep decoding until they finish
    s.update(s.schedule(), ["sample/0", "sample/1"])
    assert drain(s) == ["a/2"]


BLOCK_PROMPT = 64  # a prompt of one KV block; with max_tokens=1 each sample needs one more


def test_sample_admission_keeps_to_the_kv_budget_and_frees_it_as_requests_finish():
    s = Scheduler(kv_blocks=5)
    s.submit(sample(0, prompt=BLOCK_PROMPT, n=2))  # 1 + 2 blocks
    s.submit(sample(1, prompt=BLOCK_PROMPT, n=1))  # 1 + 1: fits beside it (5 blocks)
    s.submit(sample(2, prompt=BLOCK_PROMPT, n=1))  # no room left: waits, paused
    s.submit(sample(3, prompt=BLOCK_PROMPT, n=1, base="other"))  # another pool: runs
    step = s.schedule()
    assert [w.request_id for w in step.admit] == ["sample/0", "sample/1", "sample/3"]
    assert s.paused_for_capacity == {"sample/2"}
    s.update(step)
    assert s.schedule().admit == []  # nothing freed yet
    s.update(s.schedule(), ["sample/1"])
    step = s.schedule()
    assert [w.request_id for w in step.admit] == ["sample/2"] and not s.paused_for_capacity


def test_a_waiting_big_request_is_not_overtaken_and_one_too_big_is_refused():
    s = Scheduler(kv_blocks=4)
    s.submit(sample(0, prompt=BLOCK_PROMPT, n=1))  # 2 blocks
    s.update(s.schedule())
    s.submit(sample(1, prompt=BLOCK_PROMPT, n=2))  # 3 blocks: does not fit yet
    s.submit(sample(2, prompt=BLOCK_PROMPT, n=1))  # would fit, but must not overtake
    s.submit(sample(3, prompt=BLOCK_PROMPT, n=9))  # 10 blocks: can never fit
    step = s.schedule()
    assert step.admit == [] and [w.request_id for w, _ in step.refuse] == ["sample/3"]
    assert "KV positions" in step.refuse[0][1]
    s.update(step, ["sample/0"])
    assert [w.request_id for w in s.schedule().admit] == ["sample/1"]


def test_sample_admission_is_fair_between_tenants():
    s = Scheduler(kv_blocks=2)
    for i in range(5):
        s.submit(sample(i, tenant="heavy", prompt=BLOCK_PROMPT))
    s.update(s.schedule(), ["sample/0"])  # heavy has been served once
    s.submit(m.Work("light", sample(9, prompt=BLOCK_PROMPT).request, "light"))
    admitted = []
    for _ in range(2):  # one request fits at a time; each finishes within its step
        step = s.schedule()
        s.update(step, [w.request_id for w in step.admit])
        admitted += [w.request_id for w in step.admit]
    assert "light" in admitted  # not after the heavy tenant's other three


def fb_of(
    model: str,
    seq: int,
    tenant: str,
    tokens: int = 10,
    base: str = "base",
    forward_only: bool = False,
) -> m.Work:
    datum = m.Datum(list(range(tokens)), {})
    req = m.ForwardBackwardRequest(
        model, seq, [datum], "cross_entropy", {}, forward_only, None, base
    )
    return m.Work(f"{tenant}/{model}/{seq}", req, tenant)


def test_a_flooding_tenant_cannot_starve_a_light_one():
    s = Scheduler(token_budget=10)  # budget of one request: no co-batching here
    for i in range(100):  # heavy tenant: 100 models with one request each, all ready
        s.submit(
            m.Work(f"h{i}/0", m.CreateModelRequest(f"h{i}", "base", LoraConfig(4), None), "heavy")
        )
    for i in range(100):
        s.submit(fb_of(f"h{i}", 1, "heavy"))
    s.update(s.schedule())  # the heavy tenant has been served once
    s.submit(m.Work("l/0", m.CreateModelRequest("l", "base", LoraConfig(4), None), "light"))
    steps = 0
    while True:
        step = s.schedule()
        s.update(step)
        steps += 1
        if any(w.request_id == "l/0" for w in step.batch):
            break
    assert steps <= 2  # not after the heavy tenant's 199 other requests


def test_forward_backward_of_different_models_are_co_batched():
    s = Scheduler(token_budget=35)
    for model, tenant in (("a", "t1"), ("b", "t2"), ("c", "t3"), ("d", "t4")):
        s.submit(
            m.Work(f"{model}/0", m.CreateModelRequest(model, "base", LoraConfig(4), None), tenant)
        )
    while (step := s.schedule()) and isinstance(step.batch[0].request, m.CreateModelRequest):
        s.update(step)
    s.submit(fb_of("a", 1, "t1"))
    s.submit(fb_of("a", 2, "t1"))  # the same model's next request waits for its turn
    s.submit(fb_of("b", 1, "t2"))
    s.submit(fb_of("c", 1, "t3", forward_only=True))  # another mode: not with the others
    s.submit(fb_of("d", 1, "t4", base="other"))  # another base model: not with the others
    step = s.schedule()
    assert sorted(w.request_id for w in step.batch) == ["t1/a/1", "t2/b/1"]
    s.update(step)
    batch = s.schedule().batch
    assert len(batch) == 1 or all(
        w.request.forward_only == batch[0].request.forward_only for w in batch
    )


def optim(model: str, seq: int, tenant: str) -> m.Work:
    return m.Work(f"{model}/{seq}", m.OptimStepRequest(model, seq, m.AdamParams(1e-3)), tenant)


def test_ready_optim_steps_run_first_and_together_so_co_batches_stay_whole():
    """Three tenants each queue forward_backward, optim_step, forward_backward: every step
    after the first co-batch holds all three tenants' work, never a split."""
    s = Scheduler()
    models = ("a", "b", "c")
    for i, model in enumerate(models):
        s.submit(m.Work(f"{model}/0", create(model).request, model))
        data = [m.Datum([1] * (10 + i), {})]
        for seq in (1, 3):
            req = m.ForwardBackwardRequest(model, seq, data, "cross_entropy", {}, False)
            s.submit(m.Work(f"{model}/{seq}", req, model))
        s.submit(optim(model, 2, model))
    steps = []
    while step := s.schedule():
        s.update(step)
        steps.append(sorted(w.request_id for w in step.batch))
    assert steps[-3:] == [
        ["a/1", "b/1", "c/1"],  # co-batched
        ["a/2", "b/2", "c/2"],  # every ready optim_step, at once
        ["a/3", "b/3", "c/3"],  # so the next forward_backwards co-batch whole
    ]


def test_cancelled_samples_leave_the_queue_or_are_handed_to_the_runner():
    s = Scheduler(kv_blocks=3)
    s.submit(sample(0, prompt=BLOCK_PROMPT, n=2))  # 1 + 2 blocks: the whole budget
    s.submit(sample(1, prompt=BLOCK_PROMPT, n=1))  # waits for memory
    s.update(s.schedule())
    queued, running = s.cancel(["sample/1", "sample/0", "sample/9"])
    assert [w.request_id for w in queued] == ["sample/1"] and running == ["sample/0"]
    assert s.pending() == 0 and not s.schedule().admit
    s.update(s.schedule(), ["sample/0"])  # the runner stopped it: its blocks are free again
    s.submit(sample(2, prompt=BLOCK_PROMPT, n=2))
    assert [w.request_id for w in s.schedule().admit] == ["sample/2"]

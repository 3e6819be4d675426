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


def sample(i: int) -> m.Work:
    params = m.SamplingParams(max_tokens=1)
    return m.Work(f"sample/{i}", m.SampleRequest("s", [1], 1, params, False))


def drain(s: Scheduler) -> list[str]:
    order = []
    while batch := s.schedule():
        s.update(batch)
        order += [w.request_id for w in batch]
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
    assert drain(s) == ["a/0", "b/0", "b/1", "sample/0"]
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
    assert sorted(w.request_id for w in s.discard(["a"])) == ["a/3", "a/4"]
    assert s.pending() == 0 and s.waiting_models() == {}
    assert s.unloaded(fb("a", 7)) and not s.unloaded(fb("b", 1))  # late work is refused


def test_training_and_sampling_interleave_first_come_first_served():
    s = Scheduler()
    s.submit(create("a"))
    s.submit(sample(0))
    s.submit(fb("a", 1))
    s.submit(sample(1))
    s.submit(fb("a", 2))
    assert drain(s) == ["a/0", "sample/0", "a/1", "sample/1", "a/2"]


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
        batch = s.schedule()
        s.update(batch)
        steps += 1
        if any(w.request_id == "l/0" for w in batch):
            break
    assert steps <= 2  # not after the heavy tenant's 199 other requests


def test_forward_backward_of_different_models_are_co_batched():
    s = Scheduler(token_budget=35)
    for model, tenant in (("a", "t1"), ("b", "t2"), ("c", "t3"), ("d", "t4")):
        s.submit(
            m.Work(f"{model}/0", m.CreateModelRequest(model, "base", LoraConfig(4), None), tenant)
        )
    while (batch := s.schedule()) and isinstance(batch[0].request, m.CreateModelRequest):
        s.update(batch)
    s.submit(fb_of("a", 1, "t1"))
    s.submit(fb_of("a", 2, "t1"))  # the same model's next request waits for its turn
    s.submit(fb_of("b", 1, "t2"))
    s.submit(fb_of("c", 1, "t3", forward_only=True))  # another mode: not with the others
    s.submit(fb_of("d", 1, "t4", base="other"))  # another base model: not with the others
    batch = s.schedule()
    assert sorted(w.request_id for w in batch) == ["t1/a/1", "t2/b/1"]
    s.update(batch)
    batch = s.schedule()
    assert len(batch) == 1 or all(
        w.request.forward_only == batch[0].request.forward_only for w in batch
    )

"""Scheduler policy with plain messages, no model."""

from __future__ import annotations

from lathe.engine import messages as m
from lathe.engine.lora import LoraConfig
from lathe.engine.scheduler import Scheduler


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


def test_training_and_sampling_interleave_first_come_first_served():
    s = Scheduler()
    s.submit(create("a"))
    s.submit(sample(0))
    s.submit(fb("a", 1))
    s.submit(sample(1))
    s.submit(fb("a", 2))
    assert drain(s) == ["a/0", "sample/0", "a/1", "sample/1", "a/2"]

"""`lathe demo`: teach a tiny model to reverse digit strings, through the official SDK.

Everything a user would do, on a laptop and offline: build a tiny random model, start
`lathe serve` with it, then, as an ordinary `tinker` client, train a LoRA adapter on a chat-
formatted task, watch the loss, compare held-out exact-match accuracy and samples before and
after, and save a checkpoint. The base model is random, so whatever it gets right after
training was learned by the adapter.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tinker
from tinker import types
from tqdm import tqdm

from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.testing.tiny_models import TinyModelSpec, make_tiny

MODEL_NAME = "tiny-qwen3-demo"
# Big enough to learn the task, small enough to train in about a minute on two cores.
DEMO_SPEC = TinyModelSpec(
    family="qwen3",
    num_layers=2,
    hidden_size=128,
    intermediate_size=384,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    vocab_size=512,
    seed=0,
)
DIGITS = 3
STEPS = 500
BATCH = 32
RANK = 8
LEARNING_RATE = 3e-3  # learns the task from every adapter seed tried (0-3) in 500 steps
EVAL_SIZE = 100


@dataclass(frozen=True)
class Example:
    digits: tuple[str, ...]

    @property
    def question(self) -> str:
        return "reverse: " + " ".join(self.digits)

    @property
    def answer(self) -> str:
        return " ".join(reversed(self.digits))


def split_examples(seed: int = 0) -> tuple[list[Example], list[Example]]:
    """All digit strings, shuffled; the held-out ones are never trained on."""
    everything = [Example(tuple(f"{i:0{DIGITS}d}")) for i in range(10**DIGITS)]
    random.Random(seed).shuffle(everything)
    return everything[EVAL_SIZE:], everything[:EVAL_SIZE]


class ChatFormat:
    """Qwen-style chat turns rendered with the model's own chat template."""

    def __init__(self, tokenizer) -> None:  # a transformers tokenizer from get_tokenizer()
        self.tok = tokenizer
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt(self, ex: Example) -> list[int]:
        messages = [{"role": "user", "content": ex.question}]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)

    def completion(self, ex: Example) -> list[int]:
        return self.tok.encode(ex.answer, add_special_tokens=False) + [self.end_id]

    def datum(self, ex: Example) -> types.Datum:
        """Train on the answer only: prompt tokens get weight 0."""
        prompt, completion = self.prompt(ex), self.completion(ex)
        tokens = prompt + completion
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
        return types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
        )

    def text(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True).strip()


def evaluate(sampler, fmt: ChatFormat, examples: list[Example]) -> tuple[float, list[str]]:
    """Greedy exact-match accuracy, and the model's answers."""
    params = types.SamplingParams(max_tokens=2 * DIGITS + 2, temperature=0.0, stop=[fmt.end_id])
    futures = [
        sampler.sample(types.ModelInput.from_ints(fmt.prompt(ex)), 1, params) for ex in examples
    ]
    answers = [fmt.text(f.result().sequences[0].tokens) for f in futures]
    correct = sum(a == ex.answer for a, ex in zip(answers, examples, strict=True))
    return correct / len(examples), answers


def show_samples(title: str, examples: list[Example], answers: list[str]) -> None:
    print(title)
    for ex, got in zip(examples, answers, strict=True):
        mark = "ok " if got == ex.answer else "   "
        print(f"  {mark} {ex.question!r:24} -> {got!r:12} (want {ex.answer!r})")


def train(client, fmt: ChatFormat, train_set: list[Example], steps: int) -> list[float]:
    """Steps of forward_backward + optim_step; per-token loss of each step."""
    rng = random.Random(1)
    losses: list[float] = []
    pending = None  # keep one step in flight so the server is never idle
    bar = tqdm(range(steps), desc="training", unit="step", file=sys.stdout)
    for step in bar:
        batch = [fmt.datum(rng.choice(train_set)) for _ in range(BATCH)]
        n_answer = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)
        lr = LEARNING_RATE * (1 - 0.5 * step / steps)  # decay to half to settle at the end
        fb = client.forward_backward(batch, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=lr))
        if pending is not None:
            losses.append(pending[0].result().metrics["loss:sum"] / pending[1])
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        pending = (fb, n_answer)
    losses.append(pending[0].result().metrics["loss:sum"] / pending[1])
    bar.close()
    return losses


def run_demo(steps: int | None = None, data_dir: str | None = None) -> int:
    steps = steps or STEPS
    logging.getLogger("tinker").setLevel(logging.WARNING)  # keep the demo's output readable
    started = time.monotonic()
    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="lathe-demo-"))
    model_dir = root / "models" / MODEL_NAME
    if not (model_dir / "config.json").exists():
        make_tiny(model_dir, DEMO_SPEC)
    print(f"lathe demo: random tiny Qwen3 model in {model_dir}")
    with LocalServer({MODEL_NAME: model_dir}, root / "server") as server:
        print(f"server: {server.base_url} (data in {server.data_dir})")
        with tinker.ServiceClient(base_url=server.base_url, api_key=LOCAL_API_KEY) as service:
            client = service.create_lora_training_client(
                base_model=MODEL_NAME, rank=RANK, seed=0
            ).result()
            fmt = ChatFormat(client.get_tokenizer())
            train_set, held_out = split_examples()
            print(
                f"task: reverse {DIGITS} digits; {len(train_set)} training strings, "
                f"{len(held_out)} held out"
            )

            before = client.save_weights_and_get_sampling_client().result()
            acc_before, answers_before = evaluate(before, fmt, held_out)
            show_samples(
                f"before training: held-out accuracy {acc_before:.0%}",
                held_out[:4],
                answers_before[:4],
            )

            losses = train(client, fmt, train_set, steps)
            after = client.save_weights_and_get_sampling_client().result()
            acc_after, answers_after = evaluate(after, fmt, held_out)
            show_samples(
                f"after {steps} steps: held-out accuracy {acc_after:.0%}",
                held_out[:4],
                answers_after[:4],
            )
            path = client.save_state("demo-final").result().path

    print(f"loss per answer token: {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"held-out exact match: {acc_before:.0%} -> {acc_after:.0%}")
    print(f"checkpoint: {path}")
    print(f"done in {time.monotonic() - started:.0f} s")
    learned = losses[-1] < losses[0] / 3 and acc_after > acc_before
    if not learned:
        print("the model did not learn the task as expected", file=sys.stderr)
    return 0 if learned else 1

"""Every public method of the pinned SDK's clients, called against a live server.

The methods are found by introspection (`dir()` of ServiceClient, TrainingClient,
SamplingClient, RestClient and AdminClient), so a method a newer SDK adds fails this test until
it has a recipe here. Each `*_async` variant runs its sync twin's recipe through `asyncio`.
A call passes when it returns what the recipe checks, or is refused with one of the documented
4xx messages in REFUSED (README, "SDK coverage").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from lathe.local_server import LocalServer

BASE = "lathe-test/tiny-qwen3"  # a hub-style name: SamplingClient.get_tokenizer loads it by name
CLIENTS = (
    tinker.ServiceClient,
    tinker.TrainingClient,
    tinker.SamplingClient,
    tinker.RestClient,
    tinker.AdminClient,
)
DATUM = types.Datum(
    model_input=types.ModelInput.from_ints([5, 9, 13, 21]),
    loss_fn_inputs={"target_tokens": [9, 13, 21, 34]},
)


@dataclass
class Ctx:
    server: LocalServer
    key: str
    sc: tinker.ServiceClient
    tc: Any  # TrainingClient
    sampler: Any  # SamplingClient
    rest: tinker.RestClient
    admin: tinker.AdminClient
    counter: list[int]

    def name(self, stem: str) -> str:
        self.counter[0] += 1
        return f"{stem}-{self.counter[0]}"

    def saved(self) -> str:
        return self.tc.save_state(self.name("ckpt")).result().path


def lathe(*args: str) -> str:
    made = subprocess.run(
        [sys.executable, "-m", "lathe", *args], capture_output=True, text=True, check=True
    )
    return made.stdout.strip()


@pytest.fixture(scope="module")
def ctx(tiny_qwen3, tmp_path_factory):
    """A server with API keys and JWTs (whoami), the tokenizer findable offline by its name
    (`lathe models hf-cache`, as a user would), and one trained model with a sampler."""
    import huggingface_hub.constants

    data, hub = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("hub")
    key = lathe("keys", "create", "cov", "--data-dir", str(data))
    lathe("models", "hf-cache", "--model", str(tiny_qwen3), "--name", BASE, "--cache-dir", str(hub))
    with (
        pytest.MonkeyPatch.context() as mp,
        LocalServer({BASE: tiny_qwen3}, data, "--jwt", dev=False) as srv,
    ):
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with tinker.ServiceClient(None, "cov-project", base_url=srv.base_url, api_key=key) as sc:
            tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=0).result()
            tc.forward_backward([DATUM], "cross_entropy").result()
            sampler = tc.save_weights_and_get_sampling_client().result()
            rest = tinker.RestClient(base_url=srv.base_url, api_key=key)
            admin = tinker.AdminClient(base_url=srv.base_url, api_key=key)
            yield Ctx(srv, key, sc, tc, sampler, rest, admin, [0])


async def settle(value: Any) -> Any:
    value = await value
    while hasattr(value, "result_async"):  # an APIFuture returned by an async method
        value = await value.result_async()
    return value


def caller(method: str) -> Callable[..., Any]:
    """call(obj, *args): obj.method(*args), waited for (a future's result, a coroutine run)."""

    def call(obj: Any, *args: Any, **kwargs: Any) -> Any:
        out = getattr(obj, method)(*args, **kwargs)
        if inspect.iscoroutine(out):
            return asyncio.run(settle(out))
        if hasattr(out, "result") and not isinstance(out, str):
            return out.result(timeout=120)
        return out

    return call


def per_datum_loss(logprobs, mask):  # noqa: ANN001, ANN201 - traced by the SDK
    return -(logprobs * mask).sum(), {}


def prompt() -> types.ModelInput:
    return types.ModelInput.from_ints([5, 9, 13])


GREEDY = types.SamplingParams(max_tokens=3, temperature=0.0)
Recipe = Callable[[Ctx, Callable[..., Any]], None]

# (client, method without "_async") -> what to call and check
RECIPES: dict[tuple[str, str], Recipe] = {
    # ServiceClient
    ("ServiceClient", "close"): lambda c, call: call(
        tinker.ServiceClient(base_url=c.server.base_url, api_key=c.key), "success"
    ),
    ("ServiceClient", "copy_weights"): lambda c, call: (
        call(c.sc, c.saved()).endswith("ckpt") or None
    ),
    ("ServiceClient", "create_custom_loss"): lambda c, call: call(
        c.sc, per_datum_loss, {"logprobs": 1, "mask": 1}
    ),
    ("ServiceClient", "create_lora_training_client"): lambda c, call: call(
        c.sc, base_model=BASE, rank=4
    ).get_info(),
    ("ServiceClient", "create_rest_client"): lambda c, call: call(c.sc).list_sessions().result(),
    ("ServiceClient", "create_sampling_client"): lambda c, call: (
        call(c.sc, base_model=BASE).sample(prompt(), 1, GREEDY).result()
    ),
    ("ServiceClient", "create_training_client_from_state"): lambda c, call: (
        call(c.sc, c.saved()).forward([DATUM], "cross_entropy").result()
    ),
    ("ServiceClient", "create_training_client_from_state_with_optimizer"): lambda c, call: (
        call(c.sc, c.saved()).forward([DATUM], "cross_entropy").result()
    ),
    ("ServiceClient", "get_console_url"): lambda c, call: isinstance(call(c.sc), str) or None,
    ("ServiceClient", "get_server_capabilities"): lambda c, call: call(c.sc).supported_models,
    ("ServiceClient", "get_telemetry"): lambda c, call: call(c.sc),
    # TrainingClient
    ("TrainingClient", "create_sampling_client"): lambda c, call: (
        call(c.tc, c.tc.save_weights_for_sampler(c.name("s")).result().path)
        .sample(prompt(), 1, GREEDY)
        .result()
    ),
    ("TrainingClient", "forward"): lambda c, call: call(c.tc, [DATUM], "cross_entropy"),
    ("TrainingClient", "forward_backward"): lambda c, call: call(c.tc, [DATUM], "cross_entropy"),
    ("TrainingClient", "forward_backward_custom"): lambda c, call: call(
        c.tc, [DATUM], lambda data, lps: (sum(-lp.sum() for lp in lps), {})
    ),
    ("TrainingClient", "get_console_url"): lambda c, call: isinstance(call(c.tc), str) or None,
    ("TrainingClient", "get_info"): lambda c, call: call(c.tc).model_data,
    ("TrainingClient", "get_telemetry"): lambda c, call: call(c.tc),
    ("TrainingClient", "get_tokenizer"): lambda c, call: call(c.tc).encode("hello"),
    ("TrainingClient", "load_state"): lambda c, call: call(c.tc, c.saved()),
    ("TrainingClient", "load_state_with_optimizer"): lambda c, call: call(c.tc, c.saved()),
    ("TrainingClient", "optim_step"): lambda c, call: call(
        c.tc, types.AdamParams(learning_rate=1e-4)
    ),
    ("TrainingClient", "save_state"): lambda c, call: call(c.tc, c.name("state")),
    ("TrainingClient", "save_weights_and_get_sampling_client"): lambda c, call: (
        call(c.tc).sample(prompt(), 1, GREEDY).result()
    ),
    ("TrainingClient", "save_weights_external"): lambda c, call: call(c.tc, c.name("ext")),
    ("TrainingClient", "save_weights_for_sampler"): lambda c, call: call(c.tc, c.name("smp")),
    # SamplingClient
    ("SamplingClient", "compute_logprobs"): lambda c, call: call(c.sampler, prompt()),
    ("SamplingClient", "create"): lambda c, call: (
        call(tinker.SamplingClient, c.sc.holder, base_model=BASE)
        .sample(prompt(), 1, GREEDY)
        .result()
    ),
    ("SamplingClient", "from_sampler_handle"): lambda c, call: (
        call(tinker.SamplingClient, c.sampler.get_sampler_handle(), api_key=c.key)
        .sample(prompt(), 1, GREEDY)
        .result()
    ),
    ("SamplingClient", "get_base_model"): lambda c, call: call(c.sampler) == BASE or None,
    ("SamplingClient", "get_sampler_handle"): lambda c, call: call(c.sampler),
    ("SamplingClient", "get_telemetry"): lambda c, call: call(c.sampler),
    ("SamplingClient", "get_tokenizer"): lambda c, call: call(c.sampler).encode("hello"),
    ("SamplingClient", "on_queue_state_change"): lambda c, call: call(
        c.sampler, types.QueueState.ACTIVE if hasattr(types, "QueueState") else "active", None
    ),
    ("SamplingClient", "sample"): lambda c, call: call(c.sampler, prompt(), 2, GREEDY),
}


def rest_recipes() -> None:
    def on(client: str, method: str) -> Callable[[Recipe], Recipe]:
        def register(fn: Recipe) -> Recipe:
            RECIPES[(client, method)] = fn
            return fn

        return register

    run = lambda c: c.tc.model_id  # noqa: E731
    hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    window = (hour - dt.timedelta(hours=1), hour)
    for client in ("RestClient", "AdminClient"):  # the admin calls exist on both (deprecated)
        admin = client == "AdminClient"
        obj = (lambda c: c.admin) if admin else (lambda c: c.rest)
        on(client, "get_audit_log")(lambda c, call, o=obj: call(o(c)).entries)
        on(client, "get_billing_usage")(lambda c, call, o=obj: call(o(c), *window).data)
        on(client, "get_current_checkpoint_storage_usage")(lambda c, call, o=obj: call(o(c)).data)
        on(client, "get_telemetry")(lambda c, call, o=obj: call(o(c)))
    r: dict[str, Recipe] = {
        "assign_session_project": lambda c, call: call(c.rest, run(c).split(":")[0], "p"),
        "copy_weights": lambda c, call: call(c.rest, c.saved(), "p2"),
        "delete_checkpoint": lambda c, call: call(
            c.rest, run(c), "weights/" + c.saved().rsplit("/", 1)[1]
        ),
        "delete_checkpoint_from_tinker_path": lambda c, call: call(c.rest, c.saved()),
        "export_session_trace": lambda c, call: (
            httpx.get(call(c.rest, run(c).split(":")[0])).raise_for_status().json()
        ),
        "get_external_weights_urls": lambda c, call: (
            call(c.rest, c.tc.save_weights_external(c.name("x")).result().path).urls
        ),
        "get_sampler": lambda c, call: call(c.rest, c.sampler._sampling_session_id),
        "get_server_capabilities": lambda c, call: call(c.rest).supported_models,
        "get_session": lambda c, call: call(c.rest, run(c).split(":")[0]).training_run_ids,
        "get_training_run": lambda c, call: call(c.rest, run(c)).base_model,
        "get_training_run_by_tinker_path": lambda c, call: call(c.rest, c.saved()).base_model,
        "get_weights_info_by_tinker_path": lambda c, call: call(c.rest, c.saved()).base_model,
        "list_checkpoints": lambda c, call: call(c.rest, run(c)).checkpoints,
        "list_sessions": lambda c, call: call(c.rest).sessions,
        "list_training_runs": lambda c, call: call(c.rest).training_runs,
        "list_user_checkpoints": lambda c, call: call(c.rest).checkpoints,
        "publish_checkpoint_from_tinker_path": lambda c, call: call(c.rest, c.saved()),
        "search_sessions": lambda c, call: call(c.rest, types.SessionSearchRequest()).sessions,
        "set_checkpoint_ttl_from_tinker_path": lambda c, call: call(c.rest, c.saved(), 3600),
        "unpublish_checkpoint_from_tinker_path": lambda c, call: call(c.rest, c.saved()),
        "whoami": lambda c, call: call(c.rest).user_urn,
    }
    for method, fn in r.items():
        RECIPES[("RestClient", method)] = fn


rest_recipes()

# Methods refused on purpose, with the message a caller sees (none today).
REFUSED: dict[tuple[str, str], str] = {}


def public_methods() -> list[tuple[str, str]]:
    found = []
    for cls in CLIENTS:
        for name in sorted(dir(cls)):
            if not name.startswith("_") and callable(getattr(cls, name)):
                found.append((cls.__name__, name))
    return found


def test_every_public_method_has_a_recipe():
    missing = [
        f"{cls}.{name}"
        for cls, name in public_methods()
        if (cls, name.removesuffix("_async")) not in RECIPES | REFUSED
    ]
    assert not missing, f"SDK methods without a coverage recipe: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize(("client", "method"), public_methods(), ids=lambda x: x)
def test_the_method_works_against_a_live_server(ctx, client, method):
    base = method.removesuffix("_async")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations and experimental notices of the SDK
        if (client, base) in REFUSED:
            with pytest.raises(Exception, match=REFUSED[(client, base)]):
                RECIPES[(client, base)](ctx, caller(method))
            return
        RECIPES[(client, base)](ctx, caller(method))

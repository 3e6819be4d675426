"""Training semantics through the official SDK against a live in-process server.

Chunked batches, custom losses (client-side and server-side), LoRA options, retries. The
server runs on a thread of this process so the tests can read adapter gradients and compare
them with an autograd reference.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
import torch
import torch.nn.functional as F
import zstandard
from tinker import types

from lathe.api.wire import tinker_wire_pb2 as pb
from lathe.settings import Settings

from conftest import API_KEY, InProcessServer, await_future, fwdbwd_body
from reference import assert_rel_close, grads_of, make_reference, reference_logprobs

BASE = "tiny"
CHUNK = 8  # the server tells the SDK to send at most this many datums per request
PROTO = {"Content-Type": "application/x-protobuf"}


@pytest.fixture(scope="module")
def server(hf_folder, tmp_path_factory):
    settings = Settings(
        models={BASE: hf_folder},
        data_dir=tmp_path_factory.mktemp("data"),
        long_poll_seconds=5,
        dev=True,
        client_config={"fwdbwd_max_chunk_len": CHUNK},
    )
    server = InProcessServer(settings)
    yield server
    server.stop()


def new_model(service, server, seed=0, **lora):
    """A training client whose adapter has non-zero B (so A gets gradients too)."""
    tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=seed, **lora).result()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # the engine is idle between requests
        for b in server.adapter(tc.model_id).b.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return tc


def sl_data(n_datums: int, seed: int = 0) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n_datums):
        n = int(rng.integers(4, 20))
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(rng.integers(0, 128, n).tolist()),
                loss_fn_inputs={
                    "target_tokens": rng.integers(0, 128, n).tolist(),
                    "weights": rng.normal(0, 1, n).astype(np.float32).tolist(),
                },
            )
        )
    return data


def as_proto_body(model_id: str, seq: int, data: list[types.Datum]) -> bytes:
    req = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq, loss_fn="cross_entropy")
    for d in data:
        pd = req.data.add()
        pd.model_input.add().encoded_text.tokens = np.asarray(
            d.model_input.to_ints(), "<i4"
        ).tobytes()
        for key, dtype, pdtype in (
            ("target_tokens", "<i8", pb.DTYPE_INT64),
            ("weights", "<f4", pb.DTYPE_FLOAT32),
        ):
            arr = np.asarray(d.loss_fn_inputs[key].tolist(), dtype)
            pd.loss_fn_inputs[key].CopyFrom(
                pb.Tensor(dense=arr.tobytes(), dtype=pdtype, shape=[len(arr)])
            )
    return req.SerializeToString()


def outputs_of(response: httpx.Response) -> tuple[list[np.ndarray], float]:
    out = pb.ForwardBackwardOutput.FromString(response.content)
    rec = out.loss_fn_outputs[0]
    offsets = np.frombuffer(rec.fields["logprobs"].offsets, "<i8")
    data = rec.fields["logprobs"].data
    lps = [np.frombuffer(data[a:b], "<f4") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return lps, out.metrics["loss:sum"]


def test_chunked_equals_unchunked_and_reverse_order_works(service, server, http):
    data = sl_data(40)
    # through the SDK: 5 requests of 8 datums, posted concurrently, first chunk last
    chunked = new_model(service, server)
    res = chunked.forward_backward(data, "cross_entropy").result()
    # the same 40 datums in one raw request, on an identically initialised model
    whole = new_model(service, server)
    r = http.post(
        "/forward_backward", content=as_proto_body(whole.model_id, 1, data), headers=PROTO
    )
    whole_lps, whole_loss = outputs_of(await_future(http, r.json()["request_id"]))
    # five chunks posted in reverse seq order over raw HTTP
    rev = new_model(service, server)
    ids = [
        http.post(
            "/forward_backward",
            headers=PROTO,
            content=as_proto_body(rev.model_id, seq, data[(seq - 1) * CHUNK : seq * CHUNK]),
        ).json()["request_id"]
        for seq in (5, 4, 3, 2, 1)
    ]
    rev_lps = [lp for rid in reversed(ids) for lp in outputs_of(await_future(http, rid))[0]]

    sdk_lps = [np.asarray(o["logprobs"].tolist(), np.float32) for o in res.loss_fn_outputs]
    flat = np.concatenate
    np.testing.assert_allclose(flat(sdk_lps), flat(whole_lps), rtol=0, atol=1e-6)
    np.testing.assert_allclose(flat(rev_lps), flat(whole_lps), rtol=0, atol=1e-6)
    assert res.metrics["loss:sum"] == pytest.approx(whole_loss, rel=1e-6)
    g_whole = grads_of(server.adapter(whole.model_id))
    for other in (chunked, rev):
        g = grads_of(server.adapter(other.model_id))
        for key in g_whole:
            assert_rel_close(g[key], g_whole[key], tol=1e-6)


def test_compressed_bodies_and_zstd_bombs(service, server, http):
    tc = new_model(service, server)
    body = fwdbwd_body(tc.model_id, 1, [1, 2, 3], [2, 3, 4])
    r = http.post(
        "/forward_backward",
        content=zstandard.compress(body),
        headers={**PROTO, "Content-Encoding": "zstd"},
    )
    assert r.status_code == 200 and outputs_of(await_future(http, r.json()["request_id"]))[1] > 0
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (300 * 2**20))  # 300 MiB of zeros
    r = http.post("/forward_backward", content=bomb, headers={**PROTO, "Content-Encoding": "zstd"})
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]
    r = http.post(
        "/forward_backward",
        content=b"not zstd at all",
        headers={**PROTO, "Content-Encoding": "zstd"},
    )
    assert r.status_code == 400 and "zstd" in r.json()["detail"]


# --- custom losses ----------------------------------------------------------------------

BETA = 0.5


def preference_data(seed: int = 0) -> list[types.Datum]:
    """Pairs (chosen, rejected), rejected completions longer: the linearised weights of the
    batch then sum to a negative number."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(3):
        prompt = rng.integers(0, 128, 4).tolist()
        for completion_len, sign in ((3, 1.0), (9, -1.0)):
            tokens = prompt + rng.integers(0, 128, completion_len).tolist()
            mask = [0.0] * (len(prompt) - 1) + [1.0] * completion_len
            data.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={
                        "target_tokens": tokens[1:],
                        "mask": np.asarray(mask, np.float32),
                        "sign": np.asarray(sign, np.float32),
                        "ref": np.asarray(rng.normal(-40, 3), np.float32),
                    },
                )
            )
    return data


def inputs_of(d: types.Datum, key: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(d.loss_fn_inputs[key].tolist(), np.float32))


def dpo_pairs(data, logprobs_list):
    """Pairwise DPO: -logsigmoid(beta * (margin(chosen) - margin(rejected)))."""
    margins = [
        (lp * inputs_of(d, "mask")).sum() - inputs_of(d, "ref")
        for d, lp in zip(data, logprobs_list, strict=True)
    ]
    loss = sum(
        -F.logsigmoid(BETA * (c - r)) for c, r in zip(margins[::2], margins[1::2], strict=True)
    )
    return loss, {"dpo": float(loss)}


def dpo_per_datum(logprobs, mask, sign, ref):
    """The same preference signal datum by datum (server-side losses see one datum)."""
    loss = -F.logsigmoid(BETA * sign * ((logprobs * mask).sum() - ref))
    return loss, {"custom/dpo:sum": loss}


def reference_grads(hf_folder, adapter, data, per_pair: bool):
    ref, params = make_reference(hf_folder, adapter)
    lps = [
        reference_logprobs(ref, d.model_input.to_ints(), d.loss_fn_inputs["target_tokens"].tolist())
        for d in data
    ]
    if per_pair:
        loss = dpo_pairs(data, lps)[0]
    else:
        loss = sum(
            dpo_per_datum(lp, inputs_of(d, "mask"), inputs_of(d, "sign"), inputs_of(d, "ref"))[0]
            for d, lp in zip(data, lps, strict=True)
        )
    weights = torch.autograd.grad(loss, lps, retain_graph=True)
    loss.backward()
    linearised_sum = -sum(float(w.sum()) for w in weights)
    return {k: p.grad for k, p in params.items()}, float(loss), linearised_sum


def test_pairwise_dpo_runs_client_side(service, server, hf_folder):
    data = preference_data()
    tc = new_model(service, server)
    expected, loss, linearised = reference_grads(hf_folder, server.adapter(tc.model_id), data, True)
    assert linearised < 0
    res = tc.forward_backward_custom(data, dpo_pairs).result()
    assert res.metrics["loss:sum"] == pytest.approx(loss, rel=1e-5)
    got = grads_of(server.adapter(tc.model_id))
    for key, g in expected.items():
        assert_rel_close(got[key], g)


@pytest.mark.parametrize("server_side", [False, True])
def test_per_datum_custom_loss_client_and_server_side(service, server, hf_folder, server_side):
    data = preference_data(1)
    tc = new_model(service, server)
    expected, loss, linearised = reference_grads(
        hf_folder, server.adapter(tc.model_id), data, False
    )
    assert linearised < 0
    if server_side:
        handle = service.create_custom_loss(
            dpo_per_datum, {"logprobs": 1, "mask": 1, "sign": 0, "ref": 0}
        ).result()
        assert handle.loss_id is not None  # the server took it
        res = tc.forward_backward_custom(data, handle).result()
        assert res.metrics["custom/dpo:sum"] == pytest.approx(loss, rel=1e-5)
    else:
        res = tc.forward_backward_custom(
            data,
            lambda d, lps: (
                sum(
                    dpo_per_datum(
                        lp, inputs_of(x, "mask"), inputs_of(x, "sign"), inputs_of(x, "ref")
                    )[0]
                    for x, lp in zip(d, lps, strict=True)
                ),
                {},
            ),
        ).result()
    assert res.metrics["loss:sum"] == pytest.approx(loss, rel=1e-5)
    got = grads_of(server.adapter(tc.model_id))
    for key, g in expected.items():
        assert_rel_close(got[key], g)


def graph(*nodes):
    return {
        "format": 1,
        "nodes": [
            {"op": op, "name": name, "target": target, "args": list(args), "kwargs": {}}
            for op, name, target, args in nodes
        ],
    }


LOGP = ("placeholder", "logprobs", "logprobs", ())


def output(ref):
    return ("output", "output", "output", ({"tuple": [{"ref": ref}, {"dict": {}}]},))


HOSTILE = {
    "calls outside the allowlist": graph(
        LOGP, ("call_function", "x", "builtins.eval", ("1",)), output("x")
    ),
    "imports": graph(LOGP, ("call_function", "x", "os.system", ("true",)), output("x")),
    "reads attributes": graph(
        LOGP,
        ("call_function", "x", "builtins.getattr", ({"ref": "logprobs"}, "__class__")),
        output("x"),
    ),
    "captures tensors": graph(LOGP, ("get_attr", "x", "weight", ()), output("x")),
    "calls modules": graph(
        LOGP, ("call_module", "x", "linear", ({"ref": "logprobs"},)), output("x")
    ),
    "private methods": graph(
        LOGP, ("call_method", "x", "__reduce_ex__", ({"ref": "logprobs"}, 2)), output("x")
    ),
    "huge tensors": graph(
        LOGP,
        ("call_method", "a", "unsqueeze", ({"ref": "logprobs"}, 0)),
        ("call_method", "b", "unsqueeze", ({"ref": "logprobs"}, 1)),
        ("call_function", "c", "operator.mul", ({"ref": "a"}, {"ref": "b"})),  # T x T
        ("call_method", "d", "sum", ({"ref": "c"},)),
        output("d"),
    ),
    "undefined references": graph(
        LOGP, ("call_function", "x", "torch.exp", ({"ref": "nowhere"},)), output("x")
    ),
}


@pytest.mark.parametrize("why", list(HOSTILE))
def test_hostile_graphs_are_refused(http, why):
    sid = http.post("/create_session", json={}).json()["session_id"]
    body = {
        "session_id": sid,
        "custom_loss_seq_id": 1000 + list(HOSTILE).index(why),
        "name": "evil",
        "inputs": [{"name": "logprobs", "rank": 1}],
        "graph": HOSTILE[why],
        "type": "create_custom_loss",
    }
    r = http.post("/create_custom_loss", json=body)
    assert r.status_code == 400, r.text
    assert "refused" in r.json()["detail"]
    assert http.get("/healthz").status_code == 200


# --- LoRA options, retries, no-op steps ---------------------------------------------------


def test_lora_targets_are_honoured_and_reported(service, server):
    tc = service.create_lora_training_client(
        base_model=BASE, rank=4, train_mlp=False, train_unembed=False
    ).result()
    names = list(server.adapter(tc.model_id).a)
    assert names and all(
        n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in names
    )
    path = tc.save_state("attn-only").result().path
    rest = tinker.RestClient(base_url=server.base_url, api_key=API_KEY)
    info = rest.get_weights_info_by_tinker_path(path).result()
    assert (info.train_attn, info.train_mlp, info.train_unembed, info.lora_rank) == (
        True,
        False,
        False,
        4,
    )
    restored = service.create_training_client_from_state(path).result()
    assert list(server.adapter(restored.model_id).a) == names


def test_same_seed_same_init_and_different_seed_differs(service, server):
    def init(seed):
        tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=seed).result()
        return {k: v.detach().clone() for k, v in server.adapter(tc.model_id).a.items()}

    a, b, c = init(11), init(11), init(12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_replay_with_a_different_body_is_refused(service, server, http):
    tc = new_model(service, server)
    first = http.post(
        "/forward_backward",
        headers=PROTO,
        content=fwdbwd_body(tc.model_id, 1, [1, 2, 3], [2, 3, 4]),
    )
    same = http.post(
        "/forward_backward",
        headers=PROTO,
        content=fwdbwd_body(tc.model_id, 1, [1, 2, 3], [2, 3, 4]),
    )
    assert same.json()["request_id"] == first.json()["request_id"]
    other = http.post(
        "/forward_backward",
        headers=PROTO,
        content=fwdbwd_body(tc.model_id, 1, [1, 2, 3], [9, 9, 9]),
    )
    assert other.status_code == 400 and "seq_id 1" in other.json()["detail"]
    step = {"model_id": tc.model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}}
    assert http.post("/optim_step", json=step).status_code == 200
    step["adam_params"]["learning_rate"] = 0.2
    r = http.post("/optim_step", json=step)
    assert r.status_code == 400 and "already used" in r.json()["detail"]


def test_optim_step_without_gradients_is_a_reported_no_op(service, server):
    tc = new_model(service, server)
    before = {k: v.detach().clone() for k, v in server.adapter(tc.model_id).a.items()}
    res = tc.optim_step(types.AdamParams(learning_rate=0.1, weight_decay=0.5)).result()
    assert res.metrics["skipped"] == 1.0 and res.metrics["grad_norm"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in server.adapter(tc.model_id).a.items())
    tc.forward_backward(sl_data(2), "cross_entropy").result()
    res = tc.optim_step(types.AdamParams(learning_rate=0.1, grad_clip_norm=0.5)).result()
    assert res.metrics["grad_norm"] > 0 and res.metrics["learning_rate"] == 0.1
    assert "skipped" not in res.metrics

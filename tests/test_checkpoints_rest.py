"""Checkpoints that travel and last: the REST surface, the official CLI, durability, SDK 0.25."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types

from lathe.local_server import LocalServer
from lathe.store import tinker_paths

from conftest import API_KEY

BASE = "tiny-qwen3"
ROOT = Path(__file__).resolve().parents[1]
DATUM = types.Datum(
    model_input=types.ModelInput.from_ints([5, 9, 13, 21, 34]),
    loss_fn_inputs={"target_tokens": [9, 13, 21, 34, 55]},
)


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with LocalServer(
        {BASE: tiny_qwen3}, data, "--long-poll-seconds", "2", "--reap-seconds", "0.3"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def rest(server):
    return tinker.RestClient(base_url=server.base_url, api_key=API_KEY)


def trained(service, **kw):
    tc = service.create_lora_training_client(base_model=BASE, rank=4, **kw).result()
    tc.forward_backward([DATUM], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    return tc


def loss_of(tc) -> float:
    return tc.forward([DATUM], "cross_entropy").result().metrics["loss:sum"]


def test_training_runs_and_checkpoint_listings(service, rest):
    runs = [trained(service, user_metadata={"experiment": f"e{i}"}) for i in range(3)]
    a = runs[0]
    first = a.save_state("s1", user_metadata={"note": "first"}).result().path
    a.save_weights_for_sampler("w1").result()
    second = a.save_state("s2").result().path

    info = rest.get_training_run(a.model_id).result()
    assert (
        info.lora_rank == 4
        and info.base_model == BASE
        and info.user_metadata == {"experiment": "e0"}
    )
    assert info.last_checkpoint.tinker_path == second
    assert info.last_sampler_checkpoint.checkpoint_id == "sampler_weights/w1"
    assert rest.get_training_run_by_tinker_path(first).result().training_run_id == a.model_id

    page1 = rest.list_training_runs(limit=2).result()
    page2 = rest.list_training_runs(limit=2, offset=2).result()
    assert page1.cursor.total_count >= 3 and len(page1.training_runs) == 2
    listed = {r.training_run_id for r in page1.training_runs + page2.training_runs}
    assert page1.training_runs[0].training_run_id == runs[-1].model_id  # newest first
    assert {r.model_id for r in runs} <= listed or page1.cursor.total_count > 4

    mine = rest.list_user_checkpoints(limit=2).result()
    assert [c.tinker_path for c in mine.checkpoints] == [
        second,
        f"tinker://{a.model_id}/sampler_weights/w1",
    ]
    assert mine.cursor.total_count >= 3
    by_run = rest.list_checkpoints(a.model_id).result().checkpoints
    assert {c.checkpoint_id: c.user_metadata for c in by_run}["weights/s1"] == {"note": "first"}


def test_delete_publish_ttl_and_expiry(service, rest, server):
    tc = trained(service)
    keep = tc.save_state("keep").result().path
    gone = tc.save_state("gone").result().path
    rest.delete_checkpoint_from_tinker_path(gone).result()
    assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [
        keep
    ]
    with pytest.raises(tinker.NotFoundError, match="not found"):
        service.create_training_client_from_state(gone).result()

    rest.publish_checkpoint_from_tinker_path(keep).result()
    assert rest.list_checkpoints(tc.model_id).result().checkpoints[0].public
    rest.unpublish_checkpoint_from_tinker_path(keep).result()
    assert not rest.list_checkpoints(tc.model_id).result().checkpoints[0].public

    short = tc.save_state("short", ttl_seconds=1).result().path
    rest.set_checkpoint_ttl_from_tinker_path(keep, 3600).result()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[short].expires_at is not None and listed[keep].expires_at is not None
    rest.set_checkpoint_ttl_from_tinker_path(keep, None).result()  # cleared
    time.sleep(1.5)
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert short not in listed and listed[keep].expires_at is None
    with pytest.raises(tinker.NotFoundError):
        service.create_training_client_from_state(short).result()
    folder = server.data_dir / "checkpoints" / tc.model_id / "weights" / "short"
    time.sleep(1.0)  # the reaper runs every 0.3 s here
    assert not folder.exists()
    assert service.create_training_client_from_state(keep).result() is not None


def test_sessions_and_copy_weights(service, rest):
    tc = trained(service)
    path = tc.save_state("to-copy").result().path
    sid = tc.model_id.split(":")[0]
    assert sid in rest.list_sessions(limit=100).result().sessions
    session = rest.get_session(sid).result()
    assert tc.model_id in session.training_run_ids
    copied = rest.copy_weights(path, destination_project_id="p1").result()
    assert copied != path and copied.endswith("/weights/to-copy")
    assert loss_of(service.create_training_client_from_state(copied).result()) == loss_of(tc)


def test_checkpoint_storage_usage_by_project(service, rest, server):
    """AdminClient.get_current_checkpoint_storage_usage (SDK 0.38): the caller's live
    checkpoints, by project, adding up to what list_user_checkpoints shows."""
    tc = trained(service)
    copied = rest.copy_weights(tc.save_state("for-usage").result().path, "usage-p").result()
    admin = tinker.AdminClient(base_url=server.base_url, api_key=API_KEY)
    usage = admin.get_current_checkpoint_storage_usage().result().data
    mine = rest.list_user_checkpoints(limit=1000).result().checkpoints
    assert sum(i.checkpoint_count for i in usage) == len(mine)
    assert sum(i.size_bytes for i in usage) == sum(c.size_bytes for c in mine)
    (project,) = admin.get_current_checkpoint_storage_usage("usage-p").result().data
    assert project.project_id == "usage-p" and project.checkpoint_count == 1
    assert project.size_gigabytes == project.size_bytes / 1e9 > 0
    assert copied.endswith("/weights/for-usage")


def test_the_audit_log_records_checkpoint_and_project_changes(service, rest, server):
    """AdminClient.get_audit_log (SDK 0.38): today's changes to the caller's checkpoints and
    sessions' projects, oldest first; lathe has no teams or organisations."""
    tc = trained(service)
    path = tc.save_state("audited").result().path
    rest.publish_checkpoint_from_tinker_path(path).result()
    rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    rest.delete_checkpoint_from_tinker_path(path).result()
    sid = tc.model_id.split(":")[0]
    rest.assign_session_project(sid, "audit-p").result()
    admin = tinker.AdminClient(base_url=server.base_url, api_key=API_KEY)
    entries = admin.get_audit_log().result().entries
    mine = [e.event for e in entries if e.event_details.get("tinker_path") == path]
    assert mine == [
        "checkpoint_create",
        "checkpoint_publish",
        "checkpoint_ttl_set",
        "checkpoint_delete",
    ]
    assert [e.timestamp for e in entries] == sorted(e.timestamp for e in entries)
    (project,) = [
        e
        for e in admin.get_audit_log("projects").result().entries
        if e.event_details["session_id"] == sid
    ]
    assert (
        project.event == "project_session_set" and project.event_details["project_id"] == "audit-p"
    )
    checkpoints = admin.get_audit_log("checkpoints").result().entries
    assert checkpoints and all(e.event.startswith("checkpoint_") for e in checkpoints)
    assert admin.get_audit_log("teams").result().entries == []
    assert admin.get_audit_log(day=dt.date(2020, 1, 1)).result().entries == []


def test_billing_usage_counts_tokens_and_checkpoints_per_hour(server):
    """AdminClient.get_billing_usage (SDK 0.38): what a session used, in UTC-hour buckets."""
    with tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY) as own:  # its session
        tc = trained(own)  # one forward_backward of 5 tokens
        loss_of(tc)  # a forward of 5 more
        tc.save_state("billed").result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints([5, 9, 13])
        out = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, stop=[])).result()
    sid = tc.model_id.split(":")[0]
    now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    admin = tinker.AdminClient(base_url=server.base_url, api_key=API_KEY)
    usage = admin.get_billing_usage(now - dt.timedelta(hours=1), now + dt.timedelta(hours=1))
    events = [e for e in usage.result().data if e.session_id == sid]
    totals: dict[str, int] = {}
    for e in events:
        info = e.event_info
        totals[info.type] = totals.get(info.type, 0) + getattr(info, "token_count", 0)
        if info.type == "checkpoint":
            totals["checkpoint"] += info.count
        assert e.base_model == BASE and e.bucket_end - e.bucket_start == dt.timedelta(hours=1)
    assert totals["training"] == 10
    assert totals["sampling_prefill"] == 3
    assert totals["sampling_sample"] == sum(len(s.tokens) for s in out.sequences) == 8
    assert totals["checkpoint"] == 1
    with pytest.raises(Exception, match="whole UTC hours"):
        admin.get_billing_usage(now + dt.timedelta(minutes=5), now + dt.timedelta(hours=2)).result()


def test_a_session_trace_shows_its_requests_on_a_track_per_run(service, rest):
    """RestClient.export_session_trace (SDK 0.38): a signed URL of the session's timeline,
    trace-event JSON that Perfetto opens; an altered URL is refused."""
    tc = trained(service)
    sid = tc.model_id.split(":")[0]
    url = rest.export_session_trace(sid).result()
    trace = httpx.get(url, timeout=30)
    assert trace.status_code == 200
    events = trace.json()["traceEvents"]
    tracks = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    mine = [e for e in events if e.get("ph") == "X" and e["tid"] == tracks[tc.model_id]]
    assert [e["name"] for e in mine][-3:] == ["create_model", "forward_backward", "optim_step"]
    assert all(e["dur"] >= 1 and e["args"]["status"] == "done" for e in mine)
    assert httpx.get(url.replace("/trace.json", "/other.json"), timeout=30).status_code == 403
    assert httpx.get(url.replace(sid, "sess-other"), timeout=30).status_code == 403


def tinker_cli(server, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINKER_BASE_URL": server.base_url, "TINKER_API_KEY": API_KEY}
    cmd = [sys.executable, "-c", "from tinker.cli.__main__ import cli; cli()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=cwd)


def test_the_official_cli_lists_and_downloads(service, server, tiny_qwen3, tmp_path):
    import peft
    import transformers

    tc = trained(service)
    path = tc.save_state("for-cli").result().path
    for args in (
        ["run", "list"],
        ["run", "info", tc.model_id],
        ["checkpoint", "list"],
        ["checkpoint", "list", "--run-id", tc.model_id],
    ):
        r = tinker_cli(server, "-f", "json", *args)
        assert r.returncode == 0, r.stderr + r.stdout
        assert tc.model_id in r.stdout, (args, r.stdout)
    r = tinker_cli(server, "checkpoint", "download", path, "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr + r.stdout
    folder = tmp_path / path.replace("tinker://", "").replace("/", "_")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # the download is a PEFT adapter that peft loads onto the Hugging Face base model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    model = peft.PeftModel.from_pretrained(hf, folder).eval()
    ids = DATUM.model_input.to_ints()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    theirs = logp.gather(-1, torch.tensor(DATUM.loss_fn_inputs["target_tokens"].tolist())[:, None])
    ours = tc.forward([DATUM], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    np.testing.assert_allclose(theirs[:, 0].numpy(), ours, atol=1e-4)
    # the temporary export was deleted again
    ids_left = [
        c.checkpoint_id
        for c in tinker.RestClient(base_url=server.base_url, api_key=API_KEY)
        .list_user_checkpoints(limit=1000)
        .result()
        .checkpoints
    ]
    assert not any(c.startswith("external_weights/") for c in ids_left)


def test_sdk_025_minimum_script(server):
    python = ROOT / ".venv-tinker025" / "bin" / "python"
    if not python.exists():
        pytest.fail("the SDK 0.25 environment is missing: run `make .venv-tinker025/.installed`")
    r = subprocess.run(
        [
            str(python),
            str(ROOT / "tests" / "scripts" / "sdk025_minimum.py"),
            server.base_url,
            API_KEY,
            BASE,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TINKER_TELEMETRY": "0"},
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_a_crash_mid_save_loses_nothing_saved(tiny_qwen3, tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("LATHE_FAULTS", "save_delay=2")  # every save waits before its rename
    server = LocalServer({BASE: tiny_qwen3}, data, "--long-poll-seconds", "2")
    try:
        # Not closed: closing would try to reach the server this test kills.
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
        tc = trained(sc)
        safe = tc.save_state("safe").result().path
        expected = loss_of(tc)
        tc.save_state("doomed")  # not awaited: the server dies during it
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    finally:
        server.stop()
    monkeypatch.delenv("LATHE_FAULTS")
    leftovers = list((data / "checkpoints").glob("*/*/.*tmp-*"))
    assert leftovers  # the half-written save is there on disk ...
    with LocalServer({BASE: tiny_qwen3}, data, "--long-poll-seconds", "2") as again:
        assert not list((data / "checkpoints").glob("*/*/.*tmp-*"))  # ... and swept at start
        rest = tinker.RestClient(base_url=again.base_url, api_key=API_KEY)
        model_id = safe.split("/")[2]
        listed = [c.tinker_path for c in rest.list_checkpoints(model_id).result().checkpoints]
        assert listed == [safe]
        with tinker.ServiceClient(base_url=again.base_url, api_key=API_KEY) as sc:
            assert loss_of(sc.create_training_client_from_state(safe).result()) == expected


def test_a_full_disk_is_a_clear_error_and_loses_nothing(tiny_qwen3, tmp_path, monkeypatch):
    data = tmp_path / "data"
    with LocalServer({BASE: tiny_qwen3}, data, "--long-poll-seconds", "2") as server:
        with tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY) as sc:
            tc = trained(sc)
            safe = tc.save_state("safe").result().path
            expected = loss_of(tc)
    monkeypatch.setenv("LATHE_FAULTS", "save_error=ENOSPC")
    with LocalServer({BASE: tiny_qwen3}, data, "--long-poll-seconds", "2") as server:
        with tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY) as sc:
            tc2 = sc.create_training_client_from_state(safe).result()
            with pytest.raises(tinker.RequestFailedError, match="No space left on device"):
                tc2.save_state("safe", ttl_seconds=None).result()
            with pytest.raises(tinker.RequestFailedError, match="No space left"):
                tc2.save_state("another").result()
            assert loss_of(sc.create_training_client_from_state(safe).result()) == expected
            rest = tinker.RestClient(base_url=server.base_url, api_key=API_KEY)
            assert [
                c.tinker_path
                for c in rest.list_checkpoints(safe.split("/")[2]).result().checkpoints
            ] == [safe]


def test_a_corrupted_checkpoint_is_refused_by_its_sha256(service, server, tiny_qwen3):
    """A byte flipped on disk: loading the checkpoint (to train or to sample) fails with a
    clear error naming the damaged file; the server serves on and the other checkpoint of
    the run still loads."""
    tc = trained(service)
    good = tc.save_state("good").result().path
    bad = tc.save_state("bad").result().path
    sampler = tc.save_weights_for_sampler("bad-sampler").result().path
    expected = loss_of(tc)
    folders = {p: checkpoint_folder(server, p) for p in (bad, sampler)}
    for folder in folders.values():
        weights = folder / "adapter_model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[-1] ^= 0xFF
        weights.write_bytes(bytes(raw))
    with pytest.raises(tinker.RequestFailedError, match="damaged: adapter_model.safetensors"):
        service.create_training_client_from_state(bad).result()
    with pytest.raises(Exception, match="damaged: adapter_model.safetensors"):
        sampling = service.create_sampling_client(model_path=sampler)
        sampling.sample(
            types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2)
        ).result()
    assert loss_of(service.create_training_client_from_state(good).result()) == expected


def checkpoint_folder(server, path: str):  # noqa: ANN001, ANN201
    """Where the server keeps a checkpoint (the layout of store/tinker_paths.py)."""
    tp = tinker_paths.parse(path)
    return tinker_paths.checkpoint_dir(
        server.data_dir / "checkpoints", tp.model_id, tp.kind, tp.name
    )

"""Memory of a forward_backward with a real vocabulary: lathe never holds the whole logits.

A tiny Qwen3-shaped model (2 layers, hidden 64) with Qwen3's 151,936-token vocabulary, so the
logits dominate: 4,096 positions of fp32 logits are 2.5 GB, 32,768 positions 20 GB. lathe
runs a 32,768-token forward_backward (8 datums of 4,096 tokens) through the tinker SDK; the
baseline, a `transformers` + `peft` step that computes the full logits and their loss as a
training loop would, runs 4,096 tokens in a process of its own (32,768 would need ~20 GB).
Each prints the rise of its process's peak resident memory (VmHWM) over its size after a
small warm-up step.

    python bench/logits_memory.py [--lathe-tokens 32768] [--baseline-tokens 4096]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from lathe.local_server import LOCAL_API_KEY, LocalServer
from lathe.testing.tiny_models import TinyModelSpec, make_tiny

DATUM_TOKENS = 4096  # tokens per datum (and the model's context)
SPEC = TinyModelSpec(
    family="qwen3",
    num_layers=2,
    hidden_size=64,
    vocab_size=151_936,
    max_position_embeddings=DATUM_TOKENS,
    seed=0,
)
NAME = "tiny-qwen3-vocab151936"
GIB = 2**30


def memory_kib(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def datums(tokens: int, seed: int) -> list:
    from tinker import types

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(max(1, tokens // DATUM_TOKENS)):
        row = rng.integers(0, SPEC.vocab_size, size=min(tokens, DATUM_TOKENS) + 1)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(row[:-1].tolist()),
                loss_fn_inputs={"target_tokens": row[1:].tolist()},
            )
        )
    return out


def engine_pid(server: LocalServer) -> int:
    """The engine's own process (a child of `lathe serve`, started by one of its threads)."""
    engines = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if ppid == server.proc.pid and b"lathe.engine" in cmdline:
            engines.append(int(stat.parent.name))
    assert len(engines) == 1, engines
    return engines[0]


def lathe_rise(model_dir: Path, tokens: int) -> float:
    """Peak rise in GiB of the engine process for one forward_backward of `tokens` tokens
    through the SDK."""
    import tinker

    with tempfile.TemporaryDirectory() as tmp, LocalServer({NAME: model_dir}, Path(tmp)) as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            tc = sc.create_lora_training_client(base_model=NAME, rank=16, seed=0).result()
            tc.forward_backward(datums(64, 0), "cross_entropy").result()  # warm-up
            pid = engine_pid(srv)
            idle = memory_kib(pid, "VmRSS")
            tc.forward_backward(datums(tokens, 1), "cross_entropy").result()
            peak = memory_kib(pid, "VmHWM")
    return (peak - idle) / 2**20


BASELINE = """
import sys, numpy as np, peft, torch, transformers
model_dir, tokens = sys.argv[1], int(sys.argv[2])
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
rng = np.random.default_rng(1)
def step(n):
    row = torch.from_numpy(rng.integers(0, model.config.vocab_size, size=n + 1))
    logits = model(input_ids=row[None, :-1]).logits.float()  # (1, n, V): the whole logits
    loss = torch.nn.functional.cross_entropy(logits[0], row[1:], reduction="sum")
    loss.backward()
    return float(loss)
step(64)  # warm-up
idle = status("VmRSS")
step(tokens)
print((status("VmHWM") - idle) / 2**20)
"""


def baseline_rise(model_dir: Path, tokens: int) -> float:
    """Peak rise in GiB of a transformers + peft forward_backward of `tokens` tokens, in a
    process of its own."""
    out = subprocess.run(
        [sys.executable, "-c", BASELINE, str(model_dir), str(tokens)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lathe-tokens", type=int, default=32_768)
    parser.add_argument("--baseline-tokens", type=int, default=4096)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / NAME, SPEC)
        baseline = baseline_rise(model_dir, args.baseline_tokens)
        rise = lathe_rise(model_dir, args.lathe_tokens)
    logits_gib = args.baseline_tokens * SPEC.vocab_size * 4 / GIB
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"model: Qwen3-shaped, 2 layers, hidden 64, vocabulary {SPEC.vocab_size:,}")
    print("| setup | tokens | peak memory rise (GiB) |")
    print("|---|---:|---:|")
    print(
        f"| transformers + peft, full logits ({logits_gib:.1f} GiB of fp32 logits alone) "
        f"| {args.baseline_tokens:,} | {baseline:.2f} |"
    )
    print(f"| lathe via tinker SDK, chunked logits | {args.lathe_tokens:,} | {rise:.2f} |")


if __name__ == "__main__":
    main()

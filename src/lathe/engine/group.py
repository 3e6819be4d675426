"""The engine as a torch.distributed group: N processes on this machine, every step in lockstep.

`lathe serve --ranks N`: rank 0 is the engine process the API talks to (engine/process.py);
it starts ranks 1..N-1 (`python -m lathe.engine.group`), and all of them join one process
group (gloo on CPUs, NCCL on GPUs, where rank r uses cuda:r). Each rank loads the base
models and shards them with FSDP2 (`fully_shard` per decoder layer, then the rest): a rank
keeps 1/N of the frozen weights and all-gathers a layer's for the moment it runs it, so a
base model N times larger than one device fits. Rank 0's scheduler decides every step as
before; the step's work goes to every rank (MessagePack, protocol/codec.py, over a gloo
group: nothing is pickled). Training splits each request's datums across the ranks and
all-reduces the adapters' gradients (engine/data_parallel.py); everything else every rank
runs whole. LoRA adapters, their gradients and AdamW state are replicated: every rank holds
the same numbers. Only rank 0 answers the API and writes checkpoint files.

On several machines, torchrun starts every rank (`lathe engine` under torchrun, see
client/group_engine.py): the group joins through torchrun's environment ("env://") and
rank 0 serves the API replicas.

What the group does not do yet: split sampling across ranks (per-rank batches or tensor
parallelism); every rank decodes every sequence, gathering each layer's weights each step.

Determinism across ranks: the only randomness of the engine is an unseeded adapter's
initialisation and an unseeded sample's random stream; rank 0 draws their seeds before the
step leaves it. A rank that dies takes the group down (rank 0 exits; the API restarts it).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import secrets
import subprocess
import sys
import threading
import time

import msgspec
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from lathe.engine.scheduler import Step
from lathe.protocol import codec
from lathe.protocol import messages as m

log = logging.getLogger("lathe.engine")

# A collective of a step that waits longer than this means a rank is gone (steps are shorter).
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=30)
# The other ranks wait for rank 0's next step as long as the engine stays idle.
IDLE_TIMEOUT = dt.timedelta(days=365)
STOP = -1  # the frame size that tells the other ranks to stop


def rank_device(device: str, local_rank: int) -> str:
    """A rank's device: local rank r of a CUDA group uses cuda:r; CPU ranks share the CPU."""
    return f"cuda:{local_rank}" if device.startswith("cuda") else "cpu"


class Group:
    """This process's place in the engine group, and the channel rank 0 sends steps on."""

    def __init__(
        self, rank: int, world: int, device: str, init_method: str, local_rank: int | None = None
    ) -> None:
        """init_method: "tcp://127.0.0.1:PORT" for ranks on this machine, "env://" under
        torchrun; local_rank: the rank on this machine (default: `rank`)."""
        self.rank, self.world = rank, world
        self.device = rank_device(device, rank if local_rank is None else local_rank)
        if self.device.startswith("cuda"):
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=COLLECTIVE_TIMEOUT,
        )
        # Steps travel as bytes on the host, whatever the devices' backend; between steps the
        # other ranks wait on this group for as long as the engine is idle.
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.mesh = init_device_mesh(torch.device(self.device).type, (world,))

    @classmethod
    def from_torchrun(cls, device: str) -> Group:
        """This rank of a group torchrun started, on one machine or several."""
        env = os.environ
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        return cls(rank, world, device, "env://", local)

    @property
    def writes_files(self) -> bool:
        return self.rank == 0

    def shard(self, module: nn.Module) -> None:
        """Shard a base model's frozen weights across the ranks (FSDP2)."""
        for block in module.model.layers:
            fully_shard(block, mesh=self.mesh)
        fully_shard(module, mesh=self.mesh)
        register_fsdp_forward_method(module, "hidden_states")  # the engine's entry point

    def parameters_per_rank(self, modules: list[nn.Module]) -> list[int]:
        """How many base-model weights each rank holds (its shards)."""
        mine = sum(
            getattr(p, "to_local", lambda p=p: p)().numel()
            for module in modules
            for p in module.parameters()
        )
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
        dist.all_gather(counts, torch.tensor([mine]), group=self.control)
        return [int(c) for c in counts]

    # --- steps: rank 0 sends, the others follow -------------------------------------------

    def share(self, step: Step) -> Step:
        """Rank 0: the step with every seed drawn, sent to every other rank."""
        step = with_seeds(step)
        self._broadcast(encode_step(step))
        return step

    def stop(self) -> None:
        """Rank 0: tell the other ranks to stop."""
        self._broadcast(None)

    def receive(self) -> Step | None:
        """Ranks 1..N-1: the next step from rank 0, or None when the group stops."""
        size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, 0, group=self.control)
        if int(size) == STOP:
            return None
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, 0, group=self.control)
        return decode_step(data.numpy().tobytes())

    def _broadcast(self, frame: bytes | None) -> None:
        size = torch.tensor([STOP if frame is None else len(frame)], dtype=torch.long)
        dist.broadcast(size, 0, group=self.control)
        if frame is not None:
            data = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
            dist.broadcast(data, 0, group=self.control)

    def gather_bytes(self, frame: bytes) -> list[bytes]:
        """Every rank's `frame`, on rank 0 in rank order (elsewhere an empty list)."""
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(frame)]), group=self.control)
        longest = max(int(s) for s in sizes)
        data = torch.zeros(longest, dtype=torch.uint8)
        data[: len(frame)] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
        gathered = [torch.empty_like(data) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(data, gathered, dst=0, group=self.control)
        if gathered is None:
            return []
        return [g[: int(s)].numpy().tobytes() for g, s in zip(gathered, sizes, strict=True)]

    def close(self) -> None:
        dist.destroy_process_group()


def with_seeds(step: Step) -> Step:
    """The step with a seed drawn for every unseeded adapter initialisation and sample, so
    that every rank computes the same numbers."""

    def seeded(work: m.Work) -> m.Work:
        req = work.request
        if isinstance(req, m.CreateModelRequest) and req.seed is None:
            req = dataclasses.replace(req, seed=secrets.randbits(63))
        elif isinstance(req, m.SampleRequest) and req.params.seed is None:
            params = dataclasses.replace(req.params, seed=secrets.randbits(63))
            req = dataclasses.replace(req, params=params)
        return work if req is work.request else dataclasses.replace(work, request=req)

    return Step(
        batch=[seeded(w) for w in step.batch],
        refuse=step.refuse,
        admit=[seeded(w) for w in step.admit],
        decode=step.decode,
    )


def encode_step(step: Step) -> bytes:
    return msgspec.msgpack.encode(
        [
            [codec.encode_work(w) for w in step.batch],
            [[codec.encode_work(w), why] for w, why in step.refuse],
            [codec.encode_work(w) for w in step.admit],
            step.decode,
        ]
    )


def decode_step(frame: bytes) -> Step:
    batch, refuse, admit, decode = msgspec.msgpack.decode(frame)

    def work(raw: bytes) -> m.Work:
        kind, decoded = codec.decode(raw)
        assert kind == "work"
        return decoded

    return Step(
        batch=[work(w) for w in batch],
        refuse=[(work(w), why) for w, why in refuse],
        admit=[work(w) for w in admit],
        decode=bool(decode),
    )


# --- starting the group ---------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(spec: m.EngineSpec, port: int) -> list[subprocess.Popen]:
    """Rank 0: start ranks 1..N-1 as processes of their own, each given the spec."""
    procs = []
    for rank in range(1, spec.ranks):
        args = [sys.executable, "-m", "lathe.engine.group", str(port), str(rank), str(os.getpid())]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(codec.encode_spec(spec))
        proc.stdin.close()
        procs.append(proc)
    return procs


def watch_ranks(procs: list[subprocess.Popen], serving: threading.Event) -> None:
    """Rank 0: if another rank dies while the group serves, the group cannot go on: exit, so
    that the API restarts it (its collectives would otherwise wait for the dead rank)."""

    def watch() -> None:
        while serving.is_set():
            for proc in procs:
                if proc.poll() is not None and serving.is_set():
                    log.error("engine rank exited (code %s); the group stops", proc.returncode)
                    os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="lathe-ranks", daemon=True).start()


def follow(spec: m.EngineSpec, group: Group) -> None:
    """Ranks 1..N-1: build the same engine, run the steps rank 0 sends until it stops."""
    from lathe.engine.build import build_engine

    runner = build_engine(spec, group).runner
    while (step := group.receive()) is not None:
        runner.execute(step)
    group.close()


def main(argv: list[str]) -> int:
    """Ranks 1..N-1 started by rank 0 on this machine (`lathe serve --ranks N`)."""
    from lathe.engine.process import die_with_parent

    port, rank, parent = (int(a) for a in argv)
    die_with_parent()
    if os.getppid() != parent:
        return 1
    logging.basicConfig(
        level=os.environ.get("LATHE_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s engine-rank{rank}[%(process)d] %(name)s: %(message)s",
    )
    spec = codec.decode_spec(sys.stdin.buffer.read())
    follow(spec, Group(rank, spec.ranks, spec.device, f"tcp://127.0.0.1:{port}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

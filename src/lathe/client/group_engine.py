"""`lathe engine` under torchrun: an engine group spanning several machines.

torchrun starts the same command on every machine (see README, "Running on several GPUs and
machines"); each process joins the group from torchrun's environment (engine/group.py).
Rank 0 builds its engine on a thread of this process and serves it to the API replicas
(client/engine_service.py); every other rank builds the same engine and runs the steps rank 0
sends. A rank that dies stops the group; torchrun's --max-restarts starts it again, and the
replicas, which fail their in-flight requests retryably while the service is silent, connect
again by themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from lathe.client.engine_service import EngineService
from lathe.client.in_process import InProcessEngine
from lathe.engine.group import Group, follow
from lathe.protocol import messages as m

log = logging.getLogger(__name__)


def run_rank(spec: m.EngineSpec, listen: str, secret: bytes, stop: threading.Event) -> None:
    """This process's part of the group torchrun started, until rank 0 is told to stop."""
    group = Group.from_torchrun(spec.device)
    spec = dataclasses.replace(spec, ranks=group.world)
    log.info("engine rank %d of %d on %s", group.rank, group.world, group.device)
    if group.rank > 0:
        follow(spec, group)
        return
    EngineService(InProcessEngine(spec, group), listen, secret).run(stop)
    group.close()  # the engine's thread told the other ranks to stop as it ended

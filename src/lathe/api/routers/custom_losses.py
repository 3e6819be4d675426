"""Server-side custom losses (SDK 0.38 `create_custom_loss`): see api/custom_loss_work.py."""

from __future__ import annotations

from fastapi import APIRouter

from lathe.api import custom_loss_work
from lathe.api import responses as r
from lathe.api import schemas as s
from lathe.api.deps import CallerDep

router = APIRouter(tags=["custom losses"])


@router.post("/create_custom_loss")
def create_custom_loss(body: s.CreateCustomLoss, caller: CallerDep) -> r.Queued:
    return custom_loss_work.create_custom_loss(caller, body)

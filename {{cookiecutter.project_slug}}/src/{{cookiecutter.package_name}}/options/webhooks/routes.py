"""The inbound webhook route: what a verified partner message does (an example to replace).

Layer 4 (options/webhooks/authenticator.py) has verified the signature, the timestamp and that the id is new
before this runs; the body it read is replayed here and parsed only now. The example records the
message (partner, id, type) once and answers 204: a retry of a message already recorded (after the
replay window) finds its row and is answered 204 again. If the body fails validation or recording
fails, the id is forgotten (`verified_webhook`) so that the sender's corrected or retried delivery
is not refused as a replay.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError

from ...db import SessionDep
from ...security.authz import no_object_policy
from ...security.errors import PROBLEM_RESPONSES, ProblemDetail
from ...security.events import security_event
from ...security.principal import Principal
from ...store.core import StoreBusy, StoreUnavailable
from .authenticator import PARTNER_PATTERN, STATE_KEY, WEBHOOK_PATH, WEBHOOK_SCOPE, VerifiedWebhook
from .models import WebhookEvent

router = APIRouter(prefix=WEBHOOK_PATH.rstrip("/"), tags=["webhooks"], responses=PROBLEM_RESPONSES)


class WebhookPayload(BaseModel):
    """The Standard Webhooks payload shape: `type`, and the event's `data` (any other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    data: dict[str, object] = Field(default_factory=dict)


async def verified_webhook(
    request: Request,
    partner: Annotated[str, Path(pattern=PARTNER_PATTERN, max_length=63)],
    principal: Annotated[Principal, no_object_policy(scopes=[WEBHOOK_SCOPE])],
) -> AsyncIterator[VerifiedWebhook]:
    """The message layer 4 verified for this partner: a principal of another credential type
    (an API key or a token that happens to carry the scope) is refused here.

    A message that is not handled (its body fails validation: 400; recording it fails: 503) has its
    id forgotten on the way out, so the sender's corrected or retried delivery is not a replay."""
    webhook = request.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(webhook, VerifiedWebhook) or webhook.partner != partner:
        security_event("webhook_route_without_signature", partner=partner)
        raise HTTPException(403, ProblemDetail("Only a signed webhook of this partner is accepted here."))
    try:
        yield webhook
    except BaseException:
        with contextlib.suppress(StoreUnavailable, StoreBusy):  # the original error is what matters
            await webhook.release()
        security_event("webhook_not_handled", partner=webhook.partner, webhook_id=webhook.id)
        raise


@router.post("/{partner}", status_code=204, response_class=Response, summary="Receive a partner's signed webhook")
async def receive_webhook(
    payload: WebhookPayload,
    webhook: Annotated[VerifiedWebhook, Depends(verified_webhook)],
    session: SessionDep,
) -> Response:
    session.add(WebhookEvent(partner=webhook.partner, webhook_id=webhook.id, type=payload.type))
    duplicate = False
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        duplicate = True  # recorded before, by an earlier delivery of the same message
    security_event(
        "webhook_received",
        level=logging.INFO,
        partner=webhook.partner,
        webhook_id=webhook.id,
        type=payload.type,
        duplicate=duplicate,
    )
    return Response(status_code=204)

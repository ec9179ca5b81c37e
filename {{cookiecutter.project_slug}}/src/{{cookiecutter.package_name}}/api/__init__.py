"""The example domain of the seed: orgs, their grants and their users."""

from fastapi import APIRouter

from ..security.errors import PROBLEM_RESPONSES
from . import orgs, users

router = APIRouter(prefix="/api/v1", responses=PROBLEM_RESPONSES)
router.include_router(orgs.router)
router.include_router(users.router)

"""The garbage collector is tuned while a service runs (runtime._ServiceGc) and restored when the
last service of the process stops, however their lifespans overlap."""

from __future__ import annotations

import gc
from collections.abc import Callable

from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.runtime import GC_YOUNG_THRESHOLD, Runtime


async def test_tuned_while_services_run_and_restored_after_the_last(settings_for: Callable[..., Settings]) -> None:
    before = gc.get_threshold()
    first = Runtime.create(settings_for()).lifespan(None)
    second = Runtime.create(settings_for()).lifespan(None)
    await first.__aenter__()
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
    assert gc.get_freeze_count() > 0  # what existed at start is out of the collector's way
    await second.__aenter__()
    await first.__aexit__(None, None, None)  # the first to start stops first
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD  # the second one still runs
    assert gc.get_freeze_count() > 0
    await second.__aexit__(None, None, None)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0

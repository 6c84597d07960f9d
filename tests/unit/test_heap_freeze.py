"""The server process freezes what its start-up left, so full garbage collections do not stall the event loop."""

from __future__ import annotations

import gc

from server.app import _freeze_heap


def test_freezing_moves_the_heap_out_of_the_collectors_sight() -> None:
    try:
        _freeze_heap()
        assert gc.get_freeze_count() > 1000, "the modules and objects alive now are frozen"
    finally:
        gc.unfreeze()  # the test process goes on collecting as before

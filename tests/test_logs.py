"""Log set-up: what reaches the admin's log and what does not."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from konfuzio_watch.logs import configure_logging


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in logging.root.manager.loggerDict})
    stream = io.StringIO()
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_waitress_queue_depth_is_not_a_warning_in_the_daemons_log(log_stream, level):
    """A callback that waits a moment for a free server thread is no fault: Waitress's "Task queue depth
    is 1" made a busy daemon's log look troubled (and tests counting warnings flaky)."""
    configure_logging("human", level, stream=log_stream)
    logging.getLogger("waitress.queue").warning("Task queue depth is %d", 1)
    logging.getLogger("waitress").warning("a real server problem")
    logging.getLogger("konfuzio_watch").warning("a fact the admin must read")
    text = log_stream.getvalue()
    assert "Task queue depth" not in text
    assert "a real server problem" in text and "a fact the admin must read" in text

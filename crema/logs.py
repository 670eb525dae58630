"""`logging` for crema, set up once per process: the level from ``--log-level`` or ``$CREMA_LOG_LEVEL`` (INFO).

Stage drivers call :func:`configure` when a command starts, and Ray Train workers when their loop starts
(their lines reach ``ray job logs`` through Ray's log forwarding). Library modules only ever
``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_LEVEL = "CREMA_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_crema_handler"


def level_name(level: str | int | None = None) -> str:
    """The level asked for (argument, else $CREMA_LOG_LEVEL, else INFO), checked."""
    value = level if level is not None else os.environ.get(ENV_LEVEL) or "INFO"
    name = logging.getLevelName(value) if isinstance(value, int) else str(value).upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ValueError(f"unknown log level {value!r}; use DEBUG, INFO, WARNING or ERROR")
    return name


def configure(level: str | int | None = None) -> None:
    """One handler on the "crema" logger (stderr, timestamped, not propagated to the root logger); calling
    again only changes the level."""
    logger = logging.getLogger("crema")
    logger.setLevel(level_name(level))
    if not any(getattr(h, _MARK, False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
        # Not again through the root logger's handlers (Ray's, in a worker): one line per message.
        logger.propagate = False

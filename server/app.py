"""facefl ServerApp: reads the run config once and hands over to ``server.federation.run_federation``."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.federation import run_federation


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """A ServerApp reading the run config from Flower's context, with ``overrides`` on top."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        _log_to_run_output()
        run_federation(grid, RunConfig.from_mapping({**dict(context.run_config), **(overrides or {})}))

    return server_app


def _log_to_run_output() -> None:
    """In a deployment the ServerApp is a process of its own whose output is the run's log (`flwr log RUN_ID`):
    facefl's progress lines (rounds, sites left out, timeouts) go there. `facefl simulate` set up its own."""
    logger = logging.getLogger("facefl")
    if logger.handlers:
        return
    handler = logging.StreamHandler()  # sys.stderr as Flower has redirected it into the run's log
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


app = make_server_app()

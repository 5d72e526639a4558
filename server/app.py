"""facefl ServerApp: reads the run config once and hands over to ``server.federation.run_federation``."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.federation import run_federation


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """A ServerApp reading the run config from Flower's context, with ``overrides`` on top."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, RunConfig.from_mapping({**dict(context.run_config), **(overrides or {})}))

    return server_app


app = make_server_app()

"""facefl ClientApp: a site. Dispatches Flower's train messages to ``client.messages`` (plain and SecAgg+ rounds).

Only Flower and the light secure-aggregation mod are imported here: in a deployment every message starts a new
ClientApp process, and the SecAgg+ key-exchange and unmasking steps need no torch."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.secagg_mod import is_secure, requires_secure_aggregation, secure_aggregation_mod
from common.config import RunConfig


def make_client_app(overrides: dict | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp reading the run config from Flower's context, with ``overrides`` on top
    (``facefl simulate`` passes its options this way). ``mods`` run inside the secure-aggregation mod, so they see
    a site's plain reply before it is masked."""
    client_app = ClientApp()

    @client_app.train(mods=[secure_aggregation_mod, *(mods or [])])
    def _train(msg: Message, context: Context) -> Message:
        from client import messages  # torch, Opacus and the models: only for a round that trains

        cfg = RunConfig.from_mapping({**dict(context.run_config), **(overrides or {})})
        if is_secure(msg):
            return messages.secure_train_round(msg, context, cfg)
        if requires_secure_aggregation(dict(context.node_config)):
            raise PermissionError("This site takes part only in securely aggregated rounds "
                                  "(require-secure-aggregation); start the run with secure-aggregation=true.")
        return messages.train_round(msg, context, cfg)

    return client_app


app = make_client_app()

"""The ClientApp's secure-aggregation mod, kept free of torch so that the SecAgg+ steps that do not train (key
exchange, unmasking: one short-lived ClientApp process each in a deployment) start in well under a second.

Messages that carry a ``secaggplus_configs`` record go through Flower's ``secaggplus_mod``; in its masking stage it
calls the site's train handler, which trains and answers with the update (``client.secure``), and masks that. Masks
are expanded with ``common.secagg.mask_stream`` (installed here and on the server)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common.secagg import use_strong_masks

REQUIRE_KEY = "require-secure-aggregation"  # node config: refuse rounds that are not securely aggregated

use_strong_masks()


def is_secure(msg: Message) -> bool:
    """Whether ``msg`` is a step of the SecAgg+ protocol."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def requires_secure_aggregation(node_config: dict) -> bool:
    return str(node_config.get(REQUIRE_KEY, "false")).lower() in ("true", "1", "yes")


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; plain rounds go straight to the handler."""
    if is_secure(msg):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)

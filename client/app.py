"""facefl ClientApp: a site. Translates Flower messages to and from ``client.site.run_round``."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy import PrivacyLedger
from client.site import RoundResult, Site, SiteState, run_round
from common.config import RunConfig
from common.egress import array_signature, check_reply

log = logging.getLogger("facefl.client")

_LEDGER_KEY = "privacy-ledger"
_HEAD_KEY = "margin-head"
_DISC_KEY = "discriminator"


def _node_state(context: Context) -> SiteState:
    state = context.state
    ledger = None
    if _LEDGER_KEY in state.config_records:
        ledger = PrivacyLedger.from_json(str(state.config_records[_LEDGER_KEY]["json"]))
    head = state.array_records[_HEAD_KEY].to_torch_state_dict() if _HEAD_KEY in state.array_records else None
    disc = state.array_records[_DISC_KEY].to_torch_state_dict() if _DISC_KEY in state.array_records else None
    return SiteState(ledger, head, disc)


def _save_node_state(context: Context, site_state: SiteState) -> None:
    if site_state.ledger is not None:
        context.state.config_records[_LEDGER_KEY] = ConfigRecord({"json": site_state.ledger.to_json()})
    if site_state.head is not None:
        context.state.array_records[_HEAD_KEY] = ArrayRecord(site_state.head)
    if site_state.discriminator is not None:
        context.state.array_records[_DISC_KEY] = ArrayRecord(site_state.discriminator)


def make_client_app(overrides: dict | None = None) -> ClientApp:
    """A ClientApp reading the run config from Flower's context, with ``overrides`` on top
    (``facefl simulate`` passes its options this way)."""
    client_app = ClientApp()

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **(overrides or {})})
        return train_round(msg, context, cfg)

    return client_app


def train_round(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train on this site's faces for one round (or decline when the privacy budget would be exceeded)."""
    config = msg.content["config"]
    site = Site.from_node_config(dict(context.node_config), default_state_root=str(config["state-root"]))
    global_arrays: ArrayRecord = msg.content["arrays"]
    result: RoundResult = run_round(cfg, site, global_arrays.to_torch_state_dict(), int(config["round"]),
                                    _node_state(context))
    _save_node_state(context, result.site_state)
    # A declining site sends back the weights it received (they carry no information about its data);
    # the server drops declined replies before aggregating.
    arrays = global_arrays if result.state is None else ArrayRecord(result.state)
    content = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord(result.metrics),
        "site": ConfigRecord({"name": site.name, "message": result.message, "audit-head": result.audit_head}),
    })
    # Every reply passes the egress check: exactly the model arrays the server sent, and no image that did not
    # come through the anonymization gate.
    check_reply(content, sent_arrays=array_signature(global_arrays))
    return Message(content=content, reply_to=msg)


app = make_client_app()

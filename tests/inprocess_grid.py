"""A Flower ``Grid`` that delivers each message to a real ClientApp in this process: only the transport is
replaced. Every message and reply is kept, so a test can look at exactly what the server received; a node can be
made to drop out from a given protocol step on (its messages are never delivered, as if it had died)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SUPERLINK_NODE_ID = 1


class InProcessGrid(Grid):
    def __init__(self, client_app, node_configs: dict[int, dict], run_config: dict,
                 drop: Callable[[int, Message], bool] | None = None) -> None:
        self._run = Run.create_empty(run_id=7)
        # What Flower's runtime sets in a ServerApp process (messages are stamped with it).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
        self.client_app = client_app
        self.contexts = {nid: Context(run_id=7, node_id=nid, node_config=dict(nc), state=RecordDict(),
                                      run_config=dict(run_config)) for nid, nc in node_configs.items()}
        self.drop = drop or (lambda node, msg: False)
        self.dropped: set[int] = set()
        self.exchanges: list[tuple[Message, Message | None]] = []  # (message sent, reply received or None)
        self.timeouts: list[float | None] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid in self.contexts if nid not in self.dropped]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self.timeouts.append(timeout)
        replies = []
        for msg in messages:
            meta = msg.metadata.__dict__
            meta["_message_id"] = uuid4().hex
            meta["_run_id"] = self._run.run_id
            meta["_src_node_id"] = SUPERLINK_NODE_ID
            node = msg.metadata.dst_node_id
            if node in self.dropped or self.drop(node, msg):
                self.dropped.add(node)
                self.exchanges.append((msg, None))
                continue
            try:  # each side gets its own copy, as over a wire
                reply = copy.deepcopy(self.client_app(copy.deepcopy(msg), self.contexts[node]))
            except Exception as exc:  # as Flower's runtime does: the exception becomes an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.exchanges.append((msg, reply))
            replies.append(reply)
        return replies

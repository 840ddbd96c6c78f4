"""The project's Flower ClientApp: MEKD's handlers (`mekd_fl.client.handlers`) over simulated nodes.

It is one user of the public client API, like any Flower project: each node's EdgeClient gets the
node's images, the run's student architecture and the message's settings. Every setting a client
needs arrives in the message's ConfigRecord, and only those (the server sends
`RunConfig.client_dict()` plus the strategy's own keys). In a simulation, the message's `shard`
record says which images of the data set files are this node's own; the node reads the files itself
from its data folder (`make_client_app(data_dir)`, else the node-config or run-config `data-dir`,
else the default locations). Under the Deployment Engine with `client-data=node-config`, no shard
comes: the SuperNode's node-config `partition-id` / `num-partitions` names its partition, and the node
derives it from the run config's split (`node_config_data`). Its evaluate handler measures the global
student on the node's held-out split (labels are read only there).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from mekd_fl.augment import FLIP_SAFE
from mekd_fl.client.edge import EdgeClient, EdgeSettings
from mekd_fl.client.handlers import STATE_KEYS, Handler, mekd_handlers, register_handlers, reply
from mekd_fl.config import RunConfig
from mekd_fl.data.local import LocalData, shard_data
from mekd_fl.device import limit_threads, pick_device
from mekd_fl.models.classifier import build_model
from strategies import protocol as P

#: The node's own partition under `client-data=node-config` (indices), and the settings that cut it.
PARTITION_STATE, PARTITION_KEY = "mekd-partition", "mekd-partition-of"


def _data_dir(own: str, context: Context) -> str:
    return str(own or context.node_config.get("data-dir", "") or context.run_config.get("data-dir", "") or "")


def _forget_other_runs(context: Context, run_name: str) -> None:
    """Drop emulator, answers and method state left by another run on this node.

    Under `flwr run` every run has a fresh context; a sweep that runs many configurations in one
    simulation does not, and a CAN discriminator or cached answers from the previous cell must not
    leak into the next one.
    """
    current = context.state.config_records.get("mekd-run")
    if current is not None and current["run-name"] == run_name:
        return
    for key in STATE_KEYS:
        if key in context.state:
            del context.state[key]
    context.state["mekd-run"] = ConfigRecord({"run-name": run_name})


def node_config_data(context: Context, data_dir: str = "") -> tuple[int, LocalData]:
    """A SuperNode's data when the server sends no shard (`client-data=node-config`): the partition its
    node-config names (`partition-id`, `num-partitions`), cut from its own copy of the data files by the
    split the run config defines (`run_data`, the same function the server splits with)."""
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "no 'shard' record and no partition-id / num-partitions in the node-config: start the SuperNode "
            'with --node-config "partition-id=I num-partitions=N" (client-data=node-config), or let the '
            "server send shards (client-data=shard)"
        )
    from mekd_fl.run_data import data_key, run_data  # the server's split; simulations never need it

    run = RunConfig.from_mapping(dict(context.run_config), validate=False)
    run = run.replace(data_dir=_data_dir(data_dir, context))
    partition, count = int(node["partition-id"]), int(node["num-partitions"])
    if count != run.num_clients or not 0 <= partition < count:
        raise ValueError(
            f"node-config partition-id={partition} num-partitions={count} does not fit the run's "
            f"num-clients={run.num_clients}: expected num-partitions={run.num_clients} and 0 <= partition-id < it"
        )
    # Cutting the split means loading the whole data set and partitioning it (4.8 s for Fashion-MNIST),
    # and the Deployment Engine starts a fresh process for every message: the node keeps its own
    # partition's indices in its state (which stays on the node) under the settings that define them.
    key = f"{data_key(run)!r} partition {partition}"
    own = context.state.array_records.get(PARTITION_STATE)
    made_by = context.state.config_records.get(PARTITION_KEY)
    if own is None or made_by is None or made_by.get("key") != key:
        split = run_data(run).split
        train, test = split.client_train[partition], split.client_test[partition]
        indices = {"train": Array(np.asarray(train)), "test": Array(np.asarray(test))}
        context.state[PARTITION_STATE] = ArrayRecord(indices)
        context.state[PARTITION_KEY] = ConfigRecord({"key": key})
    else:
        train, test = own["train"].numpy(), own["test"].numpy()
    return partition, shard_data(run.dataset, run.data_dir, train, test)


def _node(message: Message, context: Context, data_dir: str) -> tuple[EdgeClient, LocalData]:
    """This node's EdgeClient under the message's settings, and its local data (from its shard)."""
    limit_threads()
    raw = {k: v for k, v in dict(message.content[P.CONFIG]).items() if k not in P.STRATEGY_KEYS}
    cfg = RunConfig.from_mapping(raw, validate=False)  # server-only fields keep their defaults, unused here
    shard = message.content.array_records.get(P.SHARD)
    if shard is not None:
        partition = int(shard[P.PARTITION].numpy())
        local = shard_data(
            cfg.dataset, _data_dir(data_dir, context), shard[P.TRAIN_INDEX].numpy(), shard[P.TEST_INDEX].numpy()
        )
    else:
        partition, local = node_config_data(context, data_dir)
    _forget_other_runs(context, cfg.run_name)
    edge = EdgeClient(
        local.images,
        lambda: build_model(cfg.student_arch, local.num_classes, local.image_shape, local.mean, local.std),
        settings=EdgeSettings.from_config(raw),
        num_classes=local.num_classes,
        client_id=partition,
        device=pick_device(cfg.device),
        mirror_views=cfg.dataset in FLIP_SAFE,
        labels=local.labels,
    )
    return edge, local


def make_client_app(data_dir: str = "", wrap: Callable[[Handler], Handler] | None = None) -> ClientApp:
    """The project's ClientApp.

    `data_dir` is where this node reads the data set files (empty: node-config or run-config
    `data-dir`, else the default locations). `wrap`, when given, wraps every handler (the chaos tests
    inject crashes and poisoned replies with it; a deployment could log or rate-limit).
    """

    def evaluate(message: Message, context: Context) -> Message:
        edge, local = _node(message, context, data_dir)
        metrics = edge.evaluate(message.content[P.ARRAYS].to_torch_state_dict(), local.test_images, local.test_labels)
        return reply(message, metrics, edge.client_id)

    handlers = mekd_handlers(lambda message, context: _node(message, context, data_dir)[0])
    return register_handlers(ClientApp(), {**handlers, P.EVALUATE: evaluate}, wrap)


app = make_client_app()

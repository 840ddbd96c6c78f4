"""Flower ClientApp: thin handlers that turn messages into calls on `mekd_fl.client.EdgeDevice`.

Every setting a client needs arrives in the message's ConfigRecord (the server's resolved config),
so the same handlers work under `flwr run`, the in-process simulation and a user's own ServerApp.
Between messages a client keeps two things in `context.state`: its emulator (generator and
discriminator weights) and the teacher's answers to its queries.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mekd_fl.client import EdgeDevice
from mekd_fl.config import RunConfig
from mekd_fl.device import limit_threads, pick_device

app = ClientApp()

_STATE_G, _STATE_D, _STATE_QA = "emulator-generator", "emulator-discriminator", "teacher-answers"
_STATE_METHOD = "distiller-state"
# Keys the strategy adds to the run config in its messages; they are not run settings.
_MESSAGE_KEYS = ("server-round", "budget", "num-samples", "phase-steps", "return-weights", "measure-fid")


def _device_for(message: Message, context: Context) -> EdgeDevice:
    limit_threads()
    raw = dict(message.content["config"])
    cfg = RunConfig.from_mapping({k: v for k, v in raw.items() if k not in _MESSAGE_KEYS}, validate=False)
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", cfg.num_clients))
    if num_partitions != cfg.num_clients:
        raise ValueError(f"num-clients={cfg.num_clients} but the federation has {num_partitions} SuperNodes; "
                         f"set num-supernodes={cfg.num_clients}")
    _forget_other_runs(context, cfg.run_name)
    return EdgeDevice(cfg, partition_id, pick_device(cfg.device))


def _forget_other_runs(context: Context, run_name: str) -> None:
    """Drop emulator, answers and method state left by another run on this node.

    Under `flwr run` every run has a fresh context; a sweep that runs many configurations in one
    simulation does not, and a CAN discriminator or cached answers from the previous cell must not
    leak into the next one.
    """
    current = context.state.config_records.get("mekd-run")
    if current is not None and current["run-name"] == run_name:
        return
    for key in (_STATE_G, _STATE_D, _STATE_QA, _STATE_METHOD):
        if key in context.state:
            del context.state[key]
    context.state["mekd-run"] = ConfigRecord({"run-name": run_name})


def _reply(message: Message, metrics: dict, partition_id: int, arrays: dict | None = None,
           records: dict[str, ArrayRecord] | None = None) -> Message:
    """A reply with metrics (always tagged with the partition id), optional weights and extra records."""
    content = RecordDict({"metrics": MetricRecord({**metrics, "partition-id": partition_id}), **(records or {})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=message)


def _state_dict(context: Context, key: str) -> dict | None:
    record = context.state.array_records.get(key)
    return record.to_torch_state_dict() if record is not None else None


@app.train("emulator")
def train_emulator(message: Message, context: Context) -> Message:
    """Train this client's emulator; in a federated emulator, start from the server's averaged weights
    (sent as ArrayRecords of the same names) and send the new weights back."""
    edge = _device_for(message, context)
    config = message.content["config"]
    g_start, d_start = (message.content.array_records.get(k) for k in (_STATE_G, _STATE_D))
    g_state = g_start.to_torch_state_dict() if g_start is not None else None
    d_state = d_start.to_torch_state_dict() if d_start is not None else None
    steps = int(config.get("phase-steps", edge.cfg.emulator_steps))
    metrics: dict = {"num-examples": len(edge.images)}
    if steps > 0:
        g_state, d_state, metrics = edge.train_emulator(g_state, d_state, steps)
    if g_state is None or d_state is None:
        raise ValueError("no emulator weights to install and no steps to train")
    context.state[_STATE_G] = ArrayRecord(g_state)
    context.state[_STATE_D] = ArrayRecord(d_state)
    fid_net = message.content.array_records.get("fid-net")
    if config.get("measure-fid", False) and fid_net is not None:
        metrics["fid"] = edge.emulator_fid(g_state, fid_net.to_torch_state_dict())
    weights = {_STATE_G: ArrayRecord(g_state), _STATE_D: ArrayRecord(d_state)}
    return _reply(message, metrics, edge.partition_id, records=weights if config.get("return-weights", False) else {})


@app.query("teacher")
def send_queries(message: Message, context: Context) -> Message:
    edge = _device_for(message, context)
    images = edge.query_images(int(message.content["config"]["budget"]), _state_dict(context, _STATE_G))
    content = RecordDict({
        "queries": ArrayRecord({"images": Array(images.numpy())}),
        "metrics": MetricRecord({"partition-id": edge.partition_id, "num-examples": len(images)}),
    })
    context.state[_STATE_QA] = ArrayRecord({"images": Array(images.numpy())})
    return Message(content=content, reply_to=message)


@app.query("answers")
def store_answers(message: Message, context: Context) -> Message:
    edge = _device_for(message, context)
    responses = message.content["answers"]["responses"].numpy()
    sent = context.state[_STATE_QA]["images"].numpy()
    if len(responses) != len(sent):
        raise ValueError(f"received {len(responses)} answers for {len(sent)} queries")
    context.state[_STATE_QA] = ArrayRecord({"images": Array(sent), "responses": Array(responses)})
    return _reply(message, {"num-examples": len(responses)}, edge.partition_id)


def _answers(context: Context) -> tuple:
    record = context.state.array_records.get(_STATE_QA)
    if record is None or "responses" not in record:
        raise ValueError("this client holds no teacher answers yet (the query phase did not reach it)")
    qa = record.to_torch_state_dict()
    return qa["images"], qa["responses"]


@app.train()
def distill(message: Message, context: Context) -> Message:
    edge = _device_for(message, context)
    images, responses = _answers(context)
    student = message.content["arrays"].to_torch_state_dict()
    server_round = int(message.content["config"]["server-round"])
    state, metrics, extra = edge.distill(student, _state_dict(context, _STATE_G), images, responses, server_round,
                                         _state_dict(context, _STATE_METHOD))
    if extra is not None:
        context.state[_STATE_METHOD] = ArrayRecord(extra)
    return _reply(message, metrics, edge.partition_id, state)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    edge = _device_for(message, context)
    metrics = edge.evaluate(message.content["arrays"].to_torch_state_dict())
    return _reply(message, metrics, edge.partition_id)


@app.evaluate("samples")
def samples(message: Message, context: Context) -> Message:
    edge = _device_for(message, context)
    images, responses = _answers(context)
    count = int(message.content["config"]["num-samples"])
    out = edge.emulator_samples(message.content["arrays"].to_torch_state_dict(), _state_dict(context, _STATE_G),
                                images[:count], responses[:count])
    return _reply(message, {"num-examples": count}, edge.partition_id, {k: v.contiguous() for k, v in out.items()})

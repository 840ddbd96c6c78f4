"""Flower ClientApp: thin handlers that turn messages into calls on `mekd_fl.client.EdgeDevice`.

Every setting a client needs arrives in the message's ConfigRecord (the server's resolved config),
so the same handlers work under `flwr run`, the in-process simulation and a user's own ServerApp.
Between messages a client keeps two things in `context.state`: its emulator (generator and
discriminator weights) and the teacher's answers to its queries.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mekd_fl.client import EdgeDevice
from mekd_fl.config import RunConfig
from mekd_fl.device import limit_threads, pick_device

app = ClientApp()

_STATE_G, _STATE_D, _STATE_QA = "emulator-generator", "emulator-discriminator", "teacher-answers"
# Keys the strategy adds to the run config in its messages; they are not run settings.
_MESSAGE_KEYS = ("server-round", "budget", "num-samples")


def _device_for(message: Message, context: Context) -> EdgeDevice:
    limit_threads()
    raw = dict(message.content["config"])
    cfg = RunConfig.from_mapping({k: v for k, v in raw.items() if k not in _MESSAGE_KEYS}, validate=False)
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", cfg.num_clients))
    if num_partitions != cfg.num_clients:
        raise ValueError(f"num-clients={cfg.num_clients} but the federation has {num_partitions} SuperNodes; "
                         f"set num-supernodes={cfg.num_clients}")
    return EdgeDevice(cfg, partition_id, pick_device(cfg.device))


def _reply(message: Message, metrics: dict, partition_id: int, arrays: dict | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord({**metrics, "partition-id": partition_id})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=message)


def _state_dict(context: Context, key: str) -> dict | None:
    record = context.state.array_records.get(key)
    return record.to_torch_state_dict() if record is not None else None


@app.train("emulator")
def train_emulator(message: Message, context: Context) -> Message:
    edge = _device_for(message, context)
    g_state, d_state, metrics = edge.train_emulator()
    context.state[_STATE_G] = ArrayRecord(g_state)
    context.state[_STATE_D] = ArrayRecord(d_state)
    return _reply(message, metrics, edge.partition_id)


@app.query("teacher")
def send_queries(message: Message, context: Context) -> Message:
    edge = _device_for(message, context)
    images = edge.query_images(int(message.content["config"]["budget"]))
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
    state, metrics = edge.distill(student, _state_dict(context, _STATE_G), images, responses, server_round)
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

"""Flower ClientApp: thin handlers that turn `strategies.protocol` messages into calls on `EdgeDevice`.

Every setting a client needs arrives in the message's ConfigRecord, and only those (the server sends
`RunConfig.client_dict()` plus the strategy's own keys), so the same handlers work under `flwr run`,
the in-process simulation and a user's own ServerApp. In a simulation, the message's `shard` record
says which images of the data set files are this node's own; the node reads the files itself from
its data folder (`make_client_app(data_dir)`, else the node-config or run-config `data-dir`, else
the default locations). Between messages a client keeps in `context.state`: its emulator (generator
and discriminator weights), the teacher's answers to its queries and a method's own state (CAN).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mekd_fl.client import EdgeDevice
from mekd_fl.config import RunConfig
from mekd_fl.data.local import shard_data
from mekd_fl.device import limit_threads, pick_device
from strategies import protocol as P

_STATE_G, _STATE_D, _STATE_QA = P.GENERATOR, P.DISCRIMINATOR, "teacher-answers"
_STATE_METHOD = "distiller-state"


def _settings(message: Message) -> tuple[RunConfig, dict]:
    """The client settings of the message (a RunConfig whose server-only fields keep their defaults,
    unused here) and the strategy's own keys."""
    raw = dict(message.content[P.CONFIG])
    extra = {k: raw.pop(k) for k in list(raw) if k in P.STRATEGY_KEYS}
    return RunConfig.from_mapping(raw, validate=False), extra


def _data_dir(own: str, context: Context) -> str:
    return str(own or context.node_config.get("data-dir", "") or context.run_config.get("data-dir", "") or "")


def _device_for(message: Message, context: Context, data_dir: str) -> tuple[EdgeDevice, dict]:
    limit_threads()
    cfg, extra = _settings(message)
    shard = message.content.array_records.get(P.SHARD)
    if shard is None:
        raise ValueError("no 'shard' record: this ClientApp serves simulations, where the server says which "
                         "images of the data set files are this node's own")
    partition = int(shard[P.PARTITION].numpy())
    local = shard_data(cfg.dataset, _data_dir(data_dir, context), shard[P.TRAIN_INDEX].numpy(),
                       shard[P.TEST_INDEX].numpy())
    _forget_other_runs(context, cfg.run_name)
    return EdgeDevice(cfg, partition, pick_device(cfg.device), local), extra


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
    """A reply with metrics (tagged with the partition label, for logs only), optional weights and records."""
    content = RecordDict({P.METRICS: MetricRecord({**metrics, P.PARTITION_ID: partition_id}), **(records or {})})
    if arrays is not None:
        content[P.ARRAYS] = ArrayRecord(arrays)
    return Message(content=content, reply_to=message)


def _state_dict(context: Context, key: str) -> dict | None:
    record = context.state.array_records.get(key)
    return record.to_torch_state_dict() if record is not None else None


def _answers(context: Context) -> tuple:
    record = context.state.array_records.get(_STATE_QA)
    if record is None or P.RESPONSES not in record:
        raise ValueError("this client holds no teacher answers yet (the query phase did not reach it)")
    qa = record.to_torch_state_dict()
    return qa[P.IMAGES], qa[P.RESPONSES]


Handler = Callable[[Message, Context], Message]


def make_client_app(data_dir: str = "", wrap: Callable[[Handler], Handler] | None = None) -> ClientApp:
    """The MEKD ClientApp.

    `data_dir` is where this node reads the data set files (empty: node-config or run-config
    `data-dir`, else the default locations). `wrap`, when given, wraps every handler (the chaos tests
    inject crashes and poisoned replies with it; a deployment could log or rate-limit).
    """
    app = ClientApp()
    wrap = wrap or (lambda handler: handler)

    def train_emulator(message: Message, context: Context) -> Message:
        """Train this client's emulator; in a federated emulator, start from the server's averaged weights
        (sent as ArrayRecords of the same names) and send the new weights back."""
        edge, extra = _device_for(message, context, data_dir)
        g_start, d_start = (message.content.array_records.get(k) for k in (_STATE_G, _STATE_D))
        g_state = g_start.to_torch_state_dict() if g_start is not None else None
        d_state = d_start.to_torch_state_dict() if d_start is not None else None
        steps = int(extra.get(P.PHASE_STEPS, edge.cfg.emulator_steps))
        metrics: dict = {P.NUM_EXAMPLES: len(edge.images)}
        if steps > 0:
            g_state, d_state, metrics = edge.train_emulator(g_state, d_state, steps)
        if g_state is None or d_state is None:
            raise ValueError("no emulator weights to install and no steps to train")
        context.state[_STATE_G] = ArrayRecord(g_state)
        context.state[_STATE_D] = ArrayRecord(d_state)
        if extra.get(P.MEASURE_FID, False):
            metrics["fid"] = edge.emulator_fid(g_state)
        weights = {_STATE_G: ArrayRecord(g_state), _STATE_D: ArrayRecord(d_state)}
        return _reply(message, metrics, edge.partition_id, records=weights if extra.get(P.RETURN_WEIGHTS) else {})

    def send_queries(message: Message, context: Context) -> Message:
        edge, extra = _device_for(message, context, data_dir)
        images = edge.query_images(int(extra[P.BUDGET]), _state_dict(context, _STATE_G))
        context.state[_STATE_QA] = ArrayRecord({P.IMAGES: Array(images.numpy())})
        content = RecordDict({
            P.QUERIES: ArrayRecord({P.IMAGES: Array(images.numpy())}),
            P.METRICS: MetricRecord({P.PARTITION_ID: edge.partition_id, P.NUM_EXAMPLES: len(images)}),
        })
        return Message(content=content, reply_to=message)

    def store_answers(message: Message, context: Context) -> Message:
        edge, _ = _device_for(message, context, data_dir)
        responses = message.content[P.ANSWERS_RECORD][P.RESPONSES].numpy()
        sent = context.state[_STATE_QA][P.IMAGES].numpy()
        if len(responses) != len(sent):
            raise ValueError(f"received {len(responses)} answers for {len(sent)} queries")
        context.state[_STATE_QA] = ArrayRecord({P.IMAGES: Array(sent), P.RESPONSES: Array(responses)})
        return _reply(message, {P.NUM_EXAMPLES: len(responses)}, edge.partition_id)

    def distill(message: Message, context: Context) -> Message:
        edge, extra = _device_for(message, context, data_dir)
        images, responses = _answers(context)
        student = message.content[P.ARRAYS].to_torch_state_dict()
        state, metrics, method_state = edge.distill(student, _state_dict(context, _STATE_G), images, responses,
                                                    int(extra[P.SERVER_ROUND]), _state_dict(context, _STATE_METHOD))
        if method_state is not None:
            context.state[_STATE_METHOD] = ArrayRecord(method_state)
        return _reply(message, metrics, edge.partition_id, state)

    def evaluate(message: Message, context: Context) -> Message:
        edge, _ = _device_for(message, context, data_dir)
        metrics = edge.evaluate(message.content[P.ARRAYS].to_torch_state_dict())
        return _reply(message, metrics, edge.partition_id)

    def samples(message: Message, context: Context) -> Message:
        edge, extra = _device_for(message, context, data_dir)
        images, responses = _answers(context)
        count = int(extra[P.NUM_SAMPLES])
        out = edge.emulator_samples(message.content[P.ARRAYS].to_torch_state_dict(), _state_dict(context, _STATE_G),
                                    images[:count], responses[:count])
        return _reply(message, {P.NUM_EXAMPLES: count}, edge.partition_id, {k: v.contiguous() for k, v in out.items()})

    app.train("emulator")(wrap(train_emulator))
    app.query("teacher")(wrap(send_queries))
    app.query("answers")(wrap(store_answers))
    app.train()(wrap(distill))
    app.evaluate()(wrap(evaluate))
    app.evaluate("samples")(wrap(samples))
    return app


app = make_client_app()

"""MEKD's client handlers for any Flower ClientApp: `register_mekd(app, data=..., model=...)`.

Why a helper and not a ClientApp of ours: a Flower project already has its ClientApp, its model, its
data and its own `@app.evaluate()`. `register_mekd` adds only the message handlers MEKD's strategy
sends (`strategies.protocol`: train.emulator, query.teacher, query.answers, train.distill,
evaluate.samples) on top of them, so switching a project to MEKD is one import and one call. The
project's `@app.train()` is left alone (MEKD distills through `train.distill`), and so is its
`@app.evaluate()`, which then measures the distilled student on the project's own test data.

Between messages a node keeps, in Flower's `context.state`: its emulator (generator and discriminator
weights), its query images with the teacher's answers, and a method's own state (CAN). Nothing else
leaves the node but what the protocol names: emulator weights when the server averages them, query
images (uint8) and the student's weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mekd_fl.client.edge import EdgeClient, EdgeSettings, ImageSource, ModelSource, Preprocess
from strategies import protocol as P

STATE_GENERATOR, STATE_DISCRIMINATOR = P.GENERATOR, P.DISCRIMINATOR
STATE_ANSWERS = "teacher-answers"
STATE_METHOD = "distiller-state"
STATE_KEYS = (STATE_GENERATOR, STATE_DISCRIMINATOR, STATE_ANSWERS, STATE_METHOD)

Handler = Callable[[Message, Context], Message]
EdgeFor = Callable[[Message, Context], EdgeClient]


def strategy_keys(message: Message) -> dict[str, Any]:
    """The strategy's own keys of the message's config (budget, round, emulator steps, ...)."""
    config = _config(message)
    return {k: config[k] for k in P.STRATEGY_KEYS if k in config}


def reply(
    message: Message,
    metrics: dict,
    label: int,
    arrays: dict | None = None,
    records: dict[str, ArrayRecord] | None = None,
) -> Message:
    """A reply with metrics (tagged with the node's label, for logs only), optional weights and records."""
    content = RecordDict({P.METRICS: MetricRecord({**metrics, P.PARTITION_ID: label}), **(records or {})})
    if arrays is not None:
        content[P.ARRAYS] = ArrayRecord(arrays)
    return Message(content=content, reply_to=message)


def _config(message: Message) -> dict:
    record = message.content.config_records.get(P.CONFIG)
    return dict(record) if record is not None else {}


def _state_dict(context: Context, key: str) -> dict | None:
    record = context.state.array_records.get(key)
    return record.to_torch_state_dict() if record is not None else None


def _answers(context: Context) -> tuple:
    record = context.state.array_records.get(STATE_ANSWERS)
    if record is None or P.RESPONSES not in record:
        raise ValueError(
            f"{P.STATE_LOST}: this client holds no teacher answers (the query phase did not reach it, or its "
            "node restarted since)"
        )
    qa = record.to_torch_state_dict()
    return qa[P.IMAGES], qa[P.RESPONSES]


def mekd_handlers(edge_for: EdgeFor) -> dict[str, Handler]:
    """The handlers of MEKD's message types, by message type, over `edge_for(message, context)`, which
    returns the node's EdgeClient with the message's settings applied."""

    def train_emulator(message: Message, context: Context) -> Message:
        """Train this node's emulator; in a federated emulator, start from the server's averaged weights
        (sent as ArrayRecords of the same names) and send the new weights back."""
        edge, extra = edge_for(message, context), strategy_keys(message)
        g_start, d_start = (message.content.array_records.get(k) for k in (STATE_GENERATOR, STATE_DISCRIMINATOR))
        g_state = g_start.to_torch_state_dict() if g_start is not None else None
        d_state = d_start.to_torch_state_dict() if d_start is not None else None
        steps = int(extra.get(P.PHASE_STEPS, edge.settings.emulator_steps))
        metrics: dict = {P.NUM_EXAMPLES: len(edge.images)}
        pairs = _answers(context) if extra.get(P.PAIRED, False) else None
        if steps > 0:
            g_state, d_state, metrics = edge.train_emulator(g_state, d_state, steps, pairs=pairs)
        if g_state is None or d_state is None:
            raise ValueError("no emulator weights to install and no steps to train")
        context.state[STATE_GENERATOR] = ArrayRecord(g_state)
        context.state[STATE_DISCRIMINATOR] = ArrayRecord(d_state)
        if extra.get(P.MEASURE_FID, False):
            metrics["fid"] = edge.emulator_fid(g_state)
        weights = {STATE_GENERATOR: ArrayRecord(g_state), STATE_DISCRIMINATOR: ArrayRecord(d_state)}
        return reply(message, metrics, edge.client_id, records=weights if extra.get(P.RETURN_WEIGHTS) else {})

    def send_queries(message: Message, context: Context) -> Message:
        edge, extra = edge_for(message, context), strategy_keys(message)
        if P.BUDGET not in extra:
            raise ValueError(f"a {P.QUERY} message without '{P.BUDGET}' in its config")
        scorer = message.content.array_records.get(P.ARRAYS)  # query-selection=uncertainty: the global student
        student = scorer.to_torch_state_dict() if scorer is not None else None
        images = edge.query_images(int(extra[P.BUDGET]), _state_dict(context, STATE_GENERATOR), student)
        context.state[STATE_ANSWERS] = ArrayRecord({P.IMAGES: Array(images.numpy())})
        content = RecordDict(
            {
                P.QUERIES: ArrayRecord({P.IMAGES: Array(images.numpy())}),
                P.METRICS: MetricRecord({P.PARTITION_ID: edge.client_id, P.NUM_EXAMPLES: len(images)}),
            }
        )
        return Message(content=content, reply_to=message)

    def store_answers(message: Message, context: Context) -> Message:
        edge = edge_for(message, context)
        responses = np.asarray(message.content[P.ANSWERS_RECORD][P.RESPONSES].numpy())
        record = context.state.array_records.get(STATE_ANSWERS)
        if record is None or P.IMAGES not in record:
            raise ValueError("teacher answers arrived for queries this client never sent")
        sent = record[P.IMAGES].numpy()
        if responses.ndim != 2 or len(responses) != len(sent) or not np.isfinite(responses).all():
            raise ValueError(f"received answers of shape {responses.shape} for {len(sent)} queries")
        context.state[STATE_ANSWERS] = ArrayRecord({P.IMAGES: Array(sent), P.RESPONSES: Array(responses)})
        return reply(message, {P.NUM_EXAMPLES: len(responses)}, edge.client_id)

    def distill(message: Message, context: Context) -> Message:
        edge, extra = edge_for(message, context), strategy_keys(message)
        images, responses = _answers(context)
        student = message.content[P.ARRAYS].to_torch_state_dict()
        state, metrics, method_state = edge.distill(
            student,
            images,
            responses,
            _state_dict(context, STATE_GENERATOR),
            int(extra.get(P.SERVER_ROUND, 1)),
            _state_dict(context, STATE_METHOD),
            proximal_mu=_config(message).get(P.PROXIMAL_MU, 0.0),  # FedProx's term, as its clients must add it
        )
        if method_state is not None:
            context.state[STATE_METHOD] = ArrayRecord(method_state)
        return reply(message, metrics, edge.client_id, state)

    def samples(message: Message, context: Context) -> Message:
        edge, extra = edge_for(message, context), strategy_keys(message)
        images, responses = _answers(context)
        count = int(extra.get(P.NUM_SAMPLES, 8))
        g_state = _state_dict(context, STATE_GENERATOR)
        if g_state is None:
            raise ValueError("this client has no emulator to draw samples with")
        out = edge.emulator_samples(
            message.content[P.ARRAYS].to_torch_state_dict(), g_state, images[:count], responses[:count]
        )
        return reply(message, {P.NUM_EXAMPLES: count}, edge.client_id, {k: v.contiguous() for k, v in out.items()})

    return {
        P.EMULATOR: train_emulator,
        P.QUERY: send_queries,
        P.ANSWERS: store_answers,
        P.TRAIN: distill,
        P.SAMPLES: samples,
    }


#: Flower's client-side DP mods. A ClientApp's mods wrap every handler, and these act on any message with
#: one ArrayRecord: they would clip or noise MEKD's query images and emulator weights, and answer an error
#: to its other messages. MEKD composes with Flower's server-side DP instead (`dp-clip`, `dp-noise`).
REFUSED_MODS = ("fixedclipping_mod", "adaptiveclipping_mod", "LocalDpMod")


def check_mods(app: ClientApp) -> None:
    """Refuse, in one line, a ClientApp whose mods would act on MEKD's messages in a way MEKD cannot honour."""
    for mod in getattr(app, "_mods", None) or []:
        name = getattr(mod, "__name__", type(mod).__name__)
        if name in REFUSED_MODS:
            raise ValueError(
                f"ClientApp(mods=[{name}, ...]) is not accepted with MEKD's handlers: Flower's client-side DP mods "
                "act on every message type, MEKD's query images and emulators included; accepted: no client-side "
                "DP mod, and Flower's server-side DP around MEKD's aggregation (DifferentialPrivacyServerSide*)"
            )


def register_handlers(
    app: ClientApp, handlers: dict[str, Handler], wrap: Callable[[Handler], Handler] | None = None
) -> ClientApp:
    """Register handlers by message type ("category.action") on a ClientApp (Flower refuses duplicates).

    The app's mods are checked first (`check_mods`): they wrap every handler registered here."""
    check_mods(app)
    wrap = wrap or (lambda handler: handler)
    for message_type, handler in handlers.items():
        category, _, action = message_type.partition(".")
        decorator = getattr(app, category)
        (decorator(action) if action else decorator())(wrap(handler))
    return app


def register_mekd(
    app: ClientApp,
    *,
    data: ImageSource | Callable[[Context], ImageSource],
    model: ModelSource,
    preprocess: Preprocess | None = None,
    settings: EdgeSettings | dict | None = None,
    num_classes: int | None = None,
    mirror_views: bool = False,
    device: str | None = None,
    image_key: str | None = None,
    cache_size: int = 16,
    wrap: Callable[[Handler], Handler] | None = None,
) -> ClientApp:
    """Add MEKD's client handlers to an existing ClientApp; returns the app.

    Parameters
    ----------
    app : your ClientApp. Its `@app.train()` and `@app.evaluate()` stay as they are; MEKD's strategy
        distills through `train.distill` and evaluates the student with your `evaluate`.
    data : the node's unlabeled training images, or `data(context) -> images` (called once per node and
        cached): a uint8 tensor, a torch Dataset or a DataLoader, as `mekd_fl.client.edge.as_uint8_images` takes.
    model : your student, an nn.Module or a factory; the strategy's global weights load into it.
    preprocess : images as floats in [0, 1] -> your model's input (default: as they are).
    settings : base EdgeSettings (or a mapping); the keys of each message's config override them (so the
        server's `train_config`, e.g. {"lr": 0.01}, reaches the device).
    num_classes : the teacher's classes (default: your model's output width).
    mirror_views : whether augmented query views may be mirrored.
    device : torch device (default: the settings' device, auto = cuda when present).
    image_key : where dict samples keep their images (default: img, image, ...).
    cache_size : nodes whose decoded images a process keeps (a simulation runs many nodes per process).
    wrap : wraps every handler (logging, rate limits, fault injection in tests).

    The node's label (in logs, and its seeds) is `node_config["partition-id"]` when set, else its node id.
    An app built with Flower's client-side DP mods is refused in one line (`check_mods`).
    """
    base = settings if isinstance(settings, EdgeSettings) else EdgeSettings.from_config(settings)
    cache: OrderedDict[int, EdgeClient] = OrderedDict()

    def edge_for(message: Message, context: Context) -> EdgeClient:
        config = message.content.config_records.get(P.CONFIG)
        edge = cache.get(context.node_id)
        if edge is None:
            images = data(context) if callable(data) and not hasattr(data, "__len__") else data
            label = int(context.node_config.get("partition-id", context.node_id))
            edge = EdgeClient(
                images,
                model,
                settings=base,
                preprocess=preprocess,
                num_classes=num_classes,
                client_id=label,
                device=device,
                mirror_views=mirror_views,
                image_key=image_key,
            )
            cache[context.node_id] = edge
            while len(cache) > max(1, cache_size):
                cache.popitem(last=False)
        cache.move_to_end(context.node_id)
        return edge.with_settings(base.updated(dict(config) if config is not None else None))

    return register_handlers(app, mekd_handlers(edge_for), wrap)

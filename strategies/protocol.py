"""The MEKD message protocol: message types, record names and config keys, in one place.

Why one module: the strategy (server side) and every client handler (ours or a user's) must agree on
the same names, and the trust rules are stated against them: `OUTGOING` is the allow-list of what a
server message of each type may carry, and `MEKD` refuses to send anything else. Nothing here imports
torch, Flower or the rest of the project at import time (`checked_message` imports Flower's message types
when called: importing any part of `flwr` loads its whole server side), so a client, a foreign Flower app
or a tool can import it alone.

What a client ever receives (and nothing more):
- the global student (`ARRAYS`), in `train`, `evaluate` and `evaluate.samples` messages, and with
  `query-selection=uncertainty` or `hybrid` in `query.teacher` (the student that scores which images
  it sends);
- with a federated emulator, the averaged emulator weights (`GENERATOR`, `DISCRIMINATOR`);
- its own teacher answers (`ANSWERS` record, array `RESPONSES`), only in `query.answers`;
- the settings a client needs (`CONFIG`: the run's client settings plus the keys in `STRATEGY_KEYS`);
- in a simulation, `SHARD`: which images of the shared data files are its own (its partition).
A teacher node (`strategies.teacher_node`) receives only `ROLE` challenges and `TEACH` messages: query
images and the key of the client they are charged to, never a student or another setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import Message

# ---------------------------------------------------------------------------- message types
EMULATOR = "train.emulator"  # train (or install) the client's emulator GAN
QUERY = "query.teacher"  # "send me your query images"
ANSWERS = "query.answers"  # "here are the teacher's answers to them"
TRAIN = "train.distill"  # distill the global student locally (a named handler: a user's own
# `@app.train()` stays theirs and is never called by MEKD)
EVALUATE = "evaluate"  # evaluate the global student on the client's held-out split
SAMPLES = "evaluate.samples"  # x, G(T(x)), G(S(x)) for the emulator-samples plot
ROLE = "query.role"  # teacher node only: "prove you hold the teacher's token" (a nonce)
TEACH = "query.teach"  # teacher node only: "answer these query images, charged to CLIENT"

# ---------------------------------------------------------------------------- record names
CONFIG = "config"  # ConfigRecord: settings (server -> client)
ARRAYS = "arrays"  # ArrayRecord: the student (both ways), or samples (reply)
METRICS = "metrics"  # MetricRecord: a reply's numbers
QUERIES = "queries"  # ArrayRecord (reply to QUERY): array IMAGES, uint8
IMAGES = "images"
ANSWERS_RECORD = "answers"  # ArrayRecord (in ANSWERS): array RESPONSES
RESPONSES = "responses"
GENERATOR = "emulator-generator"  # ArrayRecord: emulator weights (federated emulator)
DISCRIMINATOR = "emulator-discriminator"
SHARD = "shard"  # ArrayRecord (simulation only): TRAIN_INDEX, TEST_INDEX, PARTITION
TRAIN_INDEX = "train-index"
TEST_INDEX = "test-index"
PARTITION = "partition"

# ---------------------------------------------------------------------------- config and metric keys
SERVER_ROUND = "server-round"
BUDGET = "budget"  # images the client may send in its query reply
NUM_SAMPLES = "num-samples"
PHASE_STEPS = "phase-steps"  # emulator steps in this emulator message (federated emulator)
RETURN_WEIGHTS = "return-weights"
MEASURE_FID = "measure-fid"
PAIRED = "paired"  # in EMULATOR: train G on the client's own (answer, query image) pairs
#: `query-selection` values for which the server sends the global student with `QUERY` (it scores the images).
SCORED_SELECTIONS = ("uncertainty", "hybrid")
STRATEGY_KEYS = (SERVER_ROUND, BUDGET, NUM_SAMPLES, PHASE_STEPS, RETURN_WEIGHTS, MEASURE_FID, PAIRED)
#: Flower FedProx's key: the client adds (mu / 2) * sum ||w - w_global|| to its distillation loss.
PROXIMAL_MU = "proximal-mu"
#: Keys a wrapped Flower strategy may add to a round's config that MEKD's client handlers honour. Any other
#: key a wrapped strategy adds is refused when the run starts (it would otherwise be ignored in silence).
WRAPPED_KEYS = (SERVER_ROUND, PROXIMAL_MU)

NONCE = "nonce"  # ROLE: the challenge
PROOF = "proof"  # ROLE reply: HMAC-SHA256(token, "nonce:node_id")
CLIENT = "client"  # TEACH: the client key the queries are charged to

NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"  # reported by clients: a label for logs only, never an identity
# In a client's error reason: it holds no emulator and answers although the server delivered them (its
# SuperNode restarted: same node id, empty memory). The server prepares it again, at most
# MAX_REPREPARE times per run, re-delivering what it paid for without a second charge.
STATE_LOST = "mekd-state-lost"
MAX_REPREPARE = 2

# ---------------------------------------------------------------------------- the allow-list
#: Record names a server message of each type may carry (SHARD only in simulations).
OUTGOING: dict[str, frozenset[str]] = {
    EMULATOR: frozenset({CONFIG, GENERATOR, DISCRIMINATOR, SHARD}),
    QUERY: frozenset({CONFIG, ARRAYS, SHARD}),
    ANSWERS: frozenset({CONFIG, ANSWERS_RECORD, SHARD}),
    TRAIN: frozenset({CONFIG, ARRAYS, SHARD}),
    EVALUATE: frozenset({CONFIG, ARRAYS, SHARD}),
    SAMPLES: frozenset({CONFIG, ARRAYS, SHARD}),
    ROLE: frozenset({CONFIG}),
    TEACH: frozenset({CONFIG, QUERIES}),
}

#: Message types that go only to a teacher node (strategies.teacher_node), never to a student client.
TEACHER_MESSAGES = frozenset({ROLE, TEACH})


def checked_message(message_type: str, records: Mapping[str, Any], node: int) -> Message:
    """A server message to `node`, built only if its records are in `OUTGOING[message_type]`.

    The one place the allow-list is enforced: `MEKD` and the teacher node's oracle both send through it.
    """
    from flwr.app import Message, RecordDict

    allowed = OUTGOING.get(message_type)
    if allowed is None or not set(records) <= allowed:
        raise RuntimeError(
            f"refusing to send {message_type} with records {sorted(records)}: allowed {sorted(allowed or [])}"
        )
    return Message(content=RecordDict(dict(records)), message_type=message_type, dst_node_id=node)


# ---------------------------------------------------------------------------- limits on replies
MAX_METRICS = 64  # numbers in one reply's MetricRecord; more is refused

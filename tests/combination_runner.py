"""Runs many small configurations in one Flower simulation (see `mekd_fl.bench.multirun`) for the tests.

Usage: python tests/combination_runner.py OUT_DIR CACHE_DIR JSON_LIST_OF_SETTINGS [CHAOS]
Writes OUT_DIR/outcome.json ({run-name: "ok" | traceback}) and OUT_DIR/messages.jsonl: one line per
message the server sent (type, destination, and each record's names, keys, dtypes, shapes and config
values; never the numbers of an array), so a test can check every message against the allow-list.
With CHAOS = "crash=0.3,poison=9": each client crashes in about 30 % of its messages (decided by a hash
of partition, message type and round, so runs repeat) and partition 9 sends poisoned updates. With
"forget=1@2", partition 1's node loses its state (emulator, answers) just before its round-2 training
message, as a SuperNode that restarted would.
"""

from __future__ import annotations

import json
import os
import sys
import zlib

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

FIRST_STUDENT: dict[str, dict] = {}


class RecordingGrid:
    """A Grid that writes down every message before sending it."""

    def __init__(self, grid, path: str) -> None:
        self._grid = grid
        self._path = path

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        with open(self._path, "a") as fh:
            for m in messages:
                fh.write(json.dumps(describe(m)) + "\n")
        return self._grid.send_and_receive(messages, *args, **kwargs)


def describe(message) -> dict:
    content = message.content
    records = {}
    for name in content.keys():
        record = content[name]
        kind = type(record).__name__
        if kind == "ArrayRecord":
            records[name] = {
                "kind": kind,
                "arrays": {k: [str(record[k].numpy().dtype), list(record[k].shape)] for k in record.keys()},
            }
        elif kind == "ConfigRecord":
            records[name] = {
                "kind": kind,
                "values": {
                    k: (v if isinstance(v, (int, float, str, bool)) else repr(v)) for k, v in dict(record).items()
                },
            }
        else:
            records[name] = {"kind": kind, "keys": sorted(dict(record))}
    return {"type": message.metadata.message_type, "dst": message.metadata.dst_node_id, "records": records}


def chaos_wrapper(crash: float, poison: int, forget: tuple[int, int] = (-1, -1)):
    """Wraps each ClientApp handler: crash some messages, poison one client's updates, wipe one node's
    state (`forget` = (partition, round)) once."""
    forgotten: set[tuple[int, int]] = set()

    def wrap(handler):
        def chaotic(message, context):
            from flwr.app import Array, ArrayRecord

            from strategies import protocol as P

            shard = message.content.array_records.get("shard")
            partition = int(shard["partition"].numpy()) if shard is not None else -1
            config = message.content.config_records.get("config")
            rnd = int(config.get("server-round", 0)) if config is not None else 0
            key = f"{partition}/{message.metadata.message_type}/{rnd}".encode()
            if (partition, rnd) == forget and message.metadata.message_type == P.TRAIN and forget not in forgotten:
                forgotten.add(forget)
                for name in list(context.state.keys()):
                    del context.state[name]
            if zlib.crc32(key) % 1000 < crash * 1000:
                raise RuntimeError(f"chaos: client {partition} crashes on {message.metadata.message_type}")
            reply = handler(message, context)
            if partition == poison and message.metadata.message_type == P.TRAIN:
                arrays = reply.content["arrays"]
                bad = {}
                for k in arrays.keys():
                    v = arrays[k].numpy()
                    if v.dtype.kind == "f":
                        v = v.astype(np.float64) * (1e40 if rnd % 2 else 1e3)  # inf in float32, or just huge
                    bad[k] = Array(np.array(v))
                reply.content["arrays"] = ArrayRecord(bad)
                reply.content["metrics"]["num-examples"] = 1e12
            return reply

        return chaotic

    return wrap


def main() -> None:
    from mekd_fl.bench.multirun import run_configs
    from mekd_fl.client.app import make_client_app
    from mekd_fl.config import RunConfig

    out_dir, cache_dir, cells = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    chaos = dict(item.split("=") for item in sys.argv[4].split(",")) if len(sys.argv) > 4 else {}
    os.makedirs(out_dir, exist_ok=True)
    configs = [RunConfig.from_mapping({**cell, "out-dir": out_dir, "cache-dir": cache_dir}) for cell in cells]
    messages = os.path.join(out_dir, "messages.jsonl")
    client_app = None
    if chaos:
        forget = tuple(int(x) for x in chaos.get("forget", "-1@-1").split("@"))
        wrap = chaos_wrapper(float(chaos.get("crash", 0)), int(chaos.get("poison", -1)), forget)
        client_app = make_client_app(configs[0].data_dir, wrap=wrap)
    outcome = run_configs(
        configs,
        client_gpus=0.0,
        log=lambda line: None,
        wrap_grid=lambda grid: RecordingGrid(grid, messages),
        client_app=client_app,
    )
    with open(os.path.join(out_dir, "outcome.json"), "w") as fh:
        json.dump({name: "ok" if "summary" in res else res["error"] for name, res in outcome.items()}, fh)


if __name__ == "__main__":
    main()

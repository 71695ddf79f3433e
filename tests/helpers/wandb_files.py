"""Read back what W&B wrote: the records of an offline run's `.wandb` file, decoded with wandb's own
protobuf classes, so tests check the run W&B would upload rather than our own logs."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wandb
from wandb.proto import wandb_internal_pb2

# The `.wandb` file is a LevelDB-style log: a 7-byte file header (":W&B", magic, version), then 32 KiB
# blocks of chunks, each with a 7-byte header (crc32, length, type: full / first / middle / last).
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    # `run.finish()` returns before W&B's service has flushed and closed the run file, so a test reading a
    # run it just finished in-process could see it half-written; teardown waits for the service to finish
    # every run (a no-op when the run was written by another process, which has exited).
    wandb.teardown()
    data = Path(path).read_bytes()
    ident, _magic, _version = FILE_HEADER.unpack_from(data, 0)
    assert ident == b":W&B", f"{path} is not a W&B run file"
    records, pending, offset = [], b"", FILE_HEADER.size
    while offset + CHUNK_HEADER.size <= len(data):
        room = BLOCK - offset % BLOCK
        if room < CHUNK_HEADER.size:  # the rest of a block too small for a header is padding
            offset += room
            continue
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        offset += CHUNK_HEADER.size
        chunk, offset = data[offset : offset + length], offset + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@dataclass(frozen=True)
class ArtifactRecord:
    name: str
    type: str
    aliases: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict, compare=False)  # path in the artifact -> staged copy


@dataclass
class OfflineRun:
    """`history` holds the rows a run logged *except* its step rows: W&B's history records that carry
    `global_step` without an `epoch` (the training loss every `trainer.log_every_n_steps`, see
    perceiver.experiment.tracking.STEP_METRICS); those are in `step_history`. A step row that W&B merged into
    an epoch row of the same global step is in both. So `history` of a training run is its epoch rows, as
    before step rows existed, and any other run's rows are all there."""

    run_id: str
    group: str
    job_type: str
    name: str
    tags: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    step_history: list[dict[str, Any]] = field(default_factory=list)  # rows with `global_step`
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    preempting: bool = False  # the run called `mark_preempting()`
    charts: dict[str, dict[str, Any]] = field(default_factory=dict)  # custom charts (wandb.plot.*): panel configs


def is_step_only(row: dict[str, Any]) -> bool:
    return "global_step" in row and "epoch" not in row


def media(row: dict[str, Any]) -> dict[str, str]:
    """The media a history row holds, by key: {"attention/maps": "image-file", "predictions": "table-file"}."""
    return {key.removesuffix("/_type"): value for key, value in row.items() if key.endswith("/_type")}


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_file: Path) -> OfflineRun:
    """The run's identity, config, history (step rows apart), final summary, artifacts and preemption as W&B
    recorded them."""
    run: OfflineRun | None = None
    config: dict[str, Any] = {}
    history, summary, exit_code = [], {}, None
    artifacts, preempting, charts = [], False, {}
    for record in read_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = OfflineRun(r.run_id, r.run_group, r.job_type, r.display_name, list(r.tags))
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update if item.key})
            for item in record.config.update:  # a chart is stored as config _wandb.visualize.<key>
                if list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                    charts[item.nested_key[2]] = json.loads(item.value_json)["panel_config"]
        elif kind == "history":
            history.append({_item_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            summary.update({_item_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "exit":
            exit_code = record.exit.exit_code
        elif kind == "artifact":
            a = record.artifact
            files = {entry.path: entry.local_path for entry in a.manifest.contents}
            artifacts.append(ArtifactRecord(a.name, a.type, tuple(a.aliases), files))
        elif kind == "preempting":
            preempting = True
    assert run is not None, f"{run_file} has no run record"
    # W&B stores each config value as {"value": ...}; unwrap for readability.
    run.config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    run.history, run.summary, run.exit_code = [row for row in history if not is_step_only(row)], summary, exit_code
    run.step_history = [row for row in history if "global_step" in row]
    run.artifacts, run.preempting, run.charts = artifacts, preempting, charts
    return run


@dataclass(frozen=True)
class MetricDefinition:
    """One `run.define_metric` call as W&B recorded it: how the dashboard plots and summarises a key."""

    name: str  # the key, or a glob such as "val/*"
    step_metric: str  # "" = W&B's own step
    summary: tuple[str, ...]  # the summary operations set, e.g. ("min",)
    is_glob: bool


def read_metric_definitions(run_file: Path) -> dict[str, MetricDefinition]:
    """The run's `define_metric` records, by name or glob (the last record of a name wins, as in W&B)."""
    definitions: dict[str, MetricDefinition] = {}
    for record in read_records(run_file):
        if record.WhichOneof("record_type") != "metric" or record.metric.expanded_from_glob:
            continue
        metric = record.metric
        ops = tuple(op.name for op, value in metric.summary.ListFields() if value is True)
        name = metric.name or metric.glob_name
        definitions[name] = MetricDefinition(name, metric.step_metric, ops, bool(metric.glob_name))
    return definitions

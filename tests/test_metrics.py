import struct
from pathlib import Path

from jobs.iteration import iteration_line
from relay.metrics import MetricsLogger, metric_role, ray_metric_name, read_metrics


def test_ray_names_and_roles_follow_one_rule():
    assert ray_metric_name("losses/clipfrac") == "relay_losses_clipfrac"
    assert ray_metric_name("time/generate") == "relay_time_generate"
    assert [metric_role(name) for name in ("losses/value", "critic/value_error", "losses/clipfrac",
                                           "policy/kl_ref", "reward/mean", "perf/tokens_per_s", "time/sync")] == [
        "critic", "critic", "policy", "policy", "reward", "rollout", "driver"]


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path, run_name="unit")
    logger.log(1, {"reward/mean": 0.5, "time/generate": 1.25})
    logger.log(2, {"reward/mean": 0.75})
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"iteration": 1, "reward/mean": 0.5, "time/generate": 1.25}, {"iteration": 2, "reward/mean": 0.75}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert set(logger.gauges) == {"reward/mean", "time/generate"}


def test_iteration_line_is_one_readable_line():
    metrics = {"reward/mean": 0.5, "policy/kl_ref": 0.25, "policy/entropy": 1.0, "losses/clipfrac": 0.125,
               "rollout/workers_active": 2, "rollout/workers_pending": 1, "time/generate": 0.5, "time/train": 1.0,
               "eval/score": 0.75}
    line = iteration_line(3, 10, metrics)
    assert "\n" not in line
    assert line == ("iteration 3/10 | reward 0.500 | kl 0.250 | entropy 1.000 | clipfrac 0.125 | rollout workers 2"
                    " (+1 pending) | generate 0.50s train 1.00s | eval 0.750")


def test_a_resumed_run_logs_each_iteration_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(tmp_path, run_name="unit")
    for iteration in (1, 2, 3, 4):  # the first attempt got to 4; its newest checkpoint is at 2
        first.log(iteration, {"reward/mean": float(iteration)})
    first.close()
    resumed = MetricsLogger(tmp_path, run_name="unit", resumed_at=2)
    for iteration in (3, 4):
        resumed.log(iteration, {"reward/mean": 10.0 * iteration})
    resumed.close()
    assert [(row["iteration"], row["reward/mean"]) for row in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("reward/mean")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows of an offline W&B run file. wandb 0.2x reads these files in its Go core only; the format is
    LevelDB's log (32 KiB blocks of records framed by checksum, length and type) after a 7-byte W&B header, and
    each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, block, position = path.read_bytes(), 32768, 7
    payloads, pending = [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST
            payloads.append(pending)
            pending = b""
    rows = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_mlflow_and_offline_wandb_get_every_iteration_once_across_a_resume(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from relay.config import TrackingSection

    monkeypatch.setenv("WANDB_SILENT", "true")
    tracking = TrackingSection(mlflow=True, wandb=True)
    first = MetricsLogger(tmp_path, run_name="tracked", tracking=tracking, params={"algorithm": {"kl_coef": 0.05}})
    for iteration in (1, 2, 3):  # the first attempt got to 3; its newest checkpoint is at 2
        first.log(iteration, {"reward/mean": float(iteration), "time/iteration": 0.5})
    first.close()
    resumed = MetricsLogger(tmp_path, run_name="tracked", resumed_at=2, tracking=tracking)
    for iteration in (3, 4):
        resumed.log(iteration, {"reward/mean": float(iteration), "time/iteration": 0.25})
    resumed.close()

    # MLflow, a local store in the run directory: one run, found again on resume, each iteration once.
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("relay").experiment_id])
    assert run.data.params["algorithm.kl_coef"] == "0.05" and run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward/mean"))
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "time/iteration"),
                                    key=lambda m: m.step)] == [0.5, 0.5, 0.5, 0.25]  # iteration 3 as first logged

    # W&B offline, under <run_dir>/wandb: one run id for both attempts, each iteration once over their files.
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({path.name for path in files}) == 1
    rows = [row for path in files for row in wandb_history(path)]
    assert sorted((int(row["_step"]), float(row["reward/mean"])) for row in rows) == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]

from jobs.ppo import iteration_line
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

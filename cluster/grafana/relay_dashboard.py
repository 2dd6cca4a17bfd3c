"""relay's Grafana dashboard, built with Grafana's own schema library (grafana-foundation-sdk), written as
`relay-dashboard.json` beside this file:

    python cluster/grafana/relay_dashboard.py

Its panels query the series relay reports through `ray.util.metrics` (`ray_relay_*`, labels `run` and `role`) in
the Prometheus that Ray's dashboard reads; `run` and `datasource` are dashboard variables. tests/test_cluster.py
checks that the JSON is what this script builds and that every panel's queries return data for a running job.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUTPUT = Path(__file__).with_name("relay-dashboard.json")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

# (title, unit, [(PromQL, legend)]): one time-series panel each, four to a row.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Reward", "none", [('ray_relay_reward_mean{run=~"$run"}', "{{run}} training reward")]),
    ("Evaluation score", "none", [('ray_relay_eval_score{run=~"$run"}', "{{run}} held-out score"),
                                  ('ray_relay_eval_reward{run=~"$run"}', "{{run}} reward source")]),
    ("Win rate against the start", "percentunit", [('ray_relay_eval_win_rate{run=~"$run"}', "{{run}}")]),
    ("KL to the reference", "none", [('ray_relay_policy_kl_ref{run=~"$run"}', "{{run}} training batch"),
                                     ('ray_relay_eval_kl_ref{run=~"$run"}', "{{run}} held-out")]),
    ("Entropy", "none", [('ray_relay_policy_entropy{run=~"$run"}', "{{run}}")]),
    ("Clip fraction", "percentunit", [('ray_relay_losses_clipfrac{run=~"$run"}', "{{run}}")]),
    ("Value error", "none", [('ray_relay_critic_value_error{run=~"$run"}', "{{run}}")]),
    ("Perplexity", "none", [('ray_relay_eval_perplexity{run=~"$run"}', "{{run}}")]),
    ("Generated tokens/s", "none", [('ray_relay_perf_tokens_per_s{run=~"$run"}', "{{run}}")]),
    ("Phase times", "s", [(
        '{__name__=~"ray_relay_time_(generate|score|advantages|train|generate_wait|sync|eval|checkpoint)", run=~"$run"}',
        "{{run}} {{__name__}}")]),
    ("Policy version", "none", [('ray_relay_policy_version{run=~"$run"}', "{{run}}")]),
    ("Rollout workers", "none", [('ray_relay_rollout_workers_active{run=~"$run"}', "{{run}} active"),
                                 ('ray_relay_rollout_workers_pending{run=~"$run"}', "{{run}} pending"),
                                 ('ray_relay_rollout_worker_failures{run=~"$run"}', "{{run}} failed so far")]),
]


def build() -> dict:
    board = (
        dashboard.Dashboard("relay: RLHF runs")
        .uid("relay-runs")
        .tags(["relay", "ray"])
        .description("relay's training metrics by run (ray_relay_* series); Ray's own dashboards show the cluster")
        .refresh("10s")
        .time("now-1h", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            dashboard.QueryVariable("run").label("run").datasource(DATASOURCE)
            .query("label_values(ray_relay_reward_mean, run)").multi(True).include_all(True).all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
    )
    for title, unit, queries in PANELS:
        panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(6)
        for ref, (expr, legend) in zip("ABCDEFGH", queries):
            panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref))
        board = board.with_panel(panel)
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(board.build()))


if __name__ == "__main__":
    OUTPUT.write_text(json.dumps(build(), indent=2, sort_keys=True) + "\n")
    print(f"written: {OUTPUT}")

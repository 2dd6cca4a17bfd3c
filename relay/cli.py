"""The `relay` command.

    relay demo [--pipeline rlhf|grpo] [overrides] the embedded default: local Ray, tiny model, warm start, PPO
                                                  (rlhf: + a reward model from simulated preferences; grpo: GRPO)
    relay check --config FILE [overrides]         every check before a run (models, data, reward, resources, run
                                                  directory, resume) without training: one table, `error:` lines
    relay train --config FILE [overrides]         PPO here (joins RAY_ADDRESS's cluster, else a local Ray)
    relay sft --config FILE [overrides]           the supervised warm start alone
    relay reward-model --config FILE [overrides]  a Bradley-Terry reward model alone
    relay eval --config FILE MODEL [MODEL ...] [--against MODEL] [--output FILE] [overrides]
                                                  held-out score, reward, win rate and KL against the reference,
                                                  perplexity, BLEU/chrF: models side by side
    relay serve MODEL_OR_RUN_DIR [--checkpoint iter_N] [--port P] [--api-key KEY]
                                                  the policy behind an OpenAI-compatible API (Ray Serve + vLLM)
    relay label --config FILE MODEL [MODEL_B] [--store PATH] [--port P]
                                                  a web page to compare two answers; choices to a SQLite store
                                                  that `relay reward-model` reads
    relay export-task TASK OUT_DIR                a task's prompts and demonstrations as parquet/jsonl files
    relay bench --config FILE [--iterations K] [--vs trl] [--output DIR] [overrides]
                                                  seconds per PPO iteration, phase by phase, against relay's raw
                                                  model passes and (--vs trl) TRL's PPO on the same work
    relay submit FILE [--address URL] [overrides] PPO as a Ray job on a cluster; prints the job id
    relay status|logs|stop JOB_ID [--address URL] follow a submitted job (stop --finish: end it cleanly after
                                                  the current iteration, with final eval, checkpoint, summary)
    relay scale JOB_ID --rollout-workers N        grow or shrink the run's vLLM fleet at the next iteration

The cluster commands use the Ray Job Submission API at --address (default: RAY_ADDRESS, else
http://127.0.0.1:8265, e.g. through `ray dashboard cluster/ray-cluster.yaml` or a port-forward).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import jobs

DEMO_CONFIGS = {name: Path(jobs.__file__).parent / "configs" / f"{stem}.yaml"
                for name, stem in (("ppo", "demo"), ("rlhf", "demo-rlhf"), ("grpo", "demo-grpo"),
                                   ("agent", "demo-agent"))}


# Commands whose whole command line is their job's own parser: one definition of their options, not two.
OWN_COMMAND_LINES = {"eval": "evaluate", "serve": "serve", "label": "label"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="RLHF with PPO on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the embedded default on this machine")
    demo.add_argument("--pipeline", choices=sorted(DEMO_CONFIGS), default="ppo",
                      help="ppo: warm start + PPO on the task's reward; rlhf: + a learned reward model; "
                           "grpo: warm start + GRPO (no critic); agent: warm start + PPO of a tool-calling agent")
    demo.add_argument("overrides", nargs="*", help="dotted.key=value")
    for name, text in (("check", "every check before a run, without training (relay/preflight.py)"),
                       ("train", "PPO (jobs/ppo.py)"), ("sft", "supervised warm start (jobs/sft.py)"),
                       ("reward-model", "Bradley-Terry reward model (jobs/reward_model.py)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", required=True)
        command.add_argument("overrides", nargs="*", help="dotted.key=value")
    bench = commands.add_parser("bench", help="how fast PPO trains here, phase by phase (jobs/bench.py)")
    bench.add_argument("--config", required=True)
    bench.add_argument("--iterations", type=int, default=5, help="timed iterations, after one warm-up")
    bench.add_argument("--vs", choices=["trl"], help="also run this trainer on the same work")
    bench.add_argument("--output", default="runs/bench", help="where bench.json and bench.png go")
    bench.add_argument("overrides", nargs="*", help="dotted.key=value")
    # Listed here; their command lines are their jobs' own (see main).
    for name, job in OWN_COMMAND_LINES.items():
        commands.add_parser(name, help=f"see `relay {name} --help` (jobs/{job}.py)")
    export = commands.add_parser("export-task", help="write a task's prompts and demonstrations as a dataset")
    export.add_argument("task", help="built-in task name or module:attribute")
    export.add_argument("out_dir")
    export.add_argument("--train-prompts", type=int, default=4096)
    export.add_argument("--eval-prompts", type=int, default=128)
    export.add_argument("--seed", type=int, default=0)
    submit = commands.add_parser("submit", help="submit PPO as a Ray job")
    submit.add_argument("config")
    submit.add_argument("overrides", nargs="*", help="dotted.key=value")
    submit.add_argument("--address", help="Ray dashboard / job API URL")
    submit.add_argument("--working-dir", help="directory shipped to the cluster (default: the project root)")
    for name, text in (("status", "job status and the run's progress"), ("logs", "the job's log"),
                       ("stop", "stop the job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id")
        command.add_argument("--address")
        if name == "logs":
            command.add_argument("--follow", "-f", action="store_true")
        if name == "stop":
            command.add_argument("--finish", action="store_true",
                                 help="end the run after its current iteration, with a final evaluation, checkpoint "
                                      "and summary, instead of stopping the job at once")
    scale = commands.add_parser("scale", help="change the number of rollout workers of a running job")
    scale.add_argument("job_id")
    scale.add_argument("--rollout-workers", type=int, required=True)
    scale.add_argument("--address")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OWN_COMMAND_LINES:  # the job parses the rest, options, overrides and --help alike
        importlib.import_module(f"jobs.{OWN_COMMAND_LINES[argv[0]]}").main(argv[1:])
        return
    parser = build_parser()
    # Overrides may follow options (`relay submit FILE --address URL a.b=1`): argparse leaves those over.
    args, leftover = parser.parse_known_args(argv)
    if leftover:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in leftover):
            parser.error(f"unrecognized arguments: {' '.join(leftover)}")
        args.overrides += leftover
    if args.command == "check":
        check(args.config, args.overrides)
        return
    if args.command in ("demo", "train"):
        from jobs.ppo import main as ppo_main

        config = str(DEMO_CONFIGS[args.pipeline]) if args.command == "demo" else args.config
        ppo_main(["--config", config, *args.overrides])
        return
    if args.command == "bench":
        from jobs.bench import main as bench_main

        bench_main(["--config", args.config, "--iterations", str(args.iterations), "--output", args.output,
                    *(["--vs", args.vs] if args.vs else []), *args.overrides])
        return
    if args.command == "sft":
        from jobs.sft import main as sft_main

        sft_main(["--config", args.config, *args.overrides])
        return
    if args.command == "reward-model":
        from jobs.reward_model import main as reward_model_main

        reward_model_main(["--config", args.config, *args.overrides])
        return

    if args.command == "export-task":
        from relay.config import DataSection
        from relay.prompts import export_task
        from relay.tasks import get_task

        try:
            data = DataSection(task=args.task, train_prompts=args.train_prompts, eval_prompts=args.eval_prompts,
                               seed=args.seed)
            paths = export_task(get_task(args.task), data, Path(args.out_dir))
        except ValueError as error:
            sys.exit(f"error: {error}")
        print("\n".join(str(path) for path in paths.values()))
        return

    from relay import cluster
    from relay.config import ConfigError

    if args.command == "submit":
        try:
            job_id = cluster.submit(args.config, args.overrides, args.address,
                                    args.working_dir or cluster.default_working_dir())
        except ConfigError as error:
            sys.exit(str(error))
        print(job_id)
    elif args.command == "status":
        print(json.dumps(cluster.status(args.job_id, args.address), indent=2))
    elif args.command == "logs":
        cluster.follow_logs(args.job_id, args.address, args.follow)
    elif args.command == "stop" and args.finish:
        try:
            print(cluster.control_call(args.job_id, "request_finish", (), args.address))
        except LookupError as error:
            sys.exit(str(error))
    elif args.command == "stop":
        print(f"stop requested: {cluster.job_client(args.address).stop_job(args.job_id)}")
    elif args.command == "scale":
        if args.rollout_workers < 1:
            sys.exit("--rollout-workers must be at least 1")
        try:
            print(cluster.control_call(args.job_id, "request_rollout_workers", (args.rollout_workers,), args.address))
        except LookupError as error:
            sys.exit(str(error))


def check(config_path: str, overrides: list[str]) -> None:
    """`relay check`: the table on stdout; exits non-zero with one `error:` line per problem."""
    from jobs.common import check_output_dir
    from jobs.record import check_resumable
    from relay import preflight
    from relay.config import ConfigError, load_config

    try:
        config = load_config(config_path, overrides)
    except ConfigError as error:  # "invalid config FILE:" and then a line per field
        lines = str(error).splitlines()
        sys.exit("\n".join(f"error: {line.strip()}" for line in lines[1:] or lines))
    checks = preflight.run_checks(config, check_output_dir, check_resumable)
    preflight.print_table(checks)
    problems = preflight.problem_lines(checks)
    if problems:
        sys.exit("\n".join(problems))


if __name__ == "__main__":
    main()

"""The `relay` command.

    relay demo [overrides]                  the embedded default: local Ray, tiny model, warm start, PPO
    relay train --config FILE [overrides]   PPO (jobs/ppo.py) on the cluster of RAY_ADDRESS, or a local Ray
    relay sft --config FILE [overrides]     the supervised warm start alone (jobs/sft.py)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jobs

DEMO_CONFIG = Path(jobs.__file__).parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relay", description="RLHF with PPO on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the embedded default on this machine")
    demo.add_argument("overrides", nargs="*", help="dotted.key=value")
    for name, text in (("train", "PPO (jobs/ppo.py)"), ("sft", "supervised warm start (jobs/sft.py)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", required=True)
        command.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from jobs.ppo import main as ppo_main

        ppo_main(["--config", str(DEMO_CONFIG), *args.overrides])
    elif args.command == "train":
        from jobs.ppo import main as ppo_main

        ppo_main(["--config", args.config, *args.overrides])
    elif args.command == "sft":
        from jobs.sft import main as sft_main

        sft_main(["--config", args.config, *args.overrides])


if __name__ == "__main__":
    main()

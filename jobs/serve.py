"""`relay serve`: a trained policy behind an OpenAI-compatible API, on Ray Serve with vLLM (Ray's own LLM serving).

    relay serve MODEL_OR_RUN_DIR [--checkpoint iter_N] [--config FILE] [--host 127.0.0.1] [--port 8000]
                [--model-id NAME] [--api-key KEY]

MODEL_OR_RUN_DIR is a run directory (its final policy, or --checkpoint's), a checkpoint, a model directory or a
Hub name. A run's own config decides the engine (dtype the policy trained in, context length, device); --config
names one for a model outside a run. `/v1/completions`, `/v1/chat/completions` (streaming too; the tokenizer's chat
template, as training applied it) and `/v1/models` listen on 127.0.0.1 unless --host says otherwise; with an API
key (--api-key or RELAY_API_KEY) every request must carry `Authorization: Bearer KEY`. Stays in the foreground
until interrupted. While it serves a run's checkpoint, that checkpoint is pinned (`<run>/pins/`), so that
`run.keep_checkpoints` leaves it alone.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

from actors.rollout import ENGINE_ENV
from jobs.common import connect_ray, policy_path, run_directory
from relay.config import RelayConfig, load_config
from relay.storage import write_atomic

API_KEY_ENV = "RELAY_API_KEY"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relay serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run directory, a checkpoint, a model directory or a Hub name")
    parser.add_argument("--checkpoint", help="with a run directory: serve this checkpoint (iter_N), not the final")
    parser.add_argument("--config", type=Path, help="the engine's settings, for a model outside a run")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-id", help="the model's name in the API (default: the run's name, or the model's)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"default: ${API_KEY_ENV}")
    args = parser.parse_args(argv)
    try:
        served = resolve(args.model, args.checkpoint, args.config, args.model_id)
    except ValueError as error:
        sys.exit(f"error: {error}")
    connect_ray(served.config)
    serving = threading.Event()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        if not serving.is_set():  # still starting: leave serve.run's wait at once
            raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(signum, on_signal)
    try:
        with served.pinned():
            start(served, args.host, args.port, args.api_key)
            serving.set()
            print(f"serving {served.path} as {served.model_id!r} at http://{args.host}:{args.port}/v1 "
                  f"(Ctrl-C to stop)", flush=True)
            stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


class Served:
    """What is served: the model directory, its name in the API, the config that sizes its engine, and the run
    whose checkpoint it is (pinned while served)."""

    def __init__(self, path: str, model_id: str, config: RelayConfig, run_dir: Path | None) -> None:
        self.path, self.model_id, self.config, self.run_dir = path, model_id, config, run_dir
        self.pin = None if run_dir is None else run_dir / "pins" / f"serve-{os.getpid()}-{secrets.token_hex(4)}"

    def pinned(self) -> Any:
        served = self

        class Pin:
            def __enter__(self) -> None:
                if served.pin is not None and served.run_dir is not None:
                    checkpoint = Path(served.path).resolve().parent
                    if checkpoint.parent == (served.run_dir / "checkpoints").resolve():
                        served.pin.parent.mkdir(exist_ok=True)
                        write_atomic(served.pin, checkpoint.name + "\n")

            def __exit__(self, *exc: object) -> None:
                if served.pin is not None:
                    served.pin.unlink(missing_ok=True)

        return Pin()


def resolve(model: str, checkpoint: str | None, config_path: Path | None, model_id: str | None) -> Served:
    """The model to serve and its engine settings, checked before Ray starts."""
    run_dir = run_directory(model)
    if checkpoint is not None:
        if run_dir is None:
            raise ValueError(f"--checkpoint needs a run directory; {model} is not one")
        model = str(run_dir / "checkpoints" / checkpoint)
        if not Path(model).is_dir():
            raise ValueError(f"{run_dir} has no checkpoint {checkpoint} (it has: "
                             f"{', '.join(sorted(p.name for p in (run_dir / 'checkpoints').glob('iter_*'))) or 'none'})")
    path = policy_path(model)
    if config_path is None and run_dir is None:
        raise ValueError(f"{model} is not in a run directory: name the engine's settings with --config FILE")
    config = load_config(config_path or run_dir / "config.yaml")
    name = model_id or (config.run.name if run_dir is not None else Path(path).name)
    return Served(path, name, config, run_dir)


def llm_config(served: Served) -> LLMConfig:
    """The engine as the run's rollout engines ran (dtype, context, eager on CPU), sized for a small machine: one
    bundle per tensor-parallel rank, and an ingress that takes a tenth of a CPU."""
    config, rollout = served.config, served.config.rollout
    engine: dict[str, Any] = {"dtype": config.policy.dtype, "max_model_len": rollout.max_model_len,
                              "tensor_parallel_size": rollout.tensor_parallel_size,
                              "enforce_eager": rollout.enforce_eager or config.device == "cpu"}
    if config.device == "cpu":
        engine["kv_cache_memory_bytes"] = rollout.kv_cache_memory_mb * 2**20
        bundle = {"CPU": 1}
    else:
        engine["gpu_memory_utilization"] = rollout.gpu_memory_utilization
        bundle = {"GPU": 1}
    return LLMConfig(
        model_loading_config={"model_id": served.model_id, "model_source": served.path},
        engine_kwargs=engine,
        placement_group_config={"bundles": [bundle] * rollout.tensor_parallel_size},
        # The engine runs in the replica's own process (ENGINE_ENV): its bundle is the replica's compute, and the
        # replica asks for no CPU of its own on top (Serve LLM's default of one would double it).
        deployment_config={"ray_actor_options": {"num_cpus": 0}},
        runtime_env={"env_vars": ENGINE_ENV},
    )


def start(served: Served, host: str, port: int, api_key: str | None) -> None:
    """Ray Serve LLM's OpenAI app — its LLMServer deployment and its OpenAiIngress — with an API-key check in
    front when a key is given."""
    config = llm_config(served)
    # What build_openai_app builds, but with our ingress app (the key check) and an ingress of a tenth of a CPU:
    # its default whole CPU never schedules on a 2-CPU machine beside the engine.
    options = OpenAiIngress.get_deployment_options([config]) | {"ray_actor_options": {"num_cpus": 0.1}}
    ingress = make_fastapi_ingress(OpenAiIngress, app=ingress_app(api_key))
    app = serve.deployment(ingress, **options).bind(
        llm_deployments={served.model_id: build_llm_deployment(config)},
        model_cards={served.model_id: model_card(config)})
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="relay", route_prefix="/")


def ingress_app(api_key: str | None) -> FastAPI:
    from ray.llm._internal.serve.core.ingress.ingress import init  # Ray's ingress app: its error handling, CORS

    app = init()
    if api_key:
        @app.middleware("http")
        async def require_api_key(request: Request, call_next: Any) -> Any:
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return JSONResponse({"error": {"message": "missing or wrong API key (Authorization: Bearer KEY)",
                                               "type": "authentication_error", "code": 401}}, status_code=401)
            return await call_next(request)
    return app


def model_card(config: LLMConfig) -> Any:
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    return to_model_metadata(config.model_id, config)


if __name__ == "__main__":
    main()

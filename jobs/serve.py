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
import asyncio
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

from actors.engine import ENGINE_ENV, engine_options
from jobs.common import connect_ray, latest_checkpoint, policy_path, run_directory
from relay.config import RelayConfig, load_config
from relay.storage import write_atomic

API_KEY_ENV = "RELAY_API_KEY"
FOLLOW_POLL_S = 5.0
logger = logging.getLogger(__name__)


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
    parser.add_argument("--follow", action="store_true",
                        help="with a run directory: load each newer checkpoint as it appears, between requests")
    args = parser.parse_args(argv)
    try:
        served = resolve(args.model, args.checkpoint, args.config, args.model_id, follow=args.follow)
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
            while not stop.wait(FOLLOW_POLL_S if served.follow else None):
                served.pin_checkpoint(latest_checkpoint(served.run_dir))  # what the replicas load next
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


class Served:
    """What is served: the model directory, its name in the API, the config that sizes its engine, and the run
    whose checkpoint it is (pinned while served)."""

    def __init__(self, path: str, model_id: str, config: RelayConfig, run_dir: Path | None,
                 follow: bool = False) -> None:
        self.path, self.model_id, self.config, self.run_dir, self.follow = path, model_id, config, run_dir, follow
        self.pin = None if run_dir is None else run_dir / "pins" / f"serve-{os.getpid()}-{secrets.token_hex(4)}"

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """While served, the checkpoint is named in `<run>/pins/` (run.keep_checkpoints spares it)."""
        try:
            self.pin_checkpoint(Path(self.path).resolve().parent)
            yield
        finally:
            if self.pin is not None:
                self.pin.unlink(missing_ok=True)

    def pin_checkpoint(self, checkpoint: Path | None) -> None:
        if self.pin is None or self.run_dir is None or checkpoint is None:
            return
        if checkpoint.parent.resolve() == (self.run_dir / "checkpoints").resolve():
            self.pin.parent.mkdir(exist_ok=True)
            write_atomic(self.pin, checkpoint.name + "\n")


def resolve(model: str, checkpoint: str | None, config_path: Path | None, model_id: str | None,
            follow: bool = False) -> Served:
    """The model to serve and its engine settings, checked before Ray starts."""
    run_dir = run_directory(model)
    if follow and (run_dir is None or checkpoint is not None):
        raise ValueError("--follow needs a run directory (and no --checkpoint): it serves the run's newest checkpoint")
    newest = latest_checkpoint(run_dir) if follow and run_dir is not None else None
    if newest is not None:
        model = str(newest)
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
    return Served(path, name, config, run_dir, follow)


def llm_config(served: Served, autoscaling: dict[str, Any] | None = None) -> LLMConfig:
    """The engine as the run's rollout engines ran (dtype, context, eager on CPU), sized for a small machine: one
    bundle per tensor-parallel rank. `autoscaling`: Serve's own autoscaling_config for the engine replicas."""
    config, rollout = served.config, served.config.rollout
    bundle = {"CPU": 1} if config.device == "cpu" else {"GPU": 1}
    follow = None
    if served.follow and served.run_dir is not None:
        follow = {"run_dir": str(served.run_dir.resolve()), "checkpoint": Path(served.path).resolve().parent.name,
                  "poll_s": FOLLOW_POLL_S}
    return LLMConfig(
        model_loading_config={"model_id": served.model_id, "model_source": served.path},
        server_cls=FollowingLLMServer if follow else None,
        experimental_configs={"relay_follow": follow} if follow else {},
        engine_kwargs=engine_options(config),
        placement_group_config={"bundles": [bundle] * rollout.tensor_parallel_size},
        # The engine runs in the replica's own process (ENGINE_ENV): its bundle is the replica's compute, and the
        # replica asks for no CPU of its own on top (Serve LLM's default of one would double it).
        deployment_config={"ray_actor_options": {"num_cpus": 0},
                           **({"autoscaling_config": autoscaling} if autoscaling else {})},
        runtime_env={"env_vars": ENGINE_ENV},
    )


class FollowingLLMServer(LLMServer):
    """An LLMServer that follows a training run: when a newer checkpoint is published, it loads that policy
    between requests — vLLM pauses (requests in flight finish, new ones wait), reloads the weights in place, and
    resumes — so no request is dropped. Each replica follows by itself, however many Serve runs."""

    async def start(self) -> None:
        await super().start()
        follow = self._llm_config.experimental_configs["relay_follow"]
        self._following = asyncio.create_task(
            self._follow(Path(follow["run_dir"]), follow["checkpoint"], follow["poll_s"]))

    async def _follow(self, run_dir: Path, current: str, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            newest = latest_checkpoint(run_dir)
            if newest is None or newest.name <= current:
                continue
            serving, current = current, newest.name  # tried once: one that does not load is not tried again
            await self.pause(mode="wait")
            try:
                # As the rollout engines load weights (actors/engine.py): the KV cache zeroed with it.
                await self.collective_rpc("load_policy_weights", kwargs={"weights_path": str(newest / "policy")})
                await self.reset_prefix_cache()
                logger.info("now serving %s", newest / "policy")
            except Exception:  # noqa: BLE001 - a checkpoint that cannot load: keep serving the current one
                logger.exception("could not load %s; still serving %s", newest / "policy", serving)
            finally:
                await self.resume()


def start(served: Served, host: str, port: int, api_key: str | None) -> None:
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(served, api_key), name="relay", route_prefix="/")


def build_app(served: Served, api_key: str | None, autoscaling: dict[str, Any] | None = None) -> Application:
    """Ray Serve LLM's OpenAI app — its LLMServer deployment and its OpenAiIngress — with an API-key check in
    front when a key is given."""
    config = llm_config(served, autoscaling)
    # What build_openai_app builds, but with our ingress app (the key check) and an ingress of a tenth of a CPU:
    # its default whole CPU never schedules on a 2-CPU machine beside the engine.
    options = OpenAiIngress.get_deployment_options([config]) | {"ray_actor_options": {"num_cpus": 0.1}}
    ingress = make_fastapi_ingress(OpenAiIngress, app=ingress_app(api_key))
    return serve.deployment(ingress, **options).bind(
        llm_deployments={served.model_id: build_llm_deployment(config)},
        model_cards={served.model_id: model_card(config)})


class AppArgs(BaseModel):
    """The arguments of `jobs.serve:app` in a Serve config (cluster/serve.yaml), as `relay serve` takes them."""

    model_config = ConfigDict(extra="forbid")
    model: str
    checkpoint: str | None = None
    config: str | None = None
    model_id: str | None = None
    follow: bool = False
    api_key_env: str = Field(API_KEY_ENV, description="the environment variable holding the API key, if any")
    autoscaling: dict[str, Any] | None = Field(None, description="Serve's autoscaling_config for the engine")


def app(args: dict[str, Any]) -> Application:
    """The Serve application builder: `serve run jobs.serve:app model=RUN_DIR` or `serve deploy cluster/serve.yaml`."""
    parsed = AppArgs.model_validate(args)
    served = resolve(parsed.model, parsed.checkpoint, Path(parsed.config) if parsed.config else None,
                     parsed.model_id, follow=parsed.follow)
    return build_app(served, os.environ.get(parsed.api_key_env), parsed.autoscaling)


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

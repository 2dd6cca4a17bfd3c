"""`relay label`: a web page where people compare two answers to a prompt; every choice goes to a label store.

    relay label --config FILE MODEL [MODEL_B] [--store PATH] [--comparisons N] [--host 127.0.0.1] [--port 8001]

First the comparisons: the config's held-out prompts, each answered twice by MODEL (two samples) or once by MODEL
and once by MODEL_B (two checkpoints, say), on the run's vLLM rollout engine, in random order. Then the page, a
Ray Serve application, until interrupted: the prompt, answers A and B, and "A is better", "B is better", "Tie",
"Skip" (keys 1/←, 2/→, 3/↓, S); each choice is committed to the store (SQLite, relay/labels.py) before the next
comparison shows. `relay reward-model` reads the store (`reward_model_training.data: PATH`).
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import threading
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from ray import serve

from actors.rollout import RolloutFleet
from jobs.common import connect_ray, policy_path
from relay.batch import request_seeds
from relay.config import RelayConfig, load_config
from relay.labels import CHOICES, LabelStore
from relay.models import check_same_tokenizer, load_tokenizer
from relay.prompts import load_prompt_data

PAGE = Path(__file__).with_name("label.html")
LABEL_SEED = 7_654_321


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relay label", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the run's config: its prompts and engine")
    parser.add_argument("models", nargs="+", help="one policy (two samples each) or two (one answer each)")
    parser.add_argument("--store", type=Path, default=Path("runs/labels/labels.sqlite"))
    parser.add_argument("--comparisons", type=int, default=64, help="held-out prompts to compare answers to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    try:
        if len(args.models) > 2:
            raise ValueError("name one model (two samples per prompt) or two (one answer each)")
        models = [policy_path(model) for model in args.models]
        if len(models) == 2:  # MODEL_B's weights go into MODEL's engine: they must read the same token ids
            check_same_tokenizer(load_tokenizer(models[0]), load_tokenizer(models[1]), models[0], models[1])
        config = load_config(args.config)
    except ValueError as error:
        sys.exit(f"error: {error}")
    store = LabelStore(args.store)
    connect_ray(config)
    added = add_comparisons(config, models, store, args.comparisons)
    print(f"{added} comparisons added to {args.store} ({store.counts()['comparisons']} in all)", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        start(store.path, args.host, args.port)
        print(f"labelling at http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
        stop.wait()
    finally:
        serve.shutdown()


def add_comparisons(config: RelayConfig, models: list[str], store: LabelStore, count: int) -> int:
    """`count` held-out prompts, each with two answers (two samples of one model, or one of each of two), sampled
    at the rollout temperature and stored in random order. The prompts are rendered with the config's chat template,
    else the one the policy's checkpoint carries: the run's, as its training rendered them."""
    tokenizer = load_tokenizer(models[0])
    prompts = load_prompt_data(config, tokenizer).eval[:count]
    existing = store.counts()["comparisons"]
    seeds = request_seeds(LABEL_SEED, existing, len(prompts))  # new answers on each start
    fleet = RolloutFleet(config, models[0])
    try:
        ids = [prompt.ids for prompt in prompts]
        temperature = config.rollout.temperature
        if len(models) == 1:
            answers = [(first, second) for first, second in fleet.generate(ids, 2, temperature, seeds)]
        else:
            firsts = fleet.generate(ids, 1, temperature, seeds)
            fleet.load_weights_from(models[1], policy_version=1)
            answers = list(zip((s for [s] in firsts), (s for [s] in fleet.generate(ids, 1, temperature, seeds))))
    finally:
        fleet.shutdown()
    sources = [models[0], models[-1]]
    rng = random.Random(LABEL_SEED + existing)
    for prompt, pair in zip(prompts, answers):
        texts = [tokenizer.decode(sample.token_ids, skip_special_tokens=True) for sample in pair]
        order = [0, 1] if rng.random() < 0.5 else [1, 0]  # which model's answer shows as A is random
        store.add_comparison(prompt.text, texts[order[0]], texts[order[1]], sources[order[0]], sources[order[1]])
    return len(prompts)


class LabelRequest(BaseModel):
    comparison: int
    choice: str
    labeller: str


app = FastAPI(title="relay label")


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class LabelPage:
    """The page and its two calls. Stateless apart from the store, so replicas may come and go."""

    def __init__(self, store_path: str) -> None:
        self.store = LabelStore(store_path)
        self.page = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse)
    def index(self) -> str:
        return self.page

    @app.get("/api/next")
    def next(self, labeller: str) -> dict:
        comparison = self.store.next_unlabelled(labeller)
        shown = None if comparison is None else {"id": comparison.id, "prompt": comparison.prompt,
                                                 "a": comparison.answer_a, "b": comparison.answer_b}
        return {"comparison": shown, "labelled": self.store.labelled_by(labeller),
                "total": sum(count for choice, count in self.store.counts().items() if choice in CHOICES)}

    @app.post("/api/label")
    def label(self, request: LabelRequest) -> dict:
        try:
            self.store.comparison(request.comparison)
            self.store.label(request.comparison, request.choice, request.labeller)
        except (KeyError, ValueError) as error:
            raise HTTPException(status_code=422, detail=str(error).strip("'\"")) from None
        return {"labelled": self.store.labelled_by(request.labeller)}


def start(store_path: Path, host: str, port: int) -> None:
    serve.start(http_options={"host": host, "port": port})
    serve.run(LabelPage.bind(str(store_path.resolve())), name="relay-label", route_prefix="/")


if __name__ == "__main__":
    main()

"""``ptune serve checkpoint=A,B,C``: several prefixes on one base, and the bare base, answered in one batch by the
real server process, each row exactly as when asked alone."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ptune.frontends.common import compose_frontend_config, load_model
from ptune.inference.generation import GenerationSettings, stream_answer
from ptune.serve.app import main
from ptune.training.recipe import train
from tests.conftest import FAST, TINY_GLM, compose_train, stop_process
from tests.serve.test_app import MAX_NEW, PROMPTS, BatchWatch, start_server, user, wait_until_up

LENGTHS = (16, 8, 24)  # prefix lengths: the batch mixes prefixes of different lengths


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Three short runs of the built-in tiny model with different prefix lengths and seeds."""
    root = tmp_path_factory.mktemp("prefixes")
    found = []
    for seed, length in enumerate(LENGTHS):
        overrides = [*FAST, "max_steps=4", "save_steps=4", f"prefix.length={length}", f"seed={seed}"]
        train(compose_train(*overrides, cache_dir=root / "cache"), str(root / f"run{length}"))
        found.append(root / f"run{length}" / "checkpoint-4")
    return found


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    log = tmp_path_factory.mktemp("prefixes-log") / "server.log"
    running = start_server(",".join(str(c) for c in checkpoints), log)
    yield running
    stop_process(running.proc)


def ask(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "messages": user(prompt)}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["choices"][0]["message"]["content"]


def test_three_prefixes_and_the_bare_base_in_one_batch_each_answer_as_alone(server, checkpoints):
    url = wait_until_up(server)
    names = [f"run{length}/checkpoint-4" for length in LENGTHS]  # the folders share a name: named by run too
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [*names, "base"]
    assert httpx.get(f"{url}/health").json()["prefixes"] == names  # the bare base is served, but with no prefix
    models, prompts = [*names, "base"], PROMPTS[:4]
    alone = {(m, p): ask(url, m, p) for m in models for p in prompts}  # one at a time
    for p in prompts:  # the prefixes do change the answers, so a row given another's prefix would show
        assert len({alone[(m, p)] for m in models}) >= 3, [alone[(m, p)] for m in models]

    watch = BatchWatch(url)
    pairs = [(m, p) for p in prompts for m in models]  # 16 rows: every model in every part of the batch
    with ThreadPoolExecutor(len(pairs)) as pool:
        together = list(pool.map(lambda pair: ask(url, *pair), pairs))
    assert watch.stop() >= 8
    assert together == [alone[pair] for pair in pairs]

    # the bare base answers as ``ptune chat model.path=...`` without a checkpoint does
    chat = load_model(compose_frontend_config([f"model.path={TINY_GLM}"]))
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    assert [alone[("base", p)] for p in prompts] == [list(stream_answer(chat, p, [], settings))[-1] for p in prompts]
    assert (
        httpx.post(f"{url}/", json={"prompt": prompts[0]}, timeout=60).json()["response"]
        == alone[(names[0], prompts[0])]
    )
    unknown = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": user("hi")}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert all(n in unknown.json()["error"]["message"] for n in models)


def test_checkpoints_of_different_bases_are_refused_naming_the_keys(checkpoints, tmp_path, capsys):
    other = tmp_path / "other-base" / "checkpoint-4"
    shutil.copytree(checkpoints[1], other)
    meta_file = other / "ptune_checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta["base_model"]["config_sha256"] = "0" * 64  # as if trained on a base with another config.json
    meta["base_model"]["config"]["num_hidden_layers"] += 1
    meta_file.write_text(json.dumps(meta))
    assert main([f"checkpoint={checkpoints[0]},{other}", "torch_threads=1"]) == 1
    err = capsys.readouterr().err
    assert str(other) in err and "num_hidden_layers" in err and "model.path" in err


def test_a_folder_of_checkpoints_serves_each_with_configured_names(checkpoints, tmp_path):
    folder = tmp_path / "several"
    for k, checkpoint in enumerate(checkpoints[:2]):
        shutil.copytree(checkpoint, folder / f"c{k}")
    running = start_server(folder, tmp_path / "server.log", "model_names=[short,long]", "base_name=plain")
    try:
        url = wait_until_up(running)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["short", "long", "plain"]
        assert ask(url, "long", PROMPTS[0]) != ask(url, "plain", PROMPTS[0])
    finally:
        stop_process(running.proc)

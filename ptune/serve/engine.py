"""The engine process of ``ptune serve``: it owns the model and runs the scheduler's busy loop, apart from the HTTP
process (``ptune.serve.app``), as vLLM V1 runs its engine core apart from its API server. The HTTP work (parsing,
validation, streaming to clients) then never takes the decoding's GIL.

    python -m ptune.serve.engine FOLDER     (started by ``ptune serve``; FOLDER holds config.yaml and the sockets)

The loop: take every message waiting (new requests, cancellations; blocking only while there is nothing to
decode), run one scheduler turn (joins, answers, one token for every row), send the turn's events in one message.
Prompts are tokenised here, not in the HTTP process: the prompt format, the history fitting and the tokenizer
(rebuilt from ChatGLM2's ``tokenizer.model``) belong to the loaded checkpoint, and their modules import torch,
which the HTTP process must not; tokenising a prompt costs a fraction of one decode step. The engine exits when
told to (``shutdown``), and on its own when the HTTP process that started it is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import zmq
from omegaconf import DictConfig, OmegaConf

from ptune.inference.generation import GenerationSettings, encode_prompt, fit_history
from ptune.serve import ipc
from ptune.serve.models import Served, load_served
from ptune.serve.reference import answer_tokens
from ptune.serve.scheduler import Job, Scheduler

IDLE_POLL_MS = 500  # how often an idle engine checks that the HTTP process is still there
CONFIG_FILE = "config.yaml"
logger = logging.getLogger(__name__)


def request_job(cfg: DictConfig, served: Served, message: dict[str, Any]) -> Job:
    """The scheduler's job for a ``submit`` message: its prompt (the newest history that fits, in the format of
    the model it asked for), its settings and that model's prefix."""
    from ptune.frontends.common import generation_settings

    limit, loaded = int(cfg.max_new_tokens_limit), served.loaded

    def prepare() -> tuple[list[int], GenerationSettings, Any]:
        history = [(q, a) for q, a in message["history"]]
        kept, dropped = fit_history(loaded, message["query"], history)
        if dropped:
            logger.info("left out the oldest %d turn(s) of a request's history (max_source_length)", dropped)
        prompt = encode_prompt(loaded, message["query"], kept)
        settings = generation_settings(cfg, **message["settings"])
        if message.get("max_length") is not None:
            new_tokens = answer_tokens(message["max_length"], len(prompt), limit)
            settings = dataclasses.replace(settings, max_new_tokens=new_tokens)
        return prompt, settings, served.prefix

    return Job(message["id"], prepare, stream=bool(message.get("stream")))


def serve(folder: Path, cfg: DictConfig, served: list[Served], watch_parent: bool = True) -> None:
    """Connect to the HTTP process's sockets in ``folder``, say ready (with the models' names, the default
    first), and run the busy loop until ``shutdown``."""
    from ptune.frontends.common import describe

    context = zmq.Context()
    requests = ipc.socket(context, zmq.PULL, ipc.address(folder, ipc.REQUESTS), bind=False)
    events = ipc.socket(context, zmq.PUSH, ipc.address(folder, ipc.EVENTS), bind=False)
    parent = os.getppid()
    try:
        by_name = {entry.name: entry for entry in served}
        others = [entry.prefix for entry in served if isinstance(entry.prefix, torch.Tensor)]
        # prompts are cut to their model's max_source_length and answers to max_new_tokens_limit: a slot's bound
        row_tokens = max(entry.loaded.max_source_length for entry in served) + int(cfg.max_new_tokens_limit)
        scheduler = Scheduler(served[0].loaded, int(cfg.max_batch_size), others, row_tokens, int(cfg.step_tokens))
        names = list(by_name)
        prefixes = [entry.name for entry in served if entry.prefix is not None]  # the bare base carries none
        ready = {"models": names, "prefixes": prefixes, "describe": describe(served[0].loaded), "pid": os.getpid()}
        events.send(ipc.pack({"ready": ready}))
        while True:
            if not requests.poll(0 if scheduler.busy else IDLE_POLL_MS):
                if watch_parent and os.getppid() != parent:
                    logger.warning("ptune serve engine: the HTTP process is gone; stopping")
                    shutil.rmtree(folder, ignore_errors=True)  # its sockets' folder: nobody else will remove it
                    return
                if not scheduler.busy:
                    continue
            turn: list[dict] = []
            while requests.poll(0):
                message = ipc.unpack(requests.recv())
                if message["op"] == "submit":
                    scheduler.submit(request_job(cfg, by_name[message["model"]], message))
                elif message["op"] == "cancel":
                    turn += scheduler.cancel(message["id"])
                elif message["op"] == "shutdown":
                    events.send(ipc.pack({"events": scheduler.fail_all(RuntimeError("the server shut down"))}))
                    return
            turn += scheduler.run_once()
            if turn:
                events.send(ipc.pack({"events": turn}))
    finally:
        requests.close()
        events.close()
        context.term()


class EngineThread:
    """The engine loop in a thread of this process, for tests that need to reach the model (hooks, timings); it
    looks to ``EngineClient`` like the engine's process."""

    def __init__(self, folder: Path, cfg: DictConfig, served: list[Served]) -> None:
        self.pid = os.getpid()
        self.thread = threading.Thread(target=serve, args=(folder, cfg, served, False), name="ptune-engine")
        self.thread.daemon = True
        self.thread.start()

    def wait(self, timeout: float | None = None) -> int:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise subprocess.TimeoutExpired("ptune-engine", timeout)
        return 0

    def kill(self) -> None:  # a thread cannot be killed; ``shutdown`` ends it
        pass


def main(argv: list[str]) -> int:
    """Load what ``FOLDER/config.yaml`` names and serve; a config or model that fails is one ``failed`` message
    (the HTTP process prints it) and exit status 2 (config) or 1 (model)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = Path(argv[0])
    from ptune.checkpoints.config_checks import check_frontend_config
    from ptune.training.hydra_setup import route_library_logs

    cfg = OmegaConf.load(folder / CONFIG_FILE)
    code = 2
    try:
        check_frontend_config(cfg)
        route_library_logs()
        code = 1
        served = load_served(cfg)
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError, OSError, SystemExit) as err:
        context = zmq.Context()
        events = ipc.socket(context, zmq.PUSH, ipc.address(folder, ipc.EVENTS), bind=False)
        message = " ".join(str(err).split()) or type(err).__name__
        events.send(ipc.pack({"failed": {"message": message, "code": code}}))
        events.setsockopt(zmq.LINGER, 2000)  # let the one message out before the exit
        events.close()
        context.term()
        return code
    serve(folder, cfg, served)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

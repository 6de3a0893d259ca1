"""Throughput and latency of ``ptune serve`` under concurrent clients: one request at a time (``max_batch_size=1``)
against batching (the configured default).

Usage: ``.venv/bin/python benchmarks/serve_throughput.py [--checkpoint PATH] [--clients 1 4 16 64] [--rounds 3]``

Without ``--checkpoint`` it trains the built-in model briefly (``train.py max_steps=30``) into a temporary folder;
with ``--wide``, a wider random model of ChatGLM2's shape instead (:data:`WIDE`: hidden 1024, 8 heads of 128, 2
key/value groups, the built-in tokenizer), whose decode step reads ~100 MB of weights, so that, as on a real 6B
model, a step costs its weights' reading and not only Python's dispatch (the built-in model's 146k parameters).
Each round starts a fresh real server process per mode (alternating) on loopback and drives each client count in
turn: every client sends requests back to back (half of them streaming with usage, half not), ``--requests`` per
level in all (256 by default, at least two per client), greedy, ``--max-tokens`` new tokens at most. Reported per
level and mode, medians over rounds: requests/s, generated tokens/s, p50/p95 latency, p50 time to first token (the
first streamed piece; a whole answer for non-streaming requests), and each as a ratio to one-at-a-time at the same
client count, and the CPU each process used (the server's HTTP process, its engine, this benchmark's clients; Linux
only) as a share of one core. Each server first answers every prompt once, one at a time (a warm-up, untimed);
every later answer must equal that one (checked).

``--prefixes N`` adds a mixed load: the checkpoint served N times over (``checkpoint=A,A,...``, each its own prefix
tensor, so rows carry different prefixes and take the mixed-batch path) plus the bare base, requests cycling
through the N + 1 models, against the single-prefix load in the same rounds.

``--scheduler-clients N`` adds a table without HTTP: the engine's scheduler driven in-process with N requests kept
in flight (fresh processes, alternating, same prompts and settings) one at a time, with continuous batching, and
with static batches (a batch forms from whatever waited and runs until all of its rows end; this form lives only in
the benchmark). Against the HTTP table it shows what the server process's HTTP work costs the decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
TINY = REPO / "models" / "tiny-glm"
#: the processes whose CPU use each level reports: the server's HTTP process, its engine, this benchmark's clients
CPU = ("HTTP process", "engine", "clients")
#: ChatGLM2-6B's proportions (head size 128, 2 key/value groups, MLP 3.34x hidden) at a quarter of its width
WIDE = {"hidden_size": 1024, "num_attention_heads": 8, "head_dim": 128, "intermediate_size": 3424}


def wide_model(folder: Path) -> Path:
    """A random GLM of :data:`WIDE`'s shape with the built-in model's tokenizer, saved as a model folder."""
    import shutil

    import torch
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig.from_pretrained(TINY)
    for key, value in WIDE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    GlmForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY / name, folder / name)
    return folder


def train_checkpoint(folder: Path, model: Path | None = None) -> Path:
    """A prefix trained 30 steps on the built-in data (on ``model``, else the built-in model)."""
    run = folder / "run"
    subprocess.run(
        [
            sys.executable,
            "train.py",
            "max_steps=30",
            "save_steps=30",
            f"hydra.run.dir={run}",
            "trainer.report_to=[none]",
            *([f"model.path={model}"] if model else []),
        ],
        cwd=REPO,
        env=ENV,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return run / "checkpoint-30"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    checkpoint: Path, max_batch_size: int, max_tokens: int, threads: int, log: Path, prefixes: int = 1
) -> tuple[subprocess.Popen, str]:
    """The real server; ``prefixes`` > 1 serves the checkpoint that many times over (each its own prefix tensor,
    named p0, p1, ...) plus the bare base, as ``ptune serve checkpoint=A,B,...`` does."""
    port = free_port()
    settings = {
        "checkpoint": ",".join([str(checkpoint)] * prefixes),
        "port": port,
        "max_batch_size": max_batch_size,
        "max_queue": 1000,
        "generation.max_new_tokens": max_tokens,
        "generation.do_sample": "false",
        "torch_threads": threads,
    }
    if prefixes > 1:
        settings["model_names"] = "[" + ",".join(f"p{k}" for k in range(prefixes)) + "]"
    command = [sys.executable, "-m", "ptune.serve.app", *(f"{key}={value}" for key, value in settings.items())]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


async def one_request(client: httpx.AsyncClient, prompt: str, stream: bool, model: str | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    start = time.perf_counter()
    first = None
    if not stream:
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        done = response.json()
        end = time.perf_counter()
        text, tokens = done["choices"][0]["message"]["content"], done["usage"]["completion_tokens"]
    else:
        body["stream_options"] = {"include_usage": True}
        pieces, tokens = [], 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        pieces.append(choice["delta"]["content"])
        end = time.perf_counter()
        text = "".join(pieces)
    ttft = (first or end) - start
    return {"prompt": f"{model}|{prompt}", "text": text, "tokens": tokens, "latency": end - start, "ttft": ttft}


async def drive(
    url: str, prompts: list[str], clients: int, requests: int, models: list[str] | None = None
) -> tuple[float, list[dict]]:
    """``clients`` concurrent clients share ``requests`` requests, each sending its next as soon as one ends
    (request k asks ``models[k % len(models)]``: a mixed load; None: the server's default model)."""
    queue = list(range(requests))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while queue:
                k = queue.pop(0)
                model = models[k % len(models)] if models else None
                results.append(await one_request(client, prompts[k % len(prompts)], k % 2 == 1, model))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - start, results


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process ``pid`` has used so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def plain(value: float) -> str:
    """Three significant digits as a plain number with thousands separators (``1,560``, ``27.6``, ``0.037``):
    ``:.3g`` would print ``1.56e+03`` in the tokens/s column."""
    rounded = float(f"{value:.3g}")
    if rounded == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(rounded))))
    text = f"{rounded:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if decimals else text


def cell(value: float, base: float) -> str:
    """A table cell: the value and its ratio to the one-at-a-time mode's."""
    return f"{plain(value)} ({value / base:.2f}x)"


def summarise(wall: float, results: list[dict]) -> dict[str, float]:
    latencies = [r["latency"] for r in results]
    return {
        "req/s": len(results) / wall,
        "tok/s": sum(r["tokens"] for r in results) / wall,
        "p50 s": percentile(latencies, 0.5),
        "p95 s": percentile(latencies, 0.95),
        "ttft s": percentile([r["ttft"] for r in results], 0.5),
    }


def scheduler_run(checkpoint: Path, mode: str, size: int, clients: int, requests: int, max_tokens: int) -> float:
    """Generated tokens/s of ``ptune.serve.scheduler.Scheduler`` alone (no HTTP, no engine messages), in this
    process: ``clients`` requests kept in flight, the next submitted as soon as one is answered."""
    import torch

    from ptune.frontends.common import compose_frontend_config, load_model
    from ptune.inference.generation import GenerationSettings, encode_prompt
    from ptune.serve.scheduler import Job, Scheduler

    class StaticBatches(Scheduler):
        def _slots_to_fill(self) -> int:  # nobody joins a running batch
            return 0 if self.active else self.max_batch_size

    torch.set_num_threads(1)
    loaded = load_model(compose_frontend_config([f"checkpoint={checkpoint}"]))
    prompts = [encode_prompt(loaded, prompt) for prompt in dev_prompts()]
    settings = GenerationSettings(max_new_tokens=max_tokens)
    scheduler = (StaticBatches if mode == "static" else Scheduler)(loaded, size)
    sent, in_flight, tokens = 0, 0, 0
    start = time.perf_counter()
    while sent < requests or scheduler.busy:
        while in_flight < clients and sent < requests:  # half of them streaming (text made, sent to nobody)
            prepare = lambda k=sent: (prompts[k % len(prompts)], settings)  # noqa: E731
            scheduler.submit(Job(str(sent), prepare, stream=sent % 2 == 1))
            sent, in_flight = sent + 1, in_flight + 1
        for event in scheduler.run_once():
            if event["kind"] == "done":
                tokens, in_flight = tokens + event["completion_tokens"], in_flight - 1
    return tokens / (time.perf_counter() - start)


def dev_prompts() -> list[str]:
    rows = [json.loads(line) for line in (REPO / "data" / "synthetic_adgen" / "dev.json").read_text().splitlines()]
    return [row["content"] for row in rows][:64]


def scheduler_table(args: argparse.Namespace, checkpoint: Path) -> None:
    modes = {
        "one at a time": ("continuous", 1),
        "continuous batching": ("continuous", args.batch_size),
        "static batches": ("static", args.batch_size),
    }
    measured: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for name, (kind, size) in modes.items():
            command = [sys.executable, __file__, "--scheduler-run", kind, str(size), str(checkpoint)]
            command += ["--scheduler-clients", str(args.scheduler_clients), "--requests", str(args.requests)]
            command += ["--max-tokens", str(args.max_tokens)]
            done = subprocess.run(command, cwd=REPO, env=ENV, check=True, capture_output=True, text=True)
            measured[name].append(float(done.stdout.strip().splitlines()[-1]))
    base = statistics.median(measured["one at a time"])
    print(f"\nThe scheduler alone (no HTTP), {args.scheduler_clients} client threads, medians of {args.rounds}:\n")
    print("| mode | generated tokens/s |\n|---|---|")
    for name, values in measured.items():
        print(f"| {name} | {cell(statistics.median(values), base)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--wide", action="store_true", help="a wider random ChatGLM2-shaped model (see above)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--requests", type=int, default=256, help="requests per client level (at least 2 per client; fewer is noisier)"
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16, help="the batched mode's max_batch_size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--prefixes", type=int, default=1, help="also a mixed load: the checkpoint served N times over plus the base"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="the server's torch threads (1 leaves a core to the clients)"
    )
    parser.add_argument(
        "--scheduler-clients", type=int, help="also drive the scheduler in-process (no HTTP) with this many clients"
    )
    parser.add_argument("--scheduler-run", nargs=3, metavar=("KIND", "SIZE", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scheduler_run:  # one in-process measurement, in a fresh process of its own
        kind, size, path = args.scheduler_run
        print(scheduler_run(Path(path), kind, int(size), args.scheduler_clients, args.requests, args.max_tokens))
        return
    work = Path(tempfile.mkdtemp(prefix="ptune-serve-bench-"))
    checkpoint = args.checkpoint or train_checkpoint(work, wide_model(work / "wide") if args.wide else None)
    prompts = dev_prompts()
    modes = {"one at a time": (1, 1), f"batched ({args.batch_size})": (args.batch_size, 1)}
    if args.prefixes > 1:
        modes[f"batched ({args.batch_size}), {args.prefixes} prefixes + base"] = (args.batch_size, args.prefixes)
    measured: dict[tuple[str, int], list[dict[str, float]]] = {}
    answers: dict[str, str] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for mode, (size, prefixes) in modes.items():
            proc, url = start_server(checkpoint, size, args.max_tokens, args.threads, work / "server.log", prefixes)
            served = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] if prefixes > 1 else None
            try:  # warm-up, one prompt at a time: the answers every later one must equal
                _, alone = asyncio.run(drive(url, prompts, 1, len(prompts) * len(served or [0]), served))
                for r in alone:
                    if answers.setdefault(r["prompt"], r["text"]) != r["text"]:
                        raise AssertionError(f"{mode}: the answer asked alone differs for {r['prompt']!r}")
                pids = (proc.pid, httpx.get(f"{url}/health").json()["engine_pid"], os.getpid())
                for clients in args.clients:
                    requests = max(args.requests, 2 * clients)
                    before = [cpu_seconds(pid) for pid in pids]
                    wall, results = asyncio.run(drive(url, prompts, clients, requests, served))
                    cpu = {key: (cpu_seconds(pid) - b) / wall for key, pid, b in zip(CPU, pids, before, strict=True)}
                    for r in results:  # greedy: every answer equals the first one seen for its prompt
                        if answers.setdefault(r["prompt"], r["text"]) != r["text"]:
                            raise AssertionError(f"{mode}, {clients} clients: answer differs for {r['prompt']!r}")
                    measured.setdefault((mode, clients), []).append(summarise(wall, results) | cpu)
            finally:
                proc.terminate()
                proc.wait(30)
            loads.append(os.getloadavg()[0])
    base_mode = next(iter(modes))
    print(
        f"\n{platform.machine()} CPU, {os.cpu_count()} cores, server torch threads: {args.threads}; "
        f"{time.strftime('%Y-%m-%d')}; "
        f"medians of {args.rounds} alternating rounds; load average (1 min) {min(loads):.2f}-{max(loads):.2f}; "
        f"{args.max_tokens} new tokens at most, greedy, half the requests streamed; answers equal (checked)\n"
    )
    keys = ["req/s", "tok/s", "p50 s", "p95 s", "ttft s"]
    print("| clients | mode | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for clients in args.clients:
        base = {k: statistics.median(m[k] for m in measured[(base_mode, clients)]) for k in keys}
        for mode in modes:
            med = {k: statistics.median(m[k] for m in measured[(mode, clients)]) for k in keys}
            cells = [cell(med[k], base[k]) for k in keys]
            print(f"| {clients} | {mode} | " + " | ".join(cells) + " |")
    print(f"\nCPU used while each level ran, as a share of one core (medians; the machine has {os.cpu_count()}):\n")
    print("| clients | mode | " + " | ".join(CPU) + " |")
    print("|---|---|" + "---|" * len(CPU))
    for clients in args.clients:
        for mode in modes:
            shares = [statistics.median(m[k] for m in measured[(mode, clients)]) for k in CPU]
            print(f"| {clients} | {mode} | " + " | ".join(f"{share:.0%}" for share in shares) + " |")
    if args.scheduler_clients:
        scheduler_table(args, checkpoint)


if __name__ == "__main__":
    main()

"""``ptune chat`` driven through a pseudo-terminal: streaming, history, clear, Ctrl-C, exit."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys

import pexpect
import pytest
from safetensors.torch import load_file, save_file

from ptune.cli import FRONT_ENDS
from ptune.data.reading import Example
from ptune.frontends.chat import chat
from ptune.frontends.common import compose_frontend_config, fit_prompt, generation_settings, load_model
from ptune.inference.generation import (
    GenerationSettings,
    decode,
    encode_prompt,
    eos_ids,
    fit_history,
    generate_answers,
    generate_ids,
)
from ptune.inference.loading import load_checkpoint
from ptune.training.recipe import train
from tests.conftest import FAST, REPO, compose_train, make_tiny_model, streamed

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
Q1, Q2 = "类型#裙*颜色#红色*风格#复古", "再短一点"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    train(compose_train(*FAST, "max_steps=30", "save_steps=30", cache_dir=root / "cache"), str(root / "run"))
    return root / "run" / "checkpoint-30"


def spawn(*overrides: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ptune.frontends.chat", "torch_threads=1", "generation.max_new_tokens=48", *overrides],
        cwd=str(REPO),
        env=ENV,
        encoding="utf-8",
        timeout=120,
        # as in a terminal's foreground job, even when the test runner was started with SIGINT ignored (a background
        # job of a non-interactive shell): Python only raises KeyboardInterrupt if SIGINT was not ignored at start
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child.expect("Ctrl-C stops an answer")
    return child


def ask(child: pexpect.spawn, query: str) -> str:
    child.expect_exact("You: ")
    child.sendline(query)
    child.expect_exact("Model: ")
    child.expect_exact("\r\nYou: ")
    answer = child.before.replace("\r\n", "\n").strip()  # the terminal writes newlines as CR LF
    child.sendline("")  # an empty line: no question, just the next prompt
    return answer


def test_two_turns_use_history_and_clear_resets_it(checkpoint):
    loaded = load_model(compose_frontend_config([f"checkpoint={checkpoint}", "max_source_length=512"]))
    settings = GenerationSettings(max_new_tokens=48)
    a1 = generate_answers(loaded, [Example(Q1, "")], settings, 1)[0]
    with_history = generate_answers(loaded, [Example(Q2, "", ((Q1, a1),))], settings, 1)[0]
    alone = generate_answers(loaded, [Example(Q2, "")], settings, 1)[0]
    assert with_history != alone  # so the test below can tell whether history was used

    child = spawn(f"checkpoint={checkpoint}", "max_source_length=512")  # room for the history
    assert checkpoint.name in child.before  # the banner names what is loaded
    assert ask(child, Q1) == a1  # the evaluator's answer: one generation path
    assert ask(child, Q2) == with_history
    child.expect_exact("You: ")
    child.sendline("clear")
    child.expect_exact("(history cleared)")
    assert ask(child, Q2) == alone
    child.expect_exact("You: ")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory):
    """A random base that can never end an answer, so only Ctrl-C can stop it: its output rows for the stop ids
    are zero, so their logit is 0 while the largest of the other ~100 random logits is positive. (A random model
    alone is not enough: its greedy cycle can drift into eos after a few thousand tokens, numerics permitting.)"""
    folder = make_tiny_model("glm", tmp_path_factory.mktemp("endless"), seed=1)
    cfg = compose_frontend_config([f"model.path={folder}", "generation.max_new_tokens=400"])
    loaded = load_model(cfg)
    weights = load_file(folder / "model.safetensors")
    head = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    weights[head][eos_ids(loaded)] = 0.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(cfg)
    prompt = encode_prompt(loaded, Q1)
    _, answer = next(generate_ids(loaded, [prompt], generation_settings(cfg), 1))
    assert len(answer) == 400  # ran to the limit: no eos
    return folder


def test_ctrl_c_stops_an_answer_and_keeps_the_session(endless_model):
    # no cap either (max_new_tokens_limit, 2048 by default, ends an answer in seconds on an idle machine)
    child = spawn(f"model.path={endless_model}", "generation.max_new_tokens=1000000", "max_new_tokens_limit=1000000")
    child.expect_exact("You: ")
    child.sendline(Q1)
    child.expect_exact("Model: ")
    child.expect(r"\S{20}")  # streaming: text appears before the answer is done
    child.sendintr()
    child.expect_exact("[stopped]", timeout=30)
    child.expect_exact("You: ")
    child.sendline("clear")
    child.expect_exact("(history cleared)")
    child.sendeof()  # Ctrl-D quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# ---------------------------------------------------------------------------------------------------------------
# Help, errors, prompt length (all three front ends)


@pytest.mark.parametrize("front_end", ["chat", "web", "serve"])
def test_front_ends_print_their_options_and_one_line_errors(front_end, tmp_path, capsys):
    module = importlib.import_module(FRONT_ENDS[front_end])
    assert module.main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert f"ptune {front_end} checkpoint=" in shown  # the usage...
    assert "max_batch_size:" in shown and "# a ptune checkpoint folder" in shown  # ...and conf/chat.yaml, commented
    assert module.main([f"checkpoint={tmp_path / 'nothing'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "nothing" in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert module.main(["no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no_such_key" in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_train_help_imports_neither_torch_nor_transformers():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", "--help"], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0 and "Powered by Hydra" in done.stdout and "max_steps" in done.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "hydra" in imported and not imported & {"torch", "transformers", "datasets"}


def test_the_prompt_limit_is_the_checkpoints_length_within_the_models_positions(checkpoint):
    trained = load_checkpoint(checkpoint).max_source_length
    assert load_model(compose_frontend_config([f"checkpoint={checkpoint}"])).max_source_length == min(trained, 512)
    wide = load_model(compose_frontend_config([f"checkpoint={checkpoint}", "max_source_length=5000"]))
    assert wide.max_source_length == 512  # models/tiny-glm has 512 positions
    bare = load_model(compose_frontend_config([f"model.path={REPO / 'models' / 'tiny-glm'}"]))
    assert bare.max_source_length == 512


def typed(lines: list[str]):
    """``chat``'s ``read``: the lines in order, then end of input (Ctrl-D)."""
    queue = iter(lines)

    def read(_prompt: str) -> str:
        try:
            return next(queue)
        except StopIteration:
            raise EOFError from None

    return read


def test_a_long_conversation_drops_its_oldest_turns_keeps_the_newest_and_says_so(checkpoint):
    loaded = load_model(compose_frontend_config([f"checkpoint={checkpoint}"]))
    history = [(f"第{k}轮", "好" * 6) for k in range(12)]
    cut = decode(loaded.tokenizer, encode_prompt(loaded, Q2, history))
    assert Q2 not in cut  # cut at the end, as in training: the newest turn would be lost
    kept, dropped = fit_history(loaded, Q2, history)
    assert 0 < dropped < len(history) and kept == history[dropped:]
    prompt = encode_prompt(loaded, Q2, kept, truncate=False)
    assert len(prompt) <= loaded.max_source_length and Q2 in decode(loaded.tokenizer, prompt)
    assert len(encode_prompt(loaded, Q2, history[dropped - 1 :], truncate=False)) > loaded.max_source_length

    written: list[str] = []
    chat(loaded, GenerationSettings(max_new_tokens=48), read=typed([Q1, Q1, Q1]), write=written.append)
    assert "history are left out" in "".join(written) and "max_source_length" in "".join(written)


def test_a_message_longer_than_the_prompt_is_cut_and_the_chat_says_so(checkpoint):
    loaded = load_model(compose_frontend_config([f"checkpoint={checkpoint}", "max_source_length=24"]))
    long_query = "类型#裙*颜色#红色*风格#复古*图案#条纹*裙长#长裙*裙款式#拼接" * 3
    assert len(encode_prompt(loaded, long_query, truncate=False)) > 24
    kept, note = fit_prompt(loaded, long_query, [("短", "好")])
    assert kept == [] and "history is left out and your message is longer than the prompt's 24 tokens" in note
    assert fit_prompt(loaded, "短", []) == ([], "")  # nothing to say
    written: list[str] = []
    chat(loaded, GenerationSettings(max_new_tokens=4), read=typed([long_query]), write=written.append)
    assert "your message is longer than the prompt's 24 tokens (max_source_length): its end is cut" in "".join(written)


def test_streamed_text_of_a_long_answer_decodes_a_window_per_token_and_ends_as_the_answer(endless_model):
    loaded = load_model(compose_frontend_config([f"model.path={endless_model}"]))
    settings = GenerationSettings(max_new_tokens=300, do_sample=True, temperature=1.5, top_p=1.0, seed=7)
    for _, ids in generate_ids(loaded, [encode_prompt(loaded, Q1), encode_prompt(loaded, Q2)], settings, 2):
        assert len(ids) == 300  # long: decoding all of it at every token would show below
        shown, longest = streamed(loaded.tokenizer, ids)
        final = decode(loaded.tokenizer, ids)
        assert shown[-1] == final and all(final.startswith(s) for s in shown)
        assert len(set(shown)) > 100  # it grew token by token
        assert longest <= 8

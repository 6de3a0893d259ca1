"""``ptune web``: the real page, started as ``python -m ptune.frontends.web``, driven in a real headless Chromium.

Chromium is Debian's (/usr/bin/chromium), installed by scripts/install_chromium.sh when missing (root and apt
needed; the tests skip, saying why, where that cannot be done). Screenshots: artifacts/web_chat.png on every run,
docs/web_demo.png (the README's) only with PTUNE_UPDATE_SCREENSHOT=1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ptune.data.reading import Example
from ptune.frontends.common import compose_frontend_config, describe, generation_settings, load_model
from ptune.inference.generation import generate_answers
from ptune.training.recipe import train
from tests.conftest import FAST, REPO, compose_train, stop_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--no-proxy-server",  # the page is on loopback; never route it through a proxy from the environment
]
FIRST, SECOND = "类型#裙*颜色#红色*风格#复古", "你好"  # FIRST as Markdown: two '*' lost, the middle in italics
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_one_answer_at_a_time_and_the_page_is_the_history():
    """No browser: both ways of sending share one queue slot, and the history is read back from the chat."""
    import gradio as gr

    import ptune.frontends.web as web

    demo = web.build_demo(compose_frontend_config([]), SimpleNamespace(base_path="base", checkpoint="ckpt"))
    (respond,) = [f for f in demo.fns.values() if f.name == "respond"]
    assert respond.concurrency_limit == 1 and {event for _, event in respond.targets} == {"click", "submit"}
    chatbot = gr.Chatbot()
    turns = [("q1", "a1"), ("q2", "**a**\n<b>2</b>"), (FIRST + " \\* `x`", "a3")]
    page = chatbot.preprocess(chatbot.postprocess([*web.to_messages(turns), {"role": "user", "content": "open"}]))
    assert web.history_pairs(page) == turns  # Gradio 6 hands content back as parts; the text comes back exactly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"ptune web exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with NO_PROXY.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def chromium() -> Path:
    """/usr/bin/chromium, installed with scripts/install_chromium.sh (apt, as root) when missing."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
    if not CHROMIUM.exists():
        if os.geteuid() != 0:
            pytest.skip("chromium is missing and installing it needs root: sudo scripts/install_chromium.sh")
        if shutil.which("apt-get") is None:
            pytest.skip("chromium is missing and there is no apt-get to install it (Debian's chromium package)")
        try:
            done = subprocess.run(
                ["bash", str(REPO / "scripts" / "install_chromium.sh")], capture_output=True, text=True, timeout=900
            )
        except subprocess.TimeoutExpired:
            pytest.skip("scripts/install_chromium.sh did not finish within 15 minutes")
        if done.returncode != 0 or not CHROMIUM.exists():
            pytest.skip(f"scripts/install_chromium.sh failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    """The page's command line: a short real training run of the built-in default, greedy, one torch thread, room
    for the history (the checkpoint was trained with 64 prompt tokens)."""
    root = tmp_path_factory.mktemp("web")
    train(compose_train(*FAST, cache_dir=root / "cache"), str(root / "run"))
    return [
        f"checkpoint={root / 'run' / 'checkpoint-6'}",
        "torch_threads=1",
        "generation.do_sample=false",
        "max_source_length=512",
    ]


@pytest.fixture(scope="module")
def greedy(overrides):
    """The evaluator's answers (generate_answers) with the settings the page starts with, in this process."""
    cfg = compose_frontend_config(overrides)
    threads = torch.get_num_threads()
    loaded = load_model(cfg)  # torch_threads=1, as in the server: the same arithmetic
    settings = generation_settings(
        cfg, max_new_tokens=cfg.generation.max_new_tokens, top_p=cfg.generation.top_p, temperature=0
    )

    def answer(query: str, history: tuple[tuple[str, str], ...] = ()) -> str:
        return generate_answers(loaded, [Example(query, "", history)], settings, batch_size=1)[0]

    yield loaded, answer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(overrides, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("web-log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ptune.frontends.web", *overrides, f"port={port}"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, proc, log)
        yield url
    finally:
        stop_process(proc)


# Records every text the newest answer shows, to see it grow while it streams.
WATCH_ANSWERS = """() => {
  window.__answers = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chat [data-testid=bot]');
    if (bots.length) window.__answers.push([bots.length, bots[bots.length - 1].innerText]);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def ask(page, query: str, expected: str, press_enter: bool) -> list[str]:
    """Send ``query``, wait for the answer to equal ``expected`` and the page to be ready; the texts it showed."""
    from playwright.sync_api import expect

    turns = page.locator("#chat [data-testid=bot]").count()
    page.evaluate("window.__answers = []")
    page.fill("#query textarea", query)
    if press_enter:
        page.press("#query textarea", "Enter")
    else:
        page.click("#send")
    answer = page.locator("#chat [data-testid=bot]").nth(turns)
    expect(answer).to_have_text(expected, use_inner_text=True, timeout=30_000)
    expect(page.locator("#send")).to_be_enabled(timeout=10_000)  # the answer is done: Send is back on
    expect(page.locator("#query textarea")).to_have_value("")
    return [text for n, text in page.evaluate("window.__answers") if n == turns + 1]


def save_screenshot(page, name: str) -> None:
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / name), full_page=True)
    if os.environ.get("PTUNE_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        page.screenshot(path=str(REPO / "docs" / "web_demo.png"), full_page=True)


def test_chat_streams_the_evaluators_answers_with_history_and_clears(server, browser, greedy):
    from playwright.sync_api import expect

    loaded, answer = greedy
    first = answer(FIRST)
    second = answer(SECOND, ((FIRST, first),))
    alone = answer(SECOND)
    assert first and second and second != alone  # the history changes the answer, so the check below means it

    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(server)
    expect(page.locator("#model-line")).to_contain_text(describe(loaded), timeout=30_000)
    assert loaded.checkpoint.endswith("checkpoint-6") and str(REPO / "models" / "tiny-glm") in describe(loaded)
    page.evaluate(WATCH_ANSWERS)

    shown = ask(page, FIRST, first, press_enter=True)
    growing = [t for t in dict.fromkeys(shown) if t]
    assert len(growing) >= 3, f"the answer did not stream: {growing}"  # it appeared piece by piece...
    assert [len(t) for t in growing] == sorted(len(t) for t in growing)  # ...and only grew
    user_turn = page.locator("#chat [data-testid=user]").first
    assert user_turn.inner_text() == FIRST and user_turn.locator("em, strong").count() == 0  # plain text

    ask(page, SECOND, second, press_enter=False)  # the second turn is answered with the first as history
    assert page.locator("#chat [data-testid=bot]").count() == 2
    save_screenshot(page, "web_chat.png")

    page.click("#clear")
    expect(page.locator("#chat [data-testid=user]")).to_have_count(0)
    expect(page.locator("#chat [data-testid=bot]")).to_have_count(0)
    ask(page, SECOND, alone, press_enter=True)  # after Clear there is no history
    assert page.locator("#chat [data-testid=bot]").count() == 1
    page.close()


# Markdown that must render, and HTML that must not run: each payload would set window.__pwned.
INJECTION = """**bold** and `inline code`

```html
<script>window.__pwned = 'code block'</script>
```

<img src=x onerror="window.__pwned='img'"> <script>window.__pwned='script'</script>
<svg onload="window.__pwned='svg'"><circle r=5></circle></svg> <a href="javascript:window.__pwned='link'">link</a>
<iframe src="javascript:window.__pwned='iframe'"></iframe> <details open ontoggle="window.__pwned='details'">x</details>
<thinking onmouseover="window.__pwned='custom tag'">t</thinking> <b style="color:red">styled</b>"""

UNSAFE_IN_CHAT = """() => {
  const chat = document.querySelector('#chat');
  const found = [];
  for (const el of chat.querySelectorAll('*')) {
    for (const a of el.attributes) {
      if (a.name.startsWith('on')) found.push(el.tagName + '[' + a.name + ']');
      if (/^\\s*javascript:/i.test(a.value)) found.push(el.tagName + '[' + a.name + '=javascript:]');
    }
    if (['SCRIPT', 'IFRAME', 'OBJECT', 'EMBED', 'THINKING'].includes(el.tagName)) found.push(el.tagName);
  }
  return found;
}"""


@pytest.mark.filterwarnings("ignore:::gradio.queueing")  # pandas deprecations inside Gradio's queue
def test_html_in_answers_does_not_reach_the_page(browser, greedy, monkeypatch):
    """The page (build_demo, in this process) with its model answering HTML and Markdown: Markdown renders, code
    shows literally, no script, handler or javascript: link gets into the DOM, nothing runs. The same payload as
    the user's message checks the other side of the chat."""
    from playwright.sync_api import expect

    import ptune.frontends.web as web

    loaded, _ = greedy

    def fake_stream_answer(loaded, query, history, settings, stop=None):
        for end in range(0, len(INJECTION) + 40, 40):  # grows like a real answer, through partial tags
            time.sleep(0.01)
            yield INJECTION[:end]

    monkeypatch.setattr(web, "stream_answer", fake_stream_answer)
    demo = web.build_demo(compose_frontend_config(["generation.do_sample=false"]), loaded)
    port = free_port()
    demo.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True
    )
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        expect(page.locator("#model-line")).to_contain_text(describe(loaded), timeout=30_000)
        page.fill("#query textarea", INJECTION)
        page.click("#send")
        bot = page.locator("#chat [data-testid=bot]").last
        expect(bot).to_contain_text("styled", timeout=20_000)  # the end of the answer
        expect(page.locator("#send")).to_be_enabled(timeout=10_000)
        expect(bot.locator("strong")).to_have_text("bold")  # Markdown renders
        expect(bot.locator("pre code")).to_contain_text("<script>window.__pwned = 'code block'</script>")
        expect(bot).to_contain_text("styled")
        user_turn = page.locator("#chat [data-testid=user]").last  # the user's copy shows as typed, no Markdown
        assert user_turn.locator("strong, pre, code, img, svg, a").count() == 0
        expect(user_turn).to_contain_text("**bold** and `inline code`")
        expect(user_turn).to_contain_text("<script>window.__pwned = 'code block'</script>")
        page.wait_for_timeout(500)  # time for an <img onerror> to fire, were it there
        assert page.evaluate(UNSAFE_IN_CHAT) == []
        assert page.locator("#chat img[onerror], #chat script, #chat iframe").count() == 0
        assert page.evaluate("window.__pwned") is None
        bot.hover()
        bot.locator("a", has_text="link").click()  # what is left of the link does nothing either
        page.wait_for_timeout(200)
        assert page.evaluate("window.__pwned") is None
        page.close()
    finally:
        demo.close()


def test_the_command_prints_its_address_not_gradios_share_hint(overrides, monkeypatch, capsys):
    """`ptune web` says where the page is; Gradio's "set `share=True` in `launch()`" is not for a ptune user."""
    import gradio as gr

    import ptune.frontends.web as web

    monkeypatch.setattr(gr.Blocks, "block_thread", lambda demo: demo.close())  # up, then stopped at once
    port = free_port()
    assert web.main([*overrides, f"port={port}"]) == 0
    printed = capsys.readouterr().out
    assert f"ptune web: open http://127.0.0.1:{port}/ (Ctrl-C stops it)" in printed and "share=True" not in printed


def test_api_key_is_required_on_the_page_and_an_open_page_beyond_loopback_warns(caplog):
    """Gradio's login with the api_key as password, on the real page server (no browser needed)."""
    import ptune.frontends.web as web

    cfg = compose_frontend_config(["api_key=s3cret"])
    demo = web.build_demo(cfg, SimpleNamespace(base_path="base", checkpoint="ckpt"))
    port = free_port()
    demo.queue().launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        ssr_mode=False,
        quiet=True,
        **web.access(cfg),
    )
    try:
        import httpx

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30) as client:
            assert client.get("/config").status_code == 401  # nothing of the app without logging in
            assert client.post("/login", data={"username": "me", "password": "wrong"}).status_code == 400
            assert client.get("/config").status_code == 401
            assert client.post("/login", data={"username": "me", "password": "s3cret"}).status_code == 200
            assert client.get("/config").status_code == 200
    finally:
        demo.close()
    caplog.set_level("WARNING")
    assert web.access(compose_frontend_config(["host=0.0.0.0"])) == {}
    assert "without api_key" in caplog.text
    caplog.clear()
    web.access(compose_frontend_config(["host=0.0.0.0", "api_key=k"]))
    web.access(compose_frontend_config([]))
    assert "without api_key" not in caplog.text

"""The chat page in a real headless Chromium (Debian's, driven by Playwright), on the embedded default model.

It asks two questions, sees the first answer stream in token by token, reads the trust card, hovers a
resampled token, switches the shading, downloads the transcript and checks it with `olmo-tap audit`.
Screenshots go to test-artifacts/ (desktop light, phone dark).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from olmo_tap.cli import main as olmo_tap_main
from olmo_tap.serve.app import create_app
from olmo_tap.serve.live import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
MODEL_ID = "smollm2-135m-instruct"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(smollm):
    model, tokenizer = smollm
    with LiveServer(create_app(model, tokenizer, MODEL_ID)) as live:
        yield live


def ask(page, question: str, n_answers: int) -> None:
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_selector(f".msg.assistant >> nth={n_answers - 1} >> .card", timeout=180_000)


def test_page_streams_an_answer_with_its_trust_card(browser, server, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1000, "height": 900}, color_scheme="light", accept_downloads=True)
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/completions") else None)
    page.goto(server.url)
    page.wait_for_function("document.getElementById('model-name').textContent.includes('smollm2')")
    page.click("#settings summary")
    page.fill("input[name=temperature]", "0.8")
    page.fill("input[name=seed]", "3")
    page.fill("input[name=max_tokens]", "48")
    page.fill("#prompt", "Give two tips for staying focused while studying.")
    page.click("#send")
    # streamed: tokens are on the page while the answer is still being written
    page.wait_for_selector(".answer.streaming .tok", timeout=120_000)
    page.wait_for_selector(".msg.assistant .card", timeout=180_000)

    answer = page.locator(".msg.assistant").first
    card_text = answer.locator(".card").inner_text()
    # the embedded default is a jury trained apart: the card certifies (clones: tests/test_default_jury.py)
    assert "Certified by the jury" in card_text and "identical heads" not in card_text
    n_tokens = int(re.search(r"tokens\s+(\d+)", card_text).group(1))
    tokens = answer.locator(".tok")
    assert tokens.count() == n_tokens > 0
    assert "acceptance" in card_text and "lowest stability" in card_text and "seed 3" in card_text
    # the shading follows the chosen signal
    by_entropy = [tokens.nth(i).evaluate("e => e.style.backgroundColor") for i in range(n_tokens)]
    page.select_option("#signal", "stability")
    by_stability = [tokens.nth(i).evaluate("e => e.style.backgroundColor") for i in range(n_tokens)]
    assert by_entropy != by_stability and "stability" in page.inner_text("#legend")
    page.select_option("#signal", "entropy")
    # a resampled token shows its rejected draft and validity radius on hover
    resampled = answer.locator(".tok.resampled")
    assert resampled.count() > 0, "no resampled token: pick another seed for this test"
    resampled.first.hover()
    tip = page.inner_text("#tip")
    assert "rejected draft" in tip and "validity radius" in tip
    page.screenshot(path=str(ARTIFACTS / "serve-page.png"))

    # the transcript button saves what `olmo-tap audit` checks
    with page.expect_download() as download:
        answer.locator("button.download").click()
    path = tmp_path / "transcript.json"
    download.value.save_as(path)
    saved = json.loads(path.read_text())
    assert saved["model"] == MODEL_ID
    assert olmo_tap_main(["audit", str(path)]) == 0
    # the card quotes the transcript's digest (its full value on hover)
    digest = answer.locator(".stat.digest")
    assert digest.get_attribute("title").startswith(saved["digest"])
    assert saved["digest"].removeprefix("sha256:")[:12] in digest.inner_text()

    # multi-turn: the second request carries the first exchange
    page.mouse.move(0, 0)
    ask(page, "Now say it in one sentence.", 2)
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert sent[-1]["stream"] is True and sent[-1]["seed"] == 3
    page.close()


def test_page_on_a_phone_in_dark_mode(browser, server):
    page = browser.new_page(viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True)
    page.goto(server.url)
    page.click("#settings summary")
    page.fill("input[name=max_tokens]", "32")
    page.click("#settings summary")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .card", timeout=180_000)
    # nothing wider than the screen, and the dark palette is in use
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert sum(int(c) for c in re.findall(r"\d+", background)[:3]) < 3 * 64
    page.screenshot(path=str(ARTIFACTS / "serve-page-phone-dark.png"))
    page.close()

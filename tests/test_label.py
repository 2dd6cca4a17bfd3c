"""Tier 2: `relay label` in a real browser (Debian's chromium, headless, driven by Playwright): comparisons sampled
from the tiny policy on vLLM, two people labelling at once by mouse and keyboard, every choice in the SQLite store,
and the page on a phone-sized screen. The screenshots are kept in tests/artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jobs.label import add_comparisons, start
from relay.labels import LabelStore
from tests.conftest import tiny_run_config
from tests.live_ray import free_port

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the workplace's probe starts it: headless, and nothing that reaches for the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def label_page(ray_session, tiny_model, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("label")
    config = tiny_run_config(root / "run", "data.eval_prompts=6")
    store = LabelStore(root / "labels.sqlite")
    assert add_comparisons(config, [str(tiny_model)], store, 6) == 6
    port = free_port()
    start(store.path, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}/", store
    serve.shutdown()


def test_two_people_label_by_mouse_and_keyboard_and_every_choice_is_stored(label_page):
    from playwright.sync_api import sync_playwright

    address, store = label_page
    comparisons = {store.comparison(i).prompt for i in range(1, 7)}
    assert len(comparisons) == 6
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ana = browser.new_context().new_page()
        ben = browser.new_context().new_page()
        ana.goto(address + "?labeller=ana")
        ben.goto(address + "?labeller=ben")
        for page in (ana, ben):
            page.wait_for_function("document.getElementById('prompt').textContent.length > 0")
        ana.screenshot(path=str(ARTIFACTS / "label-page.png"), full_page=True)

        def shown(page) -> str:
            return page.locator("#prompt").text_content()

        # Interleaved, as two people at once: ana by mouse, ben by keyboard.
        seen = {"ana": [], "ben": []}
        for ana_choice, ben_key in (("#choose-a", "1"), ("#choose-b", "ArrowRight"), ("#choose-tie", "3"),
                                    ("#choose-skip", "s"), ("#choose-a", "ArrowLeft"), ("#choose-b", "2")):
            seen["ana"].append(shown(ana))
            before = shown(ana)
            ana.click(ana_choice)
            seen["ben"].append(shown(ben))
            ben_before = shown(ben)
            ben.keyboard.press(ben_key)
            for page, old in ((ana, before), (ben, ben_before)):  # the next comparison, or the end
                page.wait_for_function(
                    "old => document.getElementById('prompt').textContent !== old || "
                    "getComputedStyle(document.getElementById('done')).display !== 'none'", arg=old)
        for page in (ana, ben):  # (the total each shows may miss the other's last choice, made after its fetch)
            assert page.locator("#done").is_visible()
            assert page.locator("#count").text_content().startswith("6 labelled by you, ")

        # A phone-sized screen: the answers stack, and every button is on screen.
        phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True).new_page()
        phone.goto(address)  # no name given: the page makes up an id and keeps it
        phone.wait_for_function("document.getElementById('prompt').textContent.length > 0")
        a, b = phone.locator("#answer-a").bounding_box(), phone.locator("#answer-b").bounding_box()
        assert b["y"] > a["y"] + a["height"] - 1 and a["width"] > 300
        for button in ("#choose-a", "#choose-b", "#choose-tie", "#choose-skip"):
            box = phone.locator(button).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390
        phone.screenshot(path=str(ARTIFACTS / "label-page-phone.png"), full_page=True)
        phone_labeller = phone.evaluate("localStorage.getItem('relay-labeller')")
        assert phone_labeller.startswith("browser-")
        phone.click("#choose-tie")
        phone.wait_for_function("document.getElementById('count').textContent.startsWith('1 labelled by you')")
        browser.close()

    # Each person saw every comparison once, and every choice is in the store, as clicked or pressed.
    assert sorted(seen["ana"]) == sorted(comparisons) and sorted(seen["ben"]) == sorted(comparisons)
    assert store.counts() == {"a": 2 + 2, "b": 2 + 2, "tie": 1 + 1 + 1, "skip": 1 + 1, "comparisons": 6}
    assert store.labelled_by("ana") == store.labelled_by("ben") == 6 and store.labelled_by(phone_labeller) == 1
    assert len(store.preference_rows()) == 8  # the a/b choices, as prompt/chosen/rejected pairs

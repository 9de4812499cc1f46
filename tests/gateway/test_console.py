"""The web console in a real browser (headless Chromium through Playwright), served by
the gateway and talking gRPC-Web to the agents through it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 30_000


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


@pytest.fixture
def chromium() -> Path:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
async def page(gateway, chromium: Path) -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium), args=ARGS)
        try:
            page = await browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(f"{gateway.url}/console/")
            await page.wait_for_selector("body[data-ready=true]")
            yield page
            assert errors == [], errors
        finally:
            await browser.close()


async def run(page, agent: str, prompt: str, *, mode: str = "live") -> None:
    await page.select_option("#agent", agent)
    await page.select_option("#mode", mode)
    await page.fill("#prompt", prompt)
    await page.click("#run")


async def test_console_runs_a_live_task(page, tmp_path: Path) -> None:
    options = await page.locator("#agent option").all_inner_texts()
    assert any(text.startswith("assistant") for text in options)
    assert await page.locator("#agent").input_value() == "assistant"  # the default agent

    await run(page, "assistant", "what is 17*23?")
    call = page.locator("#events li[data-kind=tool_call]", has_text="calculator")
    await call.first.wait_for()
    answer = page.locator("#final-answer", has_text="391")
    await answer.wait_for()
    assert "17*23" in await call.first.inner_text()
    await page.locator("#task-status", has_text="COMPLETED").wait_for()
    assert (await page.locator("#task-id").inner_text()).startswith("t-")
    assert await page.locator("#error").is_hidden()

    shot = tmp_path / "console.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.exists() and shot.stat().st_size > 0


async def test_console_runs_a_durable_task(page, workers) -> None:
    await run(page, "assistant", "what is 17*23?", mode="durable")
    await page.locator("#final-answer", has_text="391").wait_for()
    await page.locator("#task-status", has_text="COMPLETED").wait_for()
    assert await page.locator("#events li[data-kind=tool_call]").count() >= 1
    assert await page.locator("#error").is_hidden()


async def test_console_shows_the_supervisors_sub_agents(page, workers) -> None:
    prompt = "what is 17*23 and how does the tool registry validate arguments?"
    await run(page, "supervisor", prompt)
    await page.locator("#task-status", has_text="COMPLETED").wait_for()
    nested = page.locator('#events li[data-depth="1"]')
    assert await nested.count() > 0
    agents = set(await page.locator('#events li[data-depth="1"] .agent').all_inner_texts())
    assert agents == {"assistant", "researcher"}
    assert await page.locator("#events li[data-kind=delegation_started]").count() == 2
    await page.locator("#final-answer", has_text="391").wait_for()


async def test_console_reports_an_unknown_agent(page) -> None:
    # an agent the page listed that is no longer routable: the error is shown, not swallowed
    await page.evaluate(
        "() => { const o = new Option('ghost', 'ghost'); document.getElementById('agent').append(o); }"
    )
    await run(page, "ghost", "hello")
    await page.locator("#error", has_text="NOT_FOUND").wait_for()
    await page.locator("#task-status", has_text="NOT_FOUND").wait_for()

"""The console in real Chromium (Debian's, driven by Playwright) on the real stack: a DPO signs
in with a token, submits an erasure of a hospital patient, sees the plan with its legal bases,
approves, follows the progress live to completion and opens the certificate; a DPO of another
tenant cannot see the request. A screenshot of each stage is kept under
test-artifacts/browser/; afterwards no access-log line holds a patient's id or e-mail."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import get_args

import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Page,
    ViewportSize,
    async_playwright,
    expect,
)

from lethe.contracts import Action
from tests.api.conftest import Api

pytestmark = pytest.mark.timeout(300)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LAPTOP: ViewportSize = {"width": 1366, "height": 768}
SETTLE_MS = 120_000


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def _page(browser: Browser, api: Api, problems: list[str]) -> Page:
    """A fresh page (its own cookies) at the API's address; CSP reports and errors kept."""
    context = await browser.new_context(base_url=api.base, viewport=LAPTOP)
    page = await context.new_page()
    page.on("console", lambda message: _console_error(message, problems))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "response",
        lambda answer: (
            problems.append(f"{answer.status} {answer.url}") if answer.status >= 400 else None
        ),
    )
    return page


def _console_error(message: ConsoleMessage, problems: list[str]) -> None:
    """Keep the page's errors (a CSP violation is one), but not the browser asking for
    /favicon.ico on the certificate page, which names no icon."""
    where = message.location.get("url", "")
    if message.type == "error" and not where.endswith("/favicon.ico"):
        problems.append(f"{message.text} ({where})")


async def _shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


async def _sign_in(page: Page, secret: str) -> None:
    """Sign in by keyboard: the token typed into its labelled field, Enter to send."""
    await page.goto("/console")
    await expect(page).to_have_url(re.compile(r"/console/sign-in$"))
    await page.get_by_label("API token").focus()
    await page.keyboard.type(secret)
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(re.compile(r"/console$"), timeout=15_000)


async def test_a_dpo_erases_a_patient_from_the_console(browser: Browser, api: Api) -> None:
    patient = api.hospital.patients[0]
    request_id = api.hospital.workflow_id(patient)
    problems: list[str] = []
    page = await _page(browser, api, problems)
    events: list[str] = []
    page.on("request", lambda r: events.append(r.url) if r.url.endswith("/events") else None)

    await page.goto("/console/sign-in")
    await _shot(page, "01-sign-in")
    await _sign_in(page, api.secrets["dpo-a"])
    await expect(page.get_by_role("heading", level=1)).to_have_text("Erasure requests")
    await _shot(page, "02-queue")
    # The keyboard reaches the skip link first, and the focus can be seen.
    await page.keyboard.press("Tab")
    focused = page.locator(":focus")
    await expect(focused).to_have_text("Skip to the content")
    await expect(focused).to_be_in_viewport()
    assert await focused.evaluate("e => getComputedStyle(e).outlineStyle") == "solid"

    await page.get_by_role("link", name="New request").click()
    await page.get_by_label("Subject id").fill(patient.patient_id)
    await page.get_by_label("E-mail address").fill(patient.email)
    await page.get_by_label("Reason").fill("Art. 17 request received by e-mail")
    await _shot(page, "03-new-request")
    await page.get_by_role("button", name="Submit the request").click()
    await expect(page).to_have_url(re.compile(f"/console/requests/{request_id}$"))
    assert patient.patient_id not in page.url

    # The page follows the request until it waits for approval, then shows the decision.
    approve = page.get_by_role("button", name="Approve")
    await expect(approve).to_be_visible(timeout=SETTLE_MS)
    await expect(page.locator("#state")).to_have_text("awaiting approval")
    steps = page.locator("table.steps tbody tr")
    assert await steps.count() >= 3
    bases = await page.locator("table.steps td.basis").all_inner_texts()
    assert bases and all(basis.strip() for basis in bases), bases
    actions = await page.locator("table.steps tbody tr td:nth-child(4)").all_inner_texts()
    assert actions and set(actions) <= set(get_args(Action)), actions
    await _shot(page, "04-plan-awaiting-approval")

    await page.get_by_label("Note").fill("Checked against the clinical record: approved")
    await approve.click()
    await expect(page).to_have_url(re.compile(f"/console/requests/{request_id}$"))
    await _shot(page, "05-approved-progress")

    certificate = page.get_by_role("link", name="Open the certificate of erasure")
    await expect(certificate).to_be_visible(timeout=SETTLE_MS)
    await expect(page.locator("#state")).to_have_text("completed")
    statuses = await page.locator("table.steps td.status").all_inner_texts()
    assert statuses and all(status != "pending" for status in statuses), statuses
    assert events, "the page did not follow the request by Server-Sent Events"
    await _shot(page, "06-completed")

    await certificate.click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Certificate of erasure")
    await expect(page.get_by_text(api.tenant("A")).first).to_be_visible()
    await expect(page.get_by_text("dpo-a").first).to_be_visible()
    await _shot(page, "07-certificate")

    await page.goto("/console")
    row = page.locator("table.queue tbody tr", has=page.locator(f'a[href$="{request_id}"]'))
    await expect(row).to_contain_text("completed")
    await expect(row).to_contain_text("dpo-a")
    await _shot(page, "08-queue-after")

    await page.get_by_role("link", name="Legal holds").click()
    await expect(page.get_by_role("heading", name="Place a hold")).to_be_visible()
    # The form shows the field that fits the scope: the subject id, or the value.
    await expect(page.get_by_label("Subject id")).to_be_visible()
    await expect(page.get_by_label("Tenant, system or category")).to_be_hidden()
    await page.get_by_label("Scope", exact=True).select_option("system")
    await expect(page.get_by_label("Subject id")).to_be_hidden()
    await expect(page.get_by_label("Tenant, system or category")).to_be_visible()
    await _shot(page, "09-holds")
    await page.get_by_role("link", name="Ledger").click()
    await expect(page.get_by_text("Intact")).to_be_visible()
    await expect(page.get_by_role("cell", name="erasure.approved").first).to_be_visible()
    await _shot(page, "10-ledger")
    await page.get_by_role("link", name="Retention").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Retention runs")
    await _shot(page, "11-retention")
    assert not problems, problems  # no CSP violation, no script error

    # A DPO of another tenant: the request is not in their queue, and its page is a 404.
    other = await _page(browser, api, problems)
    await _sign_in(other, api.secrets["dpo-b"])
    await expect(other.locator(f'a[href$="{request_id}"]')).to_have_count(0)
    answer = await other.goto(f"/console/requests/{request_id}")
    assert answer is not None and answer.status == 404
    await expect(other.get_by_role("heading", level=1)).to_have_text("Not found")
    await _shot(other, "12-other-tenant-not-found")


async def test_no_patient_id_or_email_in_any_access_log_line(api: Api) -> None:
    lines = api.log.lines
    assert any("/console/requests/" in line for line in lines)  # the log is being read
    for patient in api.hospital.patients:
        assert not [line for line in lines if patient.patient_id in line]
        assert not [line for line in lines if patient.email in line]

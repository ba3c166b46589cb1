"""A DPO signs in to the console through OIDC in real Chromium: the console's sign-in page, the
provider (tests/api/oidc_provider.py, at `localhost`: another site than the console's
`127.0.0.1`, as an organisation's identity provider is), back to the callback, and the queue
with a session cookie that is HttpOnly and SameSite=Strict."""

from __future__ import annotations

import re

from playwright.async_api import Browser, expect

from tests.api.conftest import Api, api_settings
from tests.api.oidc_provider import Provider, serving, trusting
from tests.browser.test_console import ARTIFACTS
from tests.browser.test_console import browser as browser


async def test_a_dpo_signs_in_through_the_identity_provider(browser: Browser, api: Api) -> None:
    claims = {"lethe_role": "dpo", "lethe_tenant": api.tenant("A")}
    provider = Provider(claims=claims, interactive=True)
    await provider.start(public_host="localhost")
    try:
        async with serving(trusting(api_settings(api.hospital), provider)) as base:
            context = await browser.new_context(
                base_url=base, viewport={"width": 1366, "height": 768}
            )
            page = await context.new_page()
            visited: list[str] = []
            page.on(
                "request", lambda r: visited.append(r.url) if r.is_navigation_request() else None
            )
            await page.goto("/console/sign-in")
            await page.get_by_role("link", name="Sign in with your organisation").click()
            # At the provider (another site): its own sign-in form, then back to the console.
            await expect(page).to_have_url(re.compile(f"^{re.escape(provider.base)}/authorize"))
            await page.get_by_role("button", name="Sign in at the provider").click()
            await expect(page).to_have_url(re.compile(r"/console$"))
            await expect(page.get_by_role("heading", level=1)).to_have_text("Erasure requests")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "oidc-signed-in.png"), full_page=True)
            assert any(url.startswith(f"{provider.base}/authorize?") for url in visited)
            assert any(url.startswith(f"{base}/console/oidc/callback?") for url in visited)
            cookies = {c["name"]: c for c in await context.cookies()}
            session = cookies["lethe_session"]
            assert session["httpOnly"] and session["sameSite"] == "Strict"
            assert "lethe_oidc" not in cookies
            await context.close()
    finally:
        await provider.stop()

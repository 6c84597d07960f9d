"""The admin key (hardening from an outside review, item 12): a short key leaves the admin endpoints off, and
guesses are limited."""

from __future__ import annotations

import httpx2
import pytest

from tests.conftest import Upstream, fake_config, gateway_in_process

STRONG = "an-admin-key-long-enough-to-be-accepted-42"


async def test_a_short_admin_key_leaves_the_admin_endpoints_off(fakes: dict[str, Upstream],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_ADMIN_KEY", "x")
    async with gateway_in_process(fake_config(fakes)) as gw:
        r = await gw.http.get("/admin/keys", headers={"authorization": "Bearer x"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    assert "1 characters long; at least 32" in r.json()["error"]["message"]


async def test_admin_key_guesses_are_limited(fakes: dict[str, Upstream], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten wrong keys in a minute, then every attempt is a 429 with Retry-After, the right key too: guessing at
    220 keys a second becomes ten a minute."""
    monkeypatch.setenv("TURNOUT_ADMIN_KEY", STRONG)
    async with gateway_in_process(fake_config(fakes)) as gw:
        assert (await gw.http.get("/admin/keys", headers={"authorization": f"Bearer {STRONG}"})).status_code == 200
        wrong = [await gw.http.get("/admin/keys", headers={"authorization": f"Bearer guess-{i}"}) for i in range(12)]
        right = await gw.http.get("/admin/keys", headers={"authorization": f"Bearer {STRONG}"})
    assert [r.status_code for r in wrong] == [401] * 10 + [429] * 2
    assert int(wrong[-1].headers["retry-after"]) >= 1
    assert right.status_code == 429, "during the lockout no key is checked"


async def test_guesses_lock_out_their_own_client_only(fakes: dict[str, Upstream],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests carrying no key are no guesses (an open status page polling without its token locks nobody out);
    one address's ten wrong keys lock out that address, while the operator's, elsewhere, still gets in."""
    monkeypatch.setenv("TURNOUT_ADMIN_KEY", STRONG)
    async with gateway_in_process(fake_config(fakes)) as gw:
        anonymous = [(await gw.http.get("/admin/keys")).status_code for _ in range(15)]
        wrong = [(await gw.http.get("/admin/keys", headers={"authorization": f"Bearer guess-{i}"})).status_code
                 for i in range(11)]
        operator = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app, client=("10.0.0.2", 5000)),
                                      base_url="http://gateway")
        async with operator:
            right = await operator.get("/admin/keys", headers={"authorization": f"Bearer {STRONG}"})
    assert anonymous == [401] * 15
    assert wrong == [401] * 10 + [429]
    assert right.status_code == 200

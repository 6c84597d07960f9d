"""What answers without a key when client keys are on (hardening from an outside review, item 11): `/v1/models`
needs a key and lists what it may use; `/metrics` and `/ui/status.json` (key names, costs) need the operations
token or the admin key; FastAPI's `/docs` and `/redoc` (scripts from a CDN) are not served; `/openapi.json`,
`/healthz` and `/readyz` answer anyone (shapes and probes, no tenant's data)."""

from __future__ import annotations

import pytest

from server.quota.keys import hash_key
from tests.conftest import Upstream, fake_config, gateway_in_process

TOKEN = "an-operations-token-long-enough-to-count"
ADMIN = "an-admin-key-long-enough-to-be-accepted-42"
KEYS = {"all": "tk-sees-all", "small-only": "tk-sees-small", "big-only": "tk-sees-big"}


def keyed_config(fakes: dict[str, Upstream]) -> dict[str, object]:
    cfg = fake_config(fakes)
    cfg["auth"] = {"enabled": True, "keys": [
        {"name": "all", "key_sha256": hash_key(KEYS["all"])},
        {"name": "small-only", "key_sha256": hash_key(KEYS["small-only"]), "models": ["small"],
         "policies": ["cheap"]},
        {"name": "big-only", "key_sha256": hash_key(KEYS["big-only"]), "models": ["big"]},
    ]}
    return cfg


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def test_models_need_a_key_and_list_what_it_may_use(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(keyed_config(fakes)) as gw:
        anonymous = await gw.http.get("/v1/models")
        everything = await gw.http.get("/v1/models", headers=bearer(KEYS["all"]))
        limited = await gw.http.get("/v1/models", headers=bearer(KEYS["small-only"]))
        big_only = await gw.http.get("/v1/models", headers=bearer(KEYS["big-only"]))
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    listed = {m["id"] for m in everything.json()["data"]}
    assert {"fake-small", "fake-big", "turnout/cheap"} <= listed
    assert {m["id"] for m in limited.json()["data"]} == {"fake-small", "auto", "turnout/cheap"}  # auto is cheap
    # `cheap` sends everything to `small`, which this key may not reach: not listed (nor `auto`, which is cheap).
    seen = {m["id"] for m in big_only.json()["data"]}
    assert "fake-big" in seen and not {"turnout/cheap", "auto", "fake-small"} & seen


@pytest.mark.parametrize("path", ["/metrics", "/ui/status.json"])
async def test_metrics_and_status_need_the_operations_token(fakes: dict[str, Upstream], path: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a token configured they are off (403 saying how to turn them on); with one, a client's key is no
    token (401); the token and the admin key are (200)."""
    monkeypatch.delenv("TURNOUT_METRICS_TOKEN")
    monkeypatch.delenv("TURNOUT_ADMIN_KEY", raising=False)
    async with gateway_in_process(keyed_config(fakes)) as gw:
        gw.http.headers.pop("x-turnout-metrics-token")  # the tests' own token: this test is about having none
        unset = await gw.http.get(path, headers=bearer(TOKEN))
        monkeypatch.setenv("TURNOUT_METRICS_TOKEN", TOKEN)
        monkeypatch.setenv("TURNOUT_ADMIN_KEY", ADMIN)
        anonymous = await gw.http.get(path)
        client_key = await gw.http.get(path, headers=bearer(KEYS["all"]))
        token = await gw.http.get(path, headers=bearer(TOKEN))
        admin = await gw.http.get(path, headers=bearer(ADMIN))
    assert unset.status_code == 403 and "TURNOUT_METRICS_TOKEN" in unset.json()["error"]["message"]
    assert anonymous.status_code == 401 and client_key.status_code == 401
    assert client_key.json()["error"]["code"] == "invalid_metrics_token"
    assert token.status_code == 200 and admin.status_code == 200


async def test_documentation_pages_are_not_served_and_probes_answer_anyone(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(keyed_config(fakes)) as gw:
        gw.http.headers.pop("x-turnout-metrics-token")
        got = {path: (await gw.http.get(path)).status_code
               for path in ("/docs", "/redoc", "/openapi.json", "/healthz", "/readyz", "/ui")}
    assert got == {"/docs": 404, "/redoc": 404, "/openapi.json": 200, "/healthz": 200, "/readyz": 200, "/ui": 200}


async def test_without_client_keys_everything_is_open_as_before(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        gw.http.headers.pop("x-turnout-metrics-token")
        for path in ("/v1/models", "/metrics", "/ui/status.json"):
            assert (await gw.http.get(path)).status_code == 200, path

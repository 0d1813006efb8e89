"""A minimal HTTP client for the serving API (the demo, the cluster test, scripts): stdlib only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def get_json(url: str, timeout_s: float = 60.0, api_key: str | None = None) -> dict:
    req = urllib.request.Request(url, headers=_auth(api_key))
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, timeout_s: float = 300.0, api_key: str | None = None) -> dict:
    """POST a JSON body; a 4xx/5xx answer raises with the server's JSON error message."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **_auth(api_key)})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> {e.code}: {e.read().decode(errors='replace')}") from None


def _auth(api_key: str | None) -> dict:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}

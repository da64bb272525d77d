"""The chat page's routes without a browser: what `/` and `/ui/...` serve, with which headers, and
that the page fetches nothing from another origin (tests/test_http_page_browser.py drives it)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

import rxruntime
from rxruntime.engine import Engine

from .http_server import served


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with rxruntime.load("small") as engine:
        yield engine


def _get(url: str, key: str | None = None) -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode()


def test_the_page_needs_no_key_but_the_api_does(engine: Engine) -> None:
    with served(engine, api_keys=["k"]) as (url, _):
        status, headers, html = _get(f"{url}/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in headers["content-security-policy"]
        assert "connect-src 'self'" in headers["content-security-policy"]
        # every asset the page names is served, with its type, and needs no key either
        assets = re.findall(r'(?:src|href)="(/ui/[^"]+)"', html)
        assert sorted(assets) == ["/ui/app.js", "/ui/style.css"]
        for path, kind in (("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
            status, headers, _ = _get(f"{url}{path}")
            assert status == 200 and headers["content-type"].startswith(kind)
        assert _get(f"{url}/v1/models")[0] == 401  # the page's own calls carry the key a person types in
        assert _get(f"{url}/v1/models", "k")[0] == 200


def test_only_the_pages_own_files_are_served(engine: Engine) -> None:
    with served(engine) as (url, _):
        for path in ("/ui/index.html", "/ui/app.py", "/ui/..%2Fapp.py", "/ui/", "/ui/%2E%2E%2Ffields.py"):
            status, _, body = _get(f"{url}{path}")
            assert status == 404, path
            assert '"not_found"' in body  # OpenAI's error shape, as for every unknown route


def test_the_page_loads_nothing_from_elsewhere(engine: Engine) -> None:
    """No CDN, no external font: every URL in the page and its assets is relative to this server."""
    with served(engine) as (url, _):
        for path in ("/", "/ui/app.js", "/ui/style.css"):
            body = _get(f"{url}{path}")[2]
            assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", body, re.IGNORECASE), path
            assert "@import" not in body and "@font-face" not in body


def test_no_ui_leaves_the_api_alone(engine: Engine) -> None:
    with served(engine, ui=False) as (url, _):
        assert _get(f"{url}/")[0] == 404
        assert _get(f"{url}/ui/app.js")[0] == 404
        assert _get(f"{url}/v1/models")[0] == 200


def test_serve_takes_no_ui() -> None:
    from rxruntime.cli import build_parser

    assert build_parser().parse_args(["serve", "--http", "127.0.0.1:8000"]).ui is True
    assert build_parser().parse_args(["serve", "--http", "127.0.0.1:8000", "--no-ui"]).ui is False

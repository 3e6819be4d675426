"""The web console (`src/lathe/console/`): one page and its two assets, shipped in the
package and served with a Content-Security-Policy that allows only them. Every path under
/console is that page (it routes in the browser), so the SDK's console links
(`/keys`, `/sessions`, `/training_runs/{id}`, `/checkpoints/{run}/{checkpoint}`,
`/playground?mode=checkpoint`) open their views under this server's `/console`. The page
reads the REST API with the key the user types in; these routes need no key."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

router = APIRouter(tags=["console"], include_in_schema=False)

ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def packaged(name: str) -> bytes:
    return resources.files("lathe.console").joinpath(name).read_bytes()


@router.get("/console/assets/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no console asset {name!r}")
    return Response(packaged(name), media_type=ASSETS[name], headers=HEADERS)


@router.get("/console")
@router.get("/console/{path:path}")
def page(path: str = "") -> Response:
    return Response(packaged("index.html"), media_type="text/html", headers=HEADERS)

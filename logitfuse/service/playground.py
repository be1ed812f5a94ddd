"""GET /playground: a page that sends one prompt to an ensemble and to its base alone, side by side, and colours
each fused token by how far fusion moved it (the per-token `influence` of the completions API).

Plain HTML, CSS and JavaScript from static/ (shipped as package data), no build step and nothing fetched from
elsewhere: the page works offline. The page and its two assets load without an API key (a browser cannot send
an Authorization header when it opens a page, and they hold no data); every API call the page makes carries
the key typed into its key field as `Authorization: Bearer <key>`, so a server with `api_keys` gives nothing
away through it. `server.playground: false` leaves the routes out.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from logitfuse.service.error_handlers import APIError

STATIC = files("logitfuse.service") / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
PATHS = ("/playground", *(f"/playground/{name}" for name in ASSETS))  # open without a key (module docstring)
# the page runs only its own script and style, and talks to this server alone
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
          "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


def _static(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type,
                    headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff"})


@router.get("/playground")
async def page() -> Response:
    return _static("playground.html", "text/html; charset=utf-8")


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    """The page's script and style sheet; any other name is a 404 (no path reaches the file system)."""
    if name not in ASSETS:
        raise APIError(404, f"no playground file {name!r}; the page uses {', '.join(ASSETS)}", "path")
    return _static(name, f"{ASSETS[name]}; charset=utf-8")

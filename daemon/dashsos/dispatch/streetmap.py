"""The console's street map: Leaflet (fetched from the npm registry at install, never
committed) served from the package, and the tile source the desk's config names.

The browser loads tiles straight from the tile server; the page's Content-Security-Policy
admits that one origin for images and nothing else. Without `dispatch.map_tiles` the map
still shows every car and incident, on a plain background, and fetches nothing.
"""

from __future__ import annotations

import importlib.resources
import urllib.parse
from typing import Any

from aiohttp import web

from dashsos.dispatch import login
from dashsos.dispatch.desk import DESK

# What the page may load of Leaflet's package, and as what.
LIBRARY = {"leaflet.js": "text/javascript", "leaflet.css": "text/css",
           "images/layers.png": "image/png", "images/layers-2x.png": "image/png",
           "images/marker-icon.png": "image/png", "images/marker-icon-2x.png": "image/png",
           "images/marker-shadow.png": "image/png"}
LIBRARY_DIR = ("console", "vendor", "leaflet")


def _library_file(name: str) -> importlib.resources.abc.Traversable:
    return importlib.resources.files("dashsos.dispatch").joinpath(*LIBRARY_DIR, name)


def library_installed() -> bool:
    return _library_file("leaflet.js").is_file()


def tile_origin(url: str) -> str | None:
    """The CSP source for a tile URL template (checked by the config): scheme, host and
    port; a `{s}` subdomain becomes a wildcard (https://{s}.tiles.example/... ->
    https://*.tiles.example)."""
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if netloc.startswith("{s}."):
        netloc = "*." + netloc[4:]
    return f"{parts.scheme}://{netloc}"


async def map_settings(request: web.Request) -> web.Response:
    """What the console's map draws on: the tile template and its attribution, and
    whether Leaflet is installed (without it the console keeps its plain canvas)."""
    login.require(request)
    config = request.app[DESK].config.dispatch
    body: dict[str, Any] = {"tiles": config.map_tiles or None,
                            "attribution": config.map_attribution,
                            "library": library_installed()}
    return web.json_response(body)


async def library(request: web.Request) -> web.Response:
    """Leaflet's own files; public like the console's code (they hold no data)."""
    name = request.match_info["name"]
    if name not in LIBRARY or not _library_file(name).is_file():
        raise web.HTTPNotFound(text="not installed: scripts/install fetches Leaflet\n")
    return web.Response(body=_library_file(name).read_bytes(), content_type=LIBRARY[name],
                        headers={"X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "public, max-age=86400"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/map", map_settings)
    app.router.add_get("/vendor/leaflet/{name:.+}", library)

"""The OpenAPI docs page at ``/docs`` that opens on a keyed server too.

A browser cannot send an ``Authorization`` header when it opens a page, so FastAPI's own ``/docs``
(a page that fetches ``/openapi.json``) is a 401 on a server with API keys. This page is served
without a key: it holds no data, only Swagger UI (from the jsDelivr CDN, as FastAPI's own page
loads it) and a key field. ``/openapi.json`` and every generating route stay keyed: the page
sends the key with each request it makes (Swagger UI's ``requestInterceptor``: the spec fetch and
"Try it out" alike). The key is kept in the browser's ``localStorage`` under the playground's
name (``seg-rt-key``), so one entry serves both pages. Its own CSP allows the CDN's scripts and
styles, its one inline script by hash, and requests to this server only.
"""

import base64
import hashlib

CDN = "https://cdn.jsdelivr.net"
SWAGGER = f"{CDN}/npm/swagger-ui-dist@5"

SCRIPT = """
const field = document.getElementById("key");
field.value = localStorage.getItem("seg-rt-key") || "";
function load() {
  const key = field.value.trim();
  if (key) { localStorage.setItem("seg-rt-key", key); } else { localStorage.removeItem("seg-rt-key"); }
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    layout: "BaseLayout",
    requestInterceptor: (req) => { if (key) { req.headers.Authorization = "Bearer " + key; } return req; },
  });
}
document.getElementById("use").addEventListener("click", load);
load();
"""

PAGE = f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link type="text/css" rel="stylesheet" href="{SWAGGER}/swagger-ui.css">
<title>seg-rt API docs</title>
</head>
<body>
<p style="font-family: sans-serif; margin: 1em">
API key (only on a server with keys): <input id="key" type="password" autocomplete="off">
<button id="use">Use key</button>
<small>kept in this browser's local storage (as the playground keeps it) and sent as
<code>Authorization: Bearer KEY</code> with every request this page makes</small>
</p>
<div id="swagger-ui"></div>
<script src="{SWAGGER}/swagger-ui-bundle.js"></script>
<script>{SCRIPT}</script>
</body>
</html>
"""


def csp() -> str:
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    return (
        f"default-src 'none'; script-src {CDN} 'sha256-{digest}'; style-src {CDN} 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )

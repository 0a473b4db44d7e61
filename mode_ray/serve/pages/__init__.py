"""The pages the endpoint serves: plain HTML, CSS and JavaScript in the package (no CDN, no build step)."""

from __future__ import annotations

from importlib.resources import files

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "text/javascript"}
# Scripts and styles from this server only, no inline script (text that slipped through as markup still could
# not run), images from here or data: URLs (the thumbnails), no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def page_files() -> dict[str, tuple[bytes, str]]:
    """name → (bytes, media type) of every page file, read once (a replica serves them from memory)."""
    out = {}
    for entry in files(__package__).iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if suffix in MEDIA_TYPES:
            out[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return out

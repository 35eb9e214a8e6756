"""The development server: serves the page, its vendor libraries, the runtime's Python source and the bundles.

    python -m web [--host 127.0.0.1] [--port 8000] [--bundles ./bundles]

Any static HTTP server can host a bundle; this one adds what the page needs to be crossOriginIsolated (threads),
byte ranges and revalidation, and a listing of the bundles it can load (see app.py).
"""
from .app import create_app

__all__ = ["create_app"]

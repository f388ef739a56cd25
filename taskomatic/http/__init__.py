"""The HTTP JSON API and the web dashboard of taskomatic, on the standard library: route
tables over Queue (`api.ROUTES`, `dashboard.ROUTES`).

server = Server(queue, ("127.0.0.1", 8080)).start()
"""

from __future__ import annotations

from taskomatic.http.api import ROUTES, Api
from taskomatic.http.server import Server, tls_context

__all__ = ["ROUTES", "Api", "Server", "tls_context"]

from __future__ import annotations

websocket_urlpatterns: list = []  # the Admin Dashboard's socket arrives with the Models tab

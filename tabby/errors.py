"""The errors the model manager raises for a request it refuses, apart from how HTTP says them.

The manager knows why a request cannot be served, not which protocol asked; each error carries the
status and sentence TabbyAPI answers with, and the app factory turns them into its `{"detail": ...}` body.
"""

from __future__ import annotations

NOT_LOADED = "No models are currently loaded."


class TabbyError(Exception):
    """A request the server refuses: `status` is its HTTP status, `detail` what the client reads."""

    status: int = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ModelNameError(TabbyError):
    """A load names no folder of the model directory (TabbyAPI answers 400 before any stream)."""

    status = 400


class UnsupportedLoadOptionError(TabbyError):
    """A load asks for something this server does not do; refused before any stream rather than ignored."""

    status = 400


class PromptError(TabbyError):
    """The loaded model's chat template cannot make a prompt of these messages (it refused them, or there
    is none): the request's fault or the load's, said as a 400, never a plain-text 500."""

    status = 400


class ModelNotLoadedError(TabbyError):
    """No model is ready to serve: none is loaded, or one is loading or unloading."""

    status = 503

    def __init__(self, detail: str = NOT_LOADED) -> None:
        super().__init__(detail)


class ModelUnavailableError(TabbyError):
    """The model a request needs could not be had: its inline load failed, or it changed under the request."""

    status = 503

"""The plane's app factory: `gunicorn -c service/gunicorn.conf.py "service.app:create_app()"`."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask
from flask.json.provider import DefaultJSONProvider

from service import api, errors
from service.auth import Auth
from service.callbacks import CallbackSender
from service.config import DEFAULTS, normalize
from service.metrics import PlaneMetrics
from service.reconciler import Reconciler
from service.store import Store


class FastJSONProvider(DefaultJSONProvider):
    """Responses serialised with orjson: job objects carry a whole spec, and this is most of a GET's time."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        """orjson for plain data, the default encoder for anything orjson does not know."""
        try:
            return orjson.dumps(obj).decode()
        except TypeError:
            return super().dumps(obj, **kwargs)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the plane: defaults, then SFTOPS_* environment, then `config`; connect, migrate, start threads.

    Raises ConfigError or TokenFileError for unusable settings (the message names the variable or file).
    """
    app = Flask("service")
    app.json = FastJSONProvider(app)
    app.config.update(DEFAULTS)
    app.config.from_prefixed_env("SFTOPS")
    if config:
        app.config.update(config)
    normalize(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY_BYTES"]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    errors.init_app(app)
    store = Store()
    store.init_app(app)
    Auth().init_app(app)
    PlaneMetrics().init_app(app, store)
    api.register(app)
    # A launcher object may be passed in `config` (embedding, tests); otherwise SFTOPS_LAUNCHER picks one.
    launcher = app.config.get("LAUNCHER_INSTANCE")
    Reconciler(launcher if hasattr(launcher, "submit") else None).init_app(app, store)
    CallbackSender().init_app(app, store)
    return app

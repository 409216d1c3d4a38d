"""The plane's app factory: `gunicorn -c service/gunicorn.conf.py "service.app:create_app()"`."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from service import api, errors
from service.auth import Auth
from service.callbacks import CallbackSender
from service.config import DEFAULTS, normalize
from service.metrics import PlaneMetrics
from service.reconciler import Reconciler
from service.store import Store


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the plane: defaults, then SFTOPS_* environment, then `config`; connect, migrate, start threads.

    Raises ConfigError or TokenFileError for unusable settings (the message names the variable or file).
    """
    app = Flask("service")
    app.config.update(DEFAULTS)
    app.config.from_prefixed_env("SFTOPS")
    if config:
        app.config.update(config)
    normalize(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY_BYTES"]
    app.json.sort_keys = False
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

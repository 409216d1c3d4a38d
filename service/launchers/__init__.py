"""Launchers start a job's container or process; the plane picks one by SFTOPS_LAUNCHER."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.launchers.base import Launcher


def create_launcher(config: Mapping[str, Any]) -> Launcher:
    """The launcher SFTOPS_LAUNCHER names, built from the app config; imports it only when chosen.

    Raises ValueError for an unknown launcher or a bad SFTOPS_K8S_* setting.
    """
    kind = config.get("LAUNCHER", "local")
    if kind == "local":
        from service.launchers.local import LocalLauncher

        return LocalLauncher(Path(config["DATA_DIR"]).expanduser().resolve(), python=sys.executable)
    if kind == "kubernetes":
        from service.launchers.k8s_manifest import KubernetesSettings
        from service.launchers.kubernetes import KubernetesLauncher

        k8s = {key: value for key, value in config.items() if key.startswith("K8S_")}
        return KubernetesLauncher(KubernetesSettings.from_env(k8s, prefix="K8S_"))
    raise ValueError(f"SFTOPS_LAUNCHER={kind!r}: must be 'local' or 'kubernetes'")

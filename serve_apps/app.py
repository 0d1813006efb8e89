"""The import path `serve_apps/config.yaml` and `k8s/rayservice-serve.yaml` name
(`serve_apps.app:app`); the app itself lives in the library, `ft_ray/serve/app.py`."""

from ft_ray.serve.app import FTServer, app, list_models  # noqa: F401

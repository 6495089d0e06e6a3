"""Find the app object named by ``-A module[:attribute]``."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from sabot.errors import ConfigError


def load_app(spec: str) -> Any:
    """Import ``module[:attribute]`` from the current folder and return the app.

    ``attribute`` defaults to ``app``; ``attribute()`` calls a factory. When
    ``app`` is absent the module's only Sabot instance is used.
    """
    from sabot.app.base import Sabot

    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise ConfigError(f"invalid app path {spec!r}; expected module or module:attribute")
    if module_name.endswith(".py"):
        module_name = module_name[:-3].replace(os.sep, ".")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"module {module_name!r} not found; run from the folder that contains it "
                f"or check the name given to -A"
            ) from exc
        raise ConfigError(
            f"module {module_name!r} failed to import: {exc}"
        ) from exc

    call = attribute.endswith("()")
    name = attribute[:-2] if call else attribute
    if not name:
        if hasattr(module, "app"):
            name = "app"
        else:
            found = [n for n, v in vars(module).items() if isinstance(v, Sabot)]
            if len(found) != 1:
                raise ConfigError(
                    f"module {module_name!r} has no attribute 'app' and "
                    f"{'no' if not found else len(found)} Sabot apps; name one: "
                    f"-A {module_name}:NAME"
                )
            name = found[0]
    try:
        app = getattr(module, name)
    except AttributeError:
        raise ConfigError(
            f"module {module_name!r} has no attribute {name!r}; "
            f"it defines {sorted(n for n in vars(module) if not n.startswith('_'))}"
        ) from None
    if call:
        app = app()
    if not isinstance(app, Sabot):
        raise ConfigError(f"{spec!r} is a {type(app).__name__}, not a Sabot app")
    return app

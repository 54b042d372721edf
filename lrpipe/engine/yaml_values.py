"""Settings written as YAML (a config file, a ``--set field=value``), read the way users mean.

PyYAML follows YAML 1.1, where a float needs a dot: ``1e-3`` and ``3E+2`` are strings there,
and a rate written that way was refused ("got '1e-3'"). ``load_yaml`` reads them as numbers,
as YAML 1.2 and Python do; ``1.0e-3`` (with a dot) was a number already. A file that is not
text or not YAML is a ConfigError naming the field and the place, not a parser traceback.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from lrpipe.engine.config import ConfigError

# Scientific notation without a dot (1e-3, -2E+4, 5e3); the forms with a dot PyYAML knows.
SCIENTIFIC = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


class SettingsLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus YAML 1.2's ``1e-3`` floats."""


SettingsLoader.add_implicit_resolver("tag:yaml.org,2002:float", SCIENTIFIC,
                                     list("-+0123456789"))


def load_yaml(text: str | bytes, field_name: str) -> Any:
    """``text`` parsed as YAML (with scientific-notation numbers).

    Raises:
        ConfigError: not UTF-8 text, or not valid YAML; the message names ``field_name``
            and, for a syntax error, the line and column.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{field_name}: not a text file (byte {exc.start} is not UTF-8); "
                              "allowed: a YAML mapping of settings") from None
    if "\0" in text:
        raise ConfigError(f"{field_name}: not a text file (it holds NUL bytes); allowed: a YAML "
                          "mapping of settings")
    try:
        return yaml.load(text, Loader=SettingsLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{field_name}: malformed YAML{where} ({problem}); allowed: a YAML "
                          "mapping of settings") from None

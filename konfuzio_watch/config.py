"""Load and validate the YAML config into frozen dataclasses.

Every user mistake becomes one ``ConfigError`` whose message names the key, e.g.
``upload.concurrency: expected an integer, got 'four'``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .config_checks import check_config
from .config_sections import (
    STOP_TIMEOUT_LIMIT_S,
    AlertsConfig,
    CallbackConfig,
    Config,
    ConfigError,
    DeliverConfig,
    FoldersConfig,
    JournalConfig,
    KonfuzioConfig,
    MonitorConfig,
    NgrokConfig,
    NodeConfig,
    ResultsConfig,
    Route,
    ServiceConfig,
    UploadConfig,
    WatchConfig,
    WebhookConfig,
)
from .config_yaml import MAX_EXPANDED_NODES, load_yaml

__all__ = [
    "MAX_EXPANDED_NODES",
    "STOP_TIMEOUT_LIMIT_S",
    "AlertsConfig",
    "CallbackConfig",
    "Config",
    "ConfigError",
    "DeliverConfig",
    "FoldersConfig",
    "JournalConfig",
    "KonfuzioConfig",
    "MonitorConfig",
    "NgrokConfig",
    "NodeConfig",
    "ResultsConfig",
    "Route",
    "ServiceConfig",
    "UploadConfig",
    "WatchConfig",
    "WebhookConfig",
    "load_config",
    "parse_config",
]


REQUIRED = {
    ("konfuzio", "project_id"),
    ("folders", "inbox"),
    ("folders", "done"),
    ("folders", "failed"),
    ("folders", "state"),
}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# Keys that hold secrets or point to them. ``status`` and ``retry`` only read the journal and
# move files: they load the config without them (their ${VARS}, e.g. ${CREDENTIALS_DIRECTORY},
# are set only inside the service).
SECRET_KEYS = {
    ("konfuzio", "token"),
    ("konfuzio", "token_file"),
    ("ngrok", "authtoken"),
    ("ngrok", "authtoken_file"),
    ("alerts", "urls"),
    ("alerts", "urls_file"),
}


def load_config(
    path: str | os.PathLike[str], environ: typing.Mapping[str, str] | None = None, *, need_secrets: bool = True
) -> Config:
    """Read a YAML file and return a validated ``Config``; raise ``ConfigError`` on any problem.
    ``need_secrets=False``: leave the secret keys out (for commands that never call the API)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {reason}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested more than Python can read; flatten it") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(
        raw if raw is not None else {}, base_dir=path.parent, environ=environ, need_secrets=need_secrets
    )


def parse_config(
    raw: Any, base_dir: Path = Path(), environ: typing.Mapping[str, str] | None = None, *, need_secrets: bool = True
) -> Config:
    """Validate a parsed YAML mapping. Relative folder paths are relative to ``base_dir``."""
    env = os.environ if environ is None else environ
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping of sections at the top level")
    if not need_secrets:
        raw = {
            name: (
                {k: v for k, v in section.items() if (name, k) not in SECRET_KEYS}
                if isinstance(section, dict)
                else section
            )
            for name, section in raw.items()
        }
    sections: dict[str, Any] = {"routes": _build_routes(raw.get("routes"), base_dir, env)}
    for f in dataclasses.fields(Config):
        if f.name == "routes":
            continue
        section_raw = raw.get(f.name, {})
        if section_raw is None:
            section_raw = {}
        if not isinstance(section_raw, dict):
            raise ConfigError(f"{f.name}: expected a mapping, got {_show(section_raw)}")
        if f.name == "deliver":
            sections[f.name] = _build_deliver(section_raw, base_dir, env, need_secrets)
            continue
        sections[f.name] = _build_section(f.name, f.default_factory, section_raw, base_dir, env)
    _reject_unknown("", raw, {f.name for f in dataclasses.fields(Config)})
    config = Config(**sections)
    check_config(config, need_secrets)
    return config


def _build_routes(raw: Any, base_dir: Path, env: typing.Mapping[str, str]) -> tuple[Route, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"routes: expected a list of {{match, project_id, ...}}, got {_show(raw)}")
    routes = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"routes[{index}]: expected a mapping, got {_show(item)}")
        route = _build_section(f"routes[{index}]", Route, item, base_dir, env)
        if not route.match:
            raise ConfigError(f"routes[{index}].match: required")
        if route.project_id is None and route.category_id is None and route.dataset_status is None:
            raise ConfigError(f"routes[{index}]: set project_id, category_id or dataset_status")
        routes.append(route)
    return tuple(routes)


def _build_deliver(raw: dict, base_dir: Path, env: typing.Mapping[str, str], need_secrets: bool) -> DeliverConfig:
    """``deliver``, with its ``webhook`` mapping (null or absent: no webhook). Without secrets
    (``status``, ``redeliver``) the webhook's secret file is left out."""
    webhook_raw = raw.get("webhook")
    section = _build_section("deliver", DeliverConfig, {k: v for k, v in raw.items() if k != "webhook"}, base_dir, env)
    if webhook_raw is None:
        return section
    if not isinstance(webhook_raw, dict):
        raise ConfigError(
            f"deliver.webhook: expected a mapping (url, secret_file, timeout_seconds), got {_show(webhook_raw)}"
        )
    if not need_secrets:
        webhook_raw = {k: v for k, v in webhook_raw.items() if k != "secret_file"}
    webhook = _build_section("deliver.webhook", WebhookConfig, webhook_raw, base_dir, env)
    return dataclasses.replace(section, webhook=webhook)


def _build_section(name: str, cls: Any, raw: dict, base_dir: Path, env: typing.Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    _reject_unknown(name, raw, fields)
    for key in fields:
        if (name, key) in REQUIRED and raw.get(key) is None:
            raise ConfigError(f"{name}.{key}: required")
    values = {
        key: _convert(f"{name}.{key}", hints[key], _expand(f"{name}.{key}", value, env), base_dir)
        for key, value in raw.items()
    }
    return cls(**values)


def _reject_unknown(section: str, raw: dict, known: set[str]) -> None:
    for key in raw:
        if key not in known:
            where = f"{section}.{key}" if section else str(key)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")


def _expand(key: str, value: Any, env: typing.Mapping[str, str]) -> Any:
    if isinstance(value, list):
        return [_expand(key, v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in env:
            raise ConfigError(f"{key}: environment variable {var} is not set")
        return env[var]

    return _ENV_REF.sub(sub, value)


def _convert(key: str, hint: Any, value: Any, base_dir: Path) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if any(type(value) is type(choice) and value == choice for choice in choices):
            return value
        shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
        raise ConfigError(f"{key}: expected one of {shown}, got {_show(value)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {_show(value)}")
    if hint is str:
        if isinstance(value, str) and value:
            return value
        raise ConfigError(f"{key}: expected a non-empty string, got {_show(value)}")
    if hint is Path:
        if isinstance(value, str) and value:
            return (base_dir / os.path.expanduser(value)).absolute()
        raise ConfigError(f"{key}: expected a path, got {_show(value)}")
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        raise ConfigError(f"{key}: expected a list of strings, got {_show(value)}")
    raise AssertionError(f"unsupported type {hint} for {key}")  # pragma: no cover


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

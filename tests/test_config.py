"""Config: every mistake is one line naming the key; nothing half-loaded."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from konfuzio_watch import processing
from konfuzio_watch.config import ConfigError, load_config, parse_config

BASE = {
    "konfuzio": {"host": "http://127.0.0.1:1", "token": "t", "project_id": 1},
    "folders": {"inbox": "in", "done": "done", "failed": "failed", "state": "state"},
}


def with_(section: str, **values: object) -> dict:
    raw = {k: dict(v) for k, v in BASE.items()}
    raw.setdefault(section, {}).update(values)
    return raw


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path):
    config = parse_config(BASE, base_dir=tmp_path)
    assert config.folders.inbox == tmp_path / "in"
    assert config.watch.settle_seconds == 2
    assert config.watch.polling == "auto", "polls a network or FUSE mount, inotify elsewhere"
    assert config.upload.concurrency == 4
    assert config.results.callback_timeout == 600 and config.results.poll_interval == 30
    assert config.callback.path == "konfuzio-callback"
    (tmp_path / "in").mkdir()
    assert processing.find(config, bound=None).path == tmp_path / ".in.konfuzio-watch", "next to the inbox, not in it"
    assert processing.find(config, bound="/old/place").path == Path("/old/place"), "where files already wait"


def test_example_config_documents_every_key_and_loads(tmp_path: Path):
    example = Path(__file__).parent.parent / "config.example.yaml"
    config = load_config(example, environ={"KONFUZIO_TOKEN": "from-env"})
    assert config.konfuzio.token == "from-env"
    text = example.read_text()
    from dataclasses import fields

    from konfuzio_watch.config import Route

    for section in fields(config):
        assert f"{section.name}:" in text
        section_type = Route if section.name == "routes" else type(getattr(config, section.name))
        for key in fields(section_type):
            assert f"{key.name}:" in text, f"config.example.yaml does not document {section.name}.{key.name}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (with_("upload", concurrency="four"), "upload.concurrency: expected an integer, got 'four'"),
        (with_("upload", concurency=4), "upload.concurency: unknown key"),
        (with_("watch", settle_seconds=True), "watch.settle_seconds: expected a number"),
        (with_("watch", ignore=[1]), "watch.ignore: expected a list of strings"),
        (with_("watch", polling="sometimes"), "watch.polling: expected one of auto, true, false, got 'sometimes'"),
        (with_("watch", polling=1), "watch.polling: expected one of auto, true, false, got 1"),
        (with_("callback", port=70000), "callback.port: must be between 0 and 65535, got 70000"),
        (with_("upload", concurrency=0), "upload.concurrency: must be between 1 and 64, got 0"),
        (with_("results", max_failures=0), "results.max_failures: must be at least 1, got 0"),
        (with_("callback", public_url="ftp://x"), "callback.public_url: expected an http(s) URL"),
        (with_("konfuzio", project_id=None), "konfuzio.project_id: required"),
        (with_("konfuzio", token="${NOPE_NOT_SET}"), "konfuzio.token: environment variable NOPE_NOT_SET is not set"),
        (with_("konfuzio", token=None), "konfuzio.token: required"),
        (with_("folders", done="in"), "folders.inbox and folders.done must be separate folders"),
        (with_("folders", inbox="done/in"), "folders.inbox and folders.done must be separate folders"),
        ({**BASE, "extra": {}}, "extra: unknown key"),
        ({**BASE, "watch": [1]}, "watch: expected a mapping"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(raw: dict, message: str, tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=tmp_path, environ={})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_routes_pick_project_and_category_by_subfolder(tmp_path: Path):
    raw = {
        **BASE,
        "routes": [
            {"match": "accounting/*", "project_id": 2, "category_id": 7},
            {"match": "*.png", "dataset_status": 3},
        ],
    }
    config = parse_config(raw, base_dir=tmp_path)
    assert config.route_for("accounting/2026/x.pdf") == (2, 7, 0)
    assert config.route_for("photos/a.png") == (1, None, 3)
    assert config.route_for("other.pdf") == (1, None, 0)


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"match": "a/*"}, "routes[0]: set project_id, category_id or dataset_status"),
        ({"project_id": 2}, "routes[0].match: required"),
        ({"match": "a/*", "project": 2}, "routes[0].project: unknown key"),
        ("a/*", "routes: expected a list"),
    ],
)
def test_route_mistakes_name_the_rule(routes: object, message: str, tmp_path: Path):
    raw = {**BASE, "routes": routes if isinstance(routes, str) else [routes]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=tmp_path)
    assert str(info.value).startswith(message)


def test_done_and_failed_may_live_inside_the_inbox(tmp_path: Path):
    config = parse_config(with_("folders", done="in/done", failed="in/failed"), base_dir=tmp_path)
    assert config.folders.done == tmp_path / "in" / "done"


@pytest.mark.slow
def test_cli_reports_a_config_error_in_one_line_without_traceback(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(with_("upload", concurrency="four")))
    result = subprocess.run(
        [sys.executable, "-m", "konfuzio_watch", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == "konfuzio-watch: upload.concurrency: expected an integer, got 'four'\n"


def test_invalid_yaml_is_one_line(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("konfuzio: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 2, column 1\): expected"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "konfuzio: {project_id: 1\n",
            "not valid YAML (line 2, column 1): expected ',' or '}', but got '<stream end>'",
        ),
        (
            "callback: {port: 1}\nfolders: {}\ncallback: {port: 2}\n",
            "not valid YAML (line 3, column 1): duplicate key 'callback' (first on line 1); merge the two",
        ),
        ("a:\n\tb: 1\n", "not valid YAML (line 2, column 1): found character '\\t' that cannot start any token"),
    ],
)
def test_yaml_mistakes_say_where_and_why(tmp_path: Path, text: str, message: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A list value that is a few hundred bytes of YAML and ``width ** levels`` strings once its
    aliases are expanded (the "billion laughs" of YAML)."""
    items = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    items += [f"&l{n} [" + ", ".join([f"*l{n - 1}"] * width) + "]" for n in range(1, levels)]
    return "  ignore: [" + ", ".join(items) + "]\n"


def _write(tmp_path: Path, watch_lines: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE) + "watch:\n" + watch_lines)
    return path


@pytest.mark.slow
def test_an_alias_bomb_is_refused_at_once_naming_the_key(tmp_path: Path):
    path = _write(tmp_path, _alias_bomb())
    assert path.stat().st_size < 1024
    result = subprocess.run(
        [sys.executable, "-m", "konfuzio_watch", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-500:]
    assert result.stderr.startswith(f"konfuzio-watch: {path}: watch.ignore: its YAML aliases expand to over ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("  ignore: &a ['*.x', *a]\n", "watch.ignore: a YAML alias refers to the value that contains it"),
        ("  ignore: " + "[" * 2000 + "]" * 2000 + "\n", "nested more than"),
    ],
)
def test_self_reference_and_deep_nesting_are_one_line(tmp_path: Path, lines: str, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_write(tmp_path, lines))


def test_aliases_that_stay_small_still_work(tmp_path: Path):
    path = _write(tmp_path, "  ignore: &globs ['*.bak', '*.old']\nroutes:\n  - {match: 'a/*', project_id: 2}\n")
    assert load_config(path).watch.ignore == ("*.bak", "*.old")


def test_a_bomb_of_mappings_names_its_key(tmp_path: Path):
    lines = ["  x-a: &m0 {a: 1, b: 2}"] + [
        f"  x-{n}: &m{n} {{a: *m{n - 1}, b: *m{n - 1}, c: *m{n - 1}}}" for n in range(1, 14)
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE) + "anchors:\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"anchors\.x-9: its YAML aliases expand to over 100,000 values"):
        load_config(path)

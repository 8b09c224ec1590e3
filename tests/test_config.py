"""`fencelock._config` (seed Part C) and the ``check-config`` command around it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fencelock._cli import main
from fencelock._config import (
    ConfigError,
    ConfigNotice,
    ConfigWarning,
    check,
    check_file,
    load,
    parse,
    review,
    review_file,
)


def _fencelock() -> list[str]:
    here = os.path.dirname(sys.executable)
    exe = shutil.which("fencelock", path=here + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "fencelock"]


def names(warnings: list[ConfigWarning]) -> list[str]:
    return [w.agent for w in warnings]


def cfg(defaults: Any = None, agents: Any = None) -> dict[str, Any]:
    section: dict[str, Any] = {}
    if defaults is not None:
        section["defaults"] = {"heartbeat": defaults}
    if agents is not None:
        section["list"] = agents
    return {"agents": section}


# -- the pure check ---------------------------------------------------------------------


def test_array_of_agents_warns_only_for_unisolated_heartbeats() -> None:
    config = cfg(
        agents=[
            {"id": "main", "heartbeat": {"every": "30m"}},
            {"id": "ops", "heartbeat": {"every": "30m", "isolatedSession": True}},
            {"id": "bot", "heartbeat": {"every": "1h", "isolatedSession": False}},
        ]
    )
    warnings = check(config)
    assert names(warnings) == ["main", "bot"]
    assert warnings[0].where == "agents.list[0]"
    assert warnings[0].isolated is None
    assert warnings[1].isolated is False


def test_mapping_of_agents_keyed_by_id() -> None:
    config = cfg(
        agents={
            "main": {"heartbeat": {"every": "30m"}},
            "quiet": {"heartbeat": {"isolatedSession": True}},
        }
    )
    warnings = check(config)
    assert names(warnings) == ["main"]
    assert warnings[0].where == "agents.list.main"


def test_message_names_agent_and_why_it_matters() -> None:
    (w,) = check(cfg(agents=[{"id": "main", "heartbeat": {"every": "30m"}}]))
    assert "'main'" in w.message
    assert "isolatedSession is not set" in w.message
    assert "session file" in w.message
    assert "channel and direct lanes" in w.message


def test_agents_inherit_defaults_heartbeat() -> None:
    config = cfg(
        defaults={"every": "30m", "isolatedSession": False},
        agents=[{"id": "inherits"}, {"id": "null-inherits", "heartbeat": None}],
    )
    warnings = check(config)
    assert names(warnings) == ["inherits", "null-inherits"]
    assert all(w.inherited for w in warnings)


def test_heartbeat_blocks_merge_over_the_defaults() -> None:
    config = cfg(
        defaults={"every": "30m", "isolatedSession": True},
        agents=[
            {"id": "overrides", "heartbeat": {"isolatedSession": False}},
            {"id": "other-keys", "heartbeat": {"every": "5m"}},
        ],
    )
    warnings = check(config)
    assert names(warnings) == ["overrides"]
    assert warnings[0].inherited is False


def test_explicit_only_rule_agents_without_a_block_run_no_heartbeat() -> None:
    """The gateway's rule (openclaw #46101, #78713): once a listed agent has a heartbeat
    block that leaves it an interval, agents without one run no heartbeat, whatever
    agents.defaults.heartbeat says. They get a notice naming the rule, not a warning."""
    config = cfg(defaults={"every": "60m", "target": "channel"},
                 agents=[{"id": "main"}, {"id": "ops", "heartbeat": {"every": "2h"}}])
    found = review(config)
    assert names(list(found.warnings)) == ["ops"]
    assert [(n.agent, n.where, n.explicit) for n in found.notices] == [
        ("main", "agents.list[0]", ("ops",))]
    message = found.notices[0].message
    assert "'main'" in message and "runs no heartbeat" in message
    assert "explicit-only rule" in message and "agent 'ops' has one" in message
    many = ConfigNotice("a", "agents.list[0]", ("b", "c", "d", "e")).message
    assert "agents 'b', 'c', 'd' and 1 more have one" in many


def test_blocks_that_only_turn_their_own_heartbeat_off_leave_the_others_the_defaults() -> None:
    """Newer gateways (openclaw #119005, the configuration of #78713): a block whose
    heartbeat has no interval (`every: "0m"`) opts that agent out without selecting it,
    so the agents without a block keep the defaults' heartbeat, and share the session
    file. They were given a notice that they run none; older gateways did run none, and
    the warning says so."""
    config = cfg(defaults={"every": "60m", "target": "channel"},
                 agents=[{"id": "main"}, {"id": "ops", "heartbeat": {"every": "0m"}}])
    found = review(config)
    assert [(w.agent, w.opted_out) for w in found.warnings] == [("main", ("ops",))]
    assert found.notices == ()
    assert "gateways without the fix for openclaw #119005 run none for it, as agent 'ops' " \
        "has a heartbeat block that turns its own off" in found.warnings[0].message
    # With no defaults, the default agent runs the built-in heartbeat, unless its own
    # block turns it off.
    builtin = check(cfg(agents=[{"id": "main"}, {"id": "ops", "heartbeat": {"every": 0}}]))
    assert [(w.agent, w.implicit) for w in builtin] == [("main", True)]
    assert check(cfg(agents=[{"id": "main", "heartbeat": {"every": ""}}, {"id": "ops"}])) == []


def test_an_id_listed_twice_with_a_block_only_in_its_second_entry_says_nothing_of_opting_out(
) -> None:
    """The gateway reads the first entry (no block: the defaults' heartbeat, warned of);
    the second's block brings the explicit-only rule on for that id. No block turns a
    heartbeat off, so the warning says nothing of gateways that ran none."""
    config = cfg(defaults={"every": "5m"},
                 agents=[{"id": "ops"}, {"id": "ops", "heartbeat": {"isolatedSession": True}}])
    (w,) = check(config)
    assert w.agent == "ops" and w.opted_out == ()
    assert "#119005" not in w.message


def test_a_notice_names_only_the_blocks_that_bring_the_rule_on() -> None:
    """With one block that selects its agent, a block that only turns its own heartbeat
    off is not among the agents the notice says have one: it alone would not have
    brought the rule on."""
    config = cfg(defaults={"every": "30m", "isolatedSession": True},
                 agents=[{"id": "main"}, {"id": "ops", "heartbeat": {"isolatedSession": False}},
                         {"id": "quiet", "heartbeat": {"every": "0m"}}])
    found = review(config)
    assert names(list(found.warnings)) == ["ops"]
    assert [(n.agent, n.explicit) for n in found.notices] == [("main", ("ops",))]
    assert "while agent 'ops' has one," in found.notices[0].message


def test_an_agent_listed_twice_with_one_block_gets_no_notice_against_itself() -> None:
    config = cfg(defaults={"every": "1h"}, agents=[{"id": "a"}, {"id": "a", "heartbeat": {}}])
    found = review(config)
    assert names(list(found.warnings)) == ["a"] and found.notices == ()


def test_an_empty_agents_list_is_named_as_such() -> None:
    (only,) = check(cfg(defaults={"isolatedSession": False}, agents=[]))
    assert only.where == "agents (agents.list is empty: the implicit default agent)"


def test_explicit_only_rule_the_blocks_still_merge_over_the_defaults() -> None:
    config = cfg(
        defaults={"every": "30m"},
        agents=[
            {"id": "silenced"},
            {"id": "empty-block", "heartbeat": {}},
            {"id": "true-block", "heartbeat": True},
            {"id": "isolated", "heartbeat": {"isolatedSession": True}},
            {"id": "off", "heartbeat": False},
        ],
    )
    found = review(config)
    assert names(list(found.warnings)) == ["empty-block", "true-block"]
    assert all(w.inherited is False and w.isolated is None for w in found.warnings)
    # `false` is no block: the rule leaves that agent without a heartbeat too.
    assert [(n.agent, n.explicit) for n in found.notices] == [
        ("silenced", ("empty-block", "true-block", "isolated")),
        ("off", ("empty-block", "true-block", "isolated"))]


@pytest.mark.parametrize("defaults", [None, False, {"every": "0m"}])
def test_no_notice_when_the_defaults_would_run_no_heartbeat(defaults: Any) -> None:
    config = cfg(defaults=defaults,
                 agents=[{"id": "a"}, {"id": "b", "heartbeat": {"every": "5m", "enabled": True}}])
    found = review(config)
    assert names(list(found.warnings)) == ["b"] and found.notices == ()


def test_no_block_anywhere_the_defaults_reach_every_agent() -> None:
    config = cfg(defaults={"every": "30m"}, agents=[{"id": "a"}, {"id": "b"}])
    found = review(config)
    assert names(list(found.warnings)) == ["a", "b"] and found.notices == ()


def test_unisolated_default_is_reported_as_inherited() -> None:
    config = cfg(defaults={"every": "30m", "isolatedSession": False}, agents=[{"id": "a"}])
    (w,) = check(config)
    assert w.inherited is True
    assert "inherited from agents.defaults.heartbeat" in w.message


def test_agent_can_fix_an_unisolated_default() -> None:
    config = cfg(
        defaults={"every": "30m"},
        agents=[{"id": "fixed", "heartbeat": {"isolatedSession": True}},
                {"id": "not", "heartbeat": {"every": "1h"}}],
    )
    assert names(check(config)) == ["not"]


@pytest.mark.parametrize(
    "heartbeat",
    [
        {"every": "0"},
        {"every": "0m"},
        {"every": "0s"},
        {"every": 0},
        {"every": " 00 "},
        # What the gateway reads as no interval: false values, and what is no duration
        # or one of 0 or less.
        {"every": ""},
        {"every": "   "},
        {"every": False},
        {"every": True},
        {"every": float("nan")},
        {"every": -1},
        {"every": "-0m"},
        {"every": "0h0m"},
        {"every": "soon"},
        # Parts of a composite with something between them, or a part with no unit.
        {"every": "1h 30m"},
        {"every": "1h30"},
        {"every": "h30m"},
        # What its parseDurationMs does not read: a space inside, a sign, an exponent, no
        # digit before the point, digits other than ASCII's; under 1 ms once rounded; a
        # number JavaScript writes with an exponent; an array of more than one value.
        {"every": "5 m"},
        {"every": " 2 H "},
        {"every": "+5"},
        {"every": "5e1"},
        {"every": ".5"},
        {"every": "1_0"},
        {"every": "\u0665m"},
        {"every": "inf"},
        {"every": "0.4ms"},
        {"every": "0.49999999999999994ms"},  # (x + 0.5 is 1.0 in floating point)
        {"every": 0.49999999999999994 / 60_000},
        {"every": 1e21},
        {"every": 10**21},
        {"every": 10**400},
        {"every": 1e-8},
        {"every": float("inf")},
        {"every": [5, 6]},
        {"every": {"m": 5}},
    ],
)
def test_disabled_heartbeat_gets_no_warning(heartbeat: Any) -> None:
    assert check(cfg(defaults={"every": "30m"}, agents=[{"id": "a", "heartbeat": heartbeat}])) == []


@pytest.mark.parametrize("every", ["1h30m", " 2H30M ", "2m500ms", "1d1h", "0h1m", "0.5h1s"])
def test_a_composite_interval_runs_a_heartbeat(every: str) -> None:
    """Newer gateways read an interval in parts, each with its unit, added up ("1h30m",
    which their own error text suggests): it runs, and was read as none, so an agent
    sharing its session file got no warning."""
    (w,) = check(cfg(agents=[{"id": "main", "heartbeat": {"every": every}}]))
    assert w.agent == "main"
    assert [w.agent for w in check(cfg(defaults={"every": every}, agents=[{"id": "a"}]))] == ["a"]


def test_a_composite_interval_selects_its_agent_for_the_explicit_only_rule() -> None:
    """A block whose composite interval runs brings the explicit-only rule on: the
    agents without a block run none (a notice), and no warning says that the block
    turns its own heartbeat off."""
    config = cfg(defaults={"every": "10m"},
                 agents=[{"id": "a", "heartbeat": {"every": "1h30m", "isolatedSession": True}},
                         {"id": "b"}])
    found = review(config)
    assert found.warnings == () and [n.agent for n in found.notices] == ["b"]


def test_disabled_defaults_disable_agents_without_own_heartbeat() -> None:
    config = cfg(
        defaults=False,
        agents=[{"id": "off"}, {"id": "on", "heartbeat": {"every": "10m"}}],
    )
    assert names(check(config)) == ["on"]


def test_enabled_false_is_no_gateway_setting_and_turns_nothing_off() -> None:
    """The gateway has no `enabled` setting (its schema refuses the key, and a config it
    refuses leaves the last one it took running): only an `every` of no interval turns a
    heartbeat off. `enabled: false` passed the heartbeat over; it is warned of now, and
    the warning says so. Nor does it keep a block from selecting its agent."""
    (only,) = check(cfg(defaults={"every": "30m", "enabled": False}, agents=[{"id": "a"}]))
    assert (only.agent, only.enabled_off) == ("a", True)
    assert 'enabled: false is no gateway setting and turns nothing off (every: "0m" does)' \
        in only.message
    found = review(cfg(defaults={"every": "60m"}, agents=[
        {"id": "main"}, {"id": "ops", "heartbeat": {"enabled": False}}]))
    assert names(list(found.warnings)) == ["ops"]
    assert [n.agent for n in found.notices] == ["main"]


def test_a_null_every_inherits_the_defaults() -> None:
    config = cfg(defaults={"every": "0m"}, agents=[{"id": "a", "heartbeat": {"every": None}}])
    assert check(config) == []  # the defaults' 0m: off
    config = cfg(defaults={"every": "5m"}, agents=[{"id": "a", "heartbeat": {"every": None}}])
    assert names(check(config)) == ["a"]


def test_a_long_every_is_read_in_linear_time() -> None:
    # A pattern that could match its spaces two ways took minutes on 100 KB of them.
    every = "0" + " " * 200_000 + "!"
    assert check(cfg(agents=[{"id": "a", "heartbeat": {"every": every}}])) == []


def test_non_zero_every_is_enabled() -> None:
    # As the gateway reads them: trimmed as JavaScript trims (a BOM too), any case,
    # minutes by default, a number as JavaScript writes it, an array of one value as it.
    for every in ("10m", "1", 5, "0.5h", " 2h ", "2H", "250ms", "1d", "\ufeff5m", "1.0",
                  0.5, 1e20, 10**20, [5], ["5m"], [[7]], "0.6ms"):
        assert names(check(cfg(agents=[{"id": "a", "heartbeat": {"every": every}}]))) == ["a"]


def test_no_heartbeat_anywhere_warns_for_the_default_agent() -> None:
    """With nothing configured the gateway still runs its built-in heartbeat (every 30m,
    in the main session) for its default agent: exactly the contended case."""
    only = check(cfg(agents=[{"id": "a"}, {"id": "b", "heartbeat": None}]))
    assert [(w.agent, w.implicit) for w in only] == [("a", True)]
    assert "default" in only[0].message and "30m" in only[0].message
    marked = check(cfg(agents=[{"id": "a"}, {"id": "b", "default": True}]))
    assert [w.agent for w in marked] == ["b"]
    empties: list[dict[str, Any]] = [{"agents": {"list": []}}, {}, {"agents": {}}]
    for empty in empties:
        assert [w.agent for w in check(empty)] == ["main"]


def test_defaults_apply_to_the_implicit_default_agent() -> None:
    for defaults in ({"every": "30m"}, {"isolatedSession": False}):
        assert [w.agent for w in check(cfg(defaults=defaults))] == ["main"]
    assert check(cfg(defaults={"isolatedSession": True})) == []


def test_any_configured_heartbeat_replaces_the_built_in_one() -> None:
    assert check(cfg(agents=[
        {"id": "a"}, {"id": "b", "heartbeat": {"every": "5m", "isolatedSession": True}}])) == []
    assert check(cfg(defaults={"isolatedSession": True}, agents=[{"id": "a"}])) == []


def test_heartbeat_true_means_default_settings() -> None:
    assert names(check(cfg(agents=[{"id": "a", "heartbeat": True}]))) == ["a"]


def test_isolated_must_be_the_boolean_true() -> None:
    (w,) = check(cfg(agents=[{"id": "a", "heartbeat": {"isolatedSession": "true"}}]))
    assert w.isolated == "true"
    assert 'isolatedSession is "true", not true' in w.message


def test_agent_without_id_is_named_by_position() -> None:
    (w,) = check(cfg(agents=[{"heartbeat": {"every": "1m"}}]))
    assert w.agent == "agents.list[0]"


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ([], "top level"),
        ({"agents": []}, "agents is an array"),
        ({"agents": {"list": "main"}}, "agents.list is a string"),
        ({"agents": {"list": [1]}}, "agents.list[0] is a number"),
        ({"agents": {"list": {"a": []}}}, "agents.list.a is an array"),
        ({"agents": {"defaults": 3}}, "agents.defaults is a number"),
        (cfg(defaults="30m"), "agents.defaults.heartbeat is a string"),
        (cfg(agents=[{"id": "a", "heartbeat": [1]}]), "agents.list[0].heartbeat is an array"),
    ],
)
def test_shapes_that_cannot_be_read_are_errors(config: Any, where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)) as info:
        check(config, "gw.json")
    assert str(info.value).startswith("gw.json: ")


# -- parsing ------------------------------------------------------------------------------

JSON5_TEXT = """\ufeff// gateway config
{
  agents: {
    defaults: { heartbeat: { every: '30m', } },  // trailing commas are fine
    list: [
      { id: 'main', heartbeat: { target: 'last' } },
      { id: 'ops', heartbeat: { isolatedSession: true } },
    ],
  },
}
"""


def test_json5_with_comments_trailing_commas_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "openclaw.json"
    path.write_text(JSON5_TEXT, encoding="utf-8")
    assert names(check_file(path)) == ["main"]


def test_json5_numbers_in_every_form_parse() -> None:
    """Hexadecimal, signed, leading or trailing dot, Infinity: JSON5 numbers all (json5
    hands a hexadecimal one to the integer parser with a base)."""
    text = "{a: 0x1F, b: -0XFF, c: +7, d: .5, e: 5., f: Infinity, g: 1e3}"
    assert parse(text, "gw.json5") == {
        "a": 31, "b": -255, "c": 7, "d": 0.5, "e": 5.0, "f": float("inf"), "g": 1000.0
    }


def test_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "openclaw.json"
    path.write_text(json.dumps(cfg(agents={"x": {"heartbeat": {"every": "1m"}}})))
    assert names(check_file(path)) == ["x"]


def test_parse_error_has_line_and_column() -> None:
    with pytest.raises(ConfigError) as info:
        parse("{\n  a: 1,\n  b: }\n", "gw.json5")
    e = info.value
    assert (e.line, e.column) == (3, 6)
    assert str(e).startswith("gw.json5: line 3, column 6: ")


def test_a_json5_error_without_a_position_is_not_blamed_on_valid_json5() -> None:
    text = "// gateway config\n{\n  agents: {defaults: {heartbeat: {every: 1e}}},\n}\n"
    with pytest.raises(ConfigError) as info:
        parse(text, "gw.json5")
    assert info.value.line is None  # not line 1, column 1: the comment is valid JSON5
    assert "could not convert string to float: '1e'" in str(info.value)


@pytest.mark.parametrize(
    ("data", "why", "fix"),
    [
        (b"", "empty", "name the gateway's config file"),
        (b"   \n", "empty", "name the gateway's config file"),
        (b"\xff\xfe{}", "not UTF-8", "save it as UTF-8"),
        (b"{" * 100000, "line 1|nested", "mend the file there|mend the file, or name the "
         "gateway's config"),
        # Too deep to check: it may still be the gateway's config, gone wrong.
        (b"[" * 100000, "nested too deeply to be checked",
         "mend the file, or name the gateway's config file"),
        (b"{a: 1,,}", "line 1, column 8", "mend the file there"),
        # A session file named by mistake: never advice to edit it.
        (b'{"type": "message"}\n\n{"role": "user"}\n', "JSON lines",
         "name the gateway's config file"),
        # Characters a JSON string holds unescaped that are line breaks to Python.
        ('{"a": 1}\r\n{"text": "x\u2028y\u0085z"}\n'.encode(), "JSON lines",
         "name the gateway's config file"),
        # One object a line, then a line that is not one: a config to mend.
        (b'{"a": 1}\n{"b": 2}\nnope\n', "line 2, column 1", "mend the file there"),
        (b'{"a": 1}\n[2]\n', "line 2, column 1", "mend the file there"),
        # Python converts no integer of over 4300 digits (it raised a bare ValueError).
        (b'{"a": ' + b"1" * 4301 + b"}", "more than 100 digits", "no gateway setting"),
        (b'// JSON5\n{"a": ' + b"1" * 4301 + b"}", "more than 100 digits", "no gateway setting"),
    ],
)
def test_unparsable_files(tmp_path: Path, data: bytes, why: str, fix: str) -> None:
    path = tmp_path / "gw.json"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=why) as info:
        load(path)
    assert str(path) in str(info.value)
    assert re.search(f"; ({fix})", str(info.value)), info.value  # and what to do


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read it: No such file.*; check the path"):
        load(tmp_path / "missing.json")
    with pytest.raises(ConfigError,
                       match="cannot read it: Is a directory; name the config file itself"):
        load(tmp_path)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(ConfigError, match="; check the path"):
        load(dangling)


# -- the command ----------------------------------------------------------------------------


def write(tmp_path: Path, config: Any, name: str = "openclaw.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config) if not isinstance(config, str) else config)
    return path


def test_cli_warns_and_exits_0(tmp_path: Path) -> None:
    path = write(tmp_path, cfg(agents=[{"id": "main", "heartbeat": {"every": "30m"}}]))
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}: warning: agent 'main'" in result.stdout


def test_cli_strict_exits_1_with_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, cfg(agents=[{"id": "main", "heartbeat": {"every": "30m"}}]))
    result = CliRunner().invoke(main, ["check-config", "--strict", str(path)])
    assert result.exit_code == 1
    assert "agent 'main'" in result.stdout
    assert "1 warning and --strict" in result.stderr


def test_cli_notice_for_an_agent_the_explicit_only_rule_silences(tmp_path: Path) -> None:
    path = write(tmp_path, cfg(
        defaults={"every": "30m"},
        agents=[{"id": "main"}, {"id": "ops", "heartbeat": {"isolatedSession": True}}],
    ))
    result = CliRunner().invoke(main, ["check-config", "--strict", str(path)])
    assert result.exit_code == 0, result.output  # a notice is no warning
    out = result.stdout.splitlines()
    assert out[0].startswith(f"{path}: notice: agent 'main' (agents.list[0]) runs no heartbeat")
    assert "explicit-only rule" in out[0]
    assert out[1] == f"{path}: ok: every agent heartbeat is isolated or off"
    assert "warning" not in result.stdout and result.stderr == ""


def test_cli_strict_exits_0_when_clean(tmp_path: Path) -> None:
    path = write(tmp_path, cfg(agents=[{"id": "main", "heartbeat": {"isolatedSession": True}}]))
    result = CliRunner().invoke(main, ["check-config", "--strict", str(path)])
    assert result.exit_code == 0
    assert "warning" not in result.stdout
    assert result.stdout.endswith("ok: every agent heartbeat is isolated or off\n")


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("{\n  agents: {\n    list: [ {id: 'a'} \n}", "line 4, column 1"),
        ('{"agents": 5}', "agents is a number"),
    ],
)
def test_cli_malformed_config_is_a_short_error(tmp_path: Path, text: str, expect: str) -> None:
    path = write(tmp_path, text)
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2
    assert str(path) in lines[0] and expect in lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_missing_file_exits_1_not_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check-config", str(tmp_path / "nope.json")])
    assert result.exit_code == 1
    assert "nope.json: cannot read it" in result.stderr


def test_cli_escapes_control_characters_in_agent_ids(tmp_path: Path) -> None:
    path = write(tmp_path, cfg(agents={"ev\x1b[2Jil": {"heartbeat": {"every": "1m"}}}))
    result = CliRunner().invoke(main, ["check-config", str(path)], color=True)
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout
    assert "ev\\x1b[2Jil" in result.stdout


def test_installed_command_check_config(tmp_path: Path) -> None:
    good = write(tmp_path, cfg(agents=[{"id": "a", "heartbeat": {"isolatedSession": True}}]))
    bad = write(tmp_path, JSON5_TEXT, "openclaw.json5")
    broken = write(tmp_path, "{ agents: ", "broken.json5")
    run = [*_fencelock(), "check-config", "--strict"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    warned = subprocess.run([*run, str(bad)], capture_output=True, text=True, check=False)
    assert warned.returncode == 1
    assert "agent 'main'" in warned.stdout
    failed = subprocess.run([*run, str(broken)], capture_output=True, text=True, check=False)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert str(broken) in failed.stderr and "line 1" in failed.stderr


def test_a_fifo_a_device_or_a_huge_file_is_refused_without_hanging(tmp_path: Path) -> None:
    from fencelock._config import MAX_CONFIG, ConfigError, load

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(MAX_CONFIG + 1)
    sock = tmp_path / "sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    try:
        for path, why in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                          (sock, "a socket, not a regular file; name the config file"),
                          (huge, "larger than")):
            with pytest.raises(ConfigError, match=why):
                load(path)
    finally:
        listener.close()


def test_heartbeat_false_is_no_block_and_turns_nothing_off() -> None:
    """The gateway tests an agent's block for truth and spreads it over the defaults:
    `heartbeat: false` is no block, so the defaults' heartbeat (or with none, the
    built-in one of the default agent) still runs for it. It read as "off"."""
    built_in = check(cfg(agents=[{"id": "main", "heartbeat": False}, {"id": "ops"}]))
    assert [(w.agent, w.implicit) for w in built_in] == [("main", True)]
    defaults = check(cfg(defaults={"every": "1h"}, agents=[{"id": "a", "heartbeat": False}]))
    assert [(w.agent, w.implicit) for w in defaults] == [("a", False)]
    # Nor does it select: the defaults reach every agent.
    assert names(check(cfg(defaults={}, agents=[{"id": "a"}, {"id": "b", "heartbeat": False}]))) \
        == ["a", "b"]


def test_an_agent_listed_twice_is_judged_by_its_first_entry_as_the_gateway_reads_it() -> None:
    """The gateway takes an agent's settings from the first entry with its id: an
    isolated block in a later entry does not isolate it, a shared one does not share
    it; the agent is reported once, naming the entries the gateway does not read."""
    shared_first = check(cfg(agents=[
        {"id": "main"}, {"id": "main", "heartbeat": {"isolatedSession": True}}]))
    assert [(w.agent, w.where, w.ignored) for w in shared_first] == [
        ("main", "agents.list[0]", ("agents.list[1]",))]
    assert "listed again at agents.list[1], which the gateway does not read" in (
        shared_first[0].message)
    isolated_first = check(cfg(defaults={"every": "30m", "isolatedSession": True}, agents=[
        {"id": "main", "heartbeat": {"every": "1h"}},
        {"id": "main", "heartbeat": {"isolatedSession": False}}]))
    assert isolated_first == []
    twice = check(cfg(agents=[{"id": "a", "heartbeat": {}}, {"id": "a", "heartbeat": {}}]))
    assert [(w.agent, w.ignored) for w in twice] == [("a", ("agents.list[1]",))]


@pytest.mark.parametrize("later", ["ops", " ops ", "OPS", "Ops!"])
def test_ids_the_gateway_takes_for_one_agent_are_one_agent(later: str) -> None:
    """The gateway matches an entry's id trimmed and lowercased (other characters made
    `-`, dashes at the ends dropped): `Ops` and ` ops ` are one agent, whose settings come
    from the first entry; the second was judged as an agent of its own."""
    isolated_first = check(cfg(agents=[
        {"id": "Ops", "heartbeat": {"isolatedSession": True}}, {"id": later, "heartbeat": {}}]))
    assert isolated_first == []
    shared_first = check(cfg(agents=[
        {"id": "Ops", "heartbeat": {}}, {"id": later, "heartbeat": {"isolatedSession": True}}]))
    assert [(w.agent, w.ignored) for w in shared_first] == [("Ops", ("agents.list[1]",))]


def test_a_heartbeat_agent_id_in_the_defaults_gives_the_heartbeat_to_that_agent_only() -> None:
    """`agents.defaults.heartbeat.agentId` (gateways that know it): with no heartbeat
    block of an agent's own, the defaults' heartbeat runs for that agent alone, listed
    or not; every agent was warned of."""
    agents = [{"id": "main"}, {"id": "ops"}]
    only = check(cfg(defaults={"agentId": " OPS "}, agents=agents))
    assert [(w.agent, w.where) for w in only] == [("ops", "agents.list[1]")]
    assert check(cfg(defaults={"agentId": "ops", "isolatedSession": True}, agents=agents)) == []
    ghost = check(cfg(defaults={"agentId": "ghost"}, agents=agents))
    assert [(w.agent, w.where) for w in ghost] == [("ghost", "agents.defaults.heartbeat.agentId")]
    unset = check(cfg(defaults={"agentId": "  "}, agents=agents))  # not set: every agent
    assert names(unset) == ["main", "ops"]
    # A block of an agent's own: the explicit-only rule, which the setting does not change.
    explicit = check(cfg(defaults={"agentId": "ops"},
                         agents=[{"id": "main", "heartbeat": {}}, {"id": "ops"}]))
    assert names(explicit) == ["main"]


def test_an_entry_without_an_id_is_the_gateway_s_main() -> None:
    """An entry with no ``id`` is `main` to the gateway, as one with an empty id: after
    a `main` entry it is that agent's second entry, which the gateway does not read."""
    assert check(cfg(agents=[
        {"id": "main", "heartbeat": {"isolatedSession": True}}, {"heartbeat": {}}])) == []
    alone = check(cfg(agents=[{"heartbeat": {}}, {"id": " main ", "heartbeat": {}}]))
    assert [(w.where, w.ignored) for w in alone] == [("agents.list[0]", ("agents.list[1]",))]


def test_a_warning_shows_a_value_too_large_or_deep_to_print_by_its_kind() -> None:
    """An ``isolatedSession`` nested past what JSON can encode raised RecursionError as
    the warning was written (a traceback from check-config); a long string is cut."""
    deep: Any = True
    for _ in range(5000):
        deep = [deep]
    warned = check(cfg(agents=[{"id": "a", "heartbeat": {"isolatedSession": deep}}]))
    assert "isolatedSession is an array, not true" in warned[0].message
    long = check(cfg(agents=[{"id": "a", "heartbeat": {"isolatedSession": "x" * 10_000}}]))
    assert 'isolatedSession is "' + "x" * 40 + '..."' in long[0].message


def test_a_config_too_large_for_the_json5_parser_is_read_as_plain_json_only() -> None:
    """The JSON5 parser takes some 20 s a MiB: a config over 1 MiB that plain JSON
    cannot read got no answer for minutes. It is refused at JSON's error."""
    text = '{"agents": {"list": [' + ", ".join(['{"id": "a"}'] * 100_000) + "]}} // done"
    assert len(text) > 1024 * 1024
    with pytest.raises(ConfigError, match="reads a config over 1 MiB as plain JSON only") \
            as caught:
        parse(text, "big.json")
    assert caught.value.line == 1
    # The file may be valid JSON5, which the gateway reads: the limit is fencelock's.
    assert "(the gateway cannot read it either)" not in str(caught.value)
    assert "check a copy without JSON5's comments" in str(caught.value)
    # Counted in bytes, as the file is: 600,000 two-byte characters are over 1 MiB.
    wide = '{"agents": {"defaults": {"x": "' + "\u00e9" * 600_000 + '"}}} // done'
    with pytest.raises(ConfigError, match="as plain JSON only"):
        parse(wide, "wide.json")


@pytest.mark.parametrize("data", [
    b'{"role":"user","content":"hi"}\n',  # one line: it parses as a config with no agents
    b'{"role":"user","content":"hi"}\n{"role":"assi',  # a torn last line: never "mend it"
])
def test_a_session_file_and_its_sidecar_named_by_mistake_are_refused(
    tmp_path: Path, data: bytes,
) -> None:
    from fencelock import SessionLock

    session = tmp_path / "0d6f6a7e-1b8e-4c55-9d35-8c3c1bd0c0a1.jsonl"
    session.write_bytes(data)
    with SessionLock(session, lane="hb"):
        pass
    upper = tmp_path / "S.JSONL.HOLDER"  # a case-insensitive filesystem's sidecar
    upper.write_bytes(Path(f"{session}.holder").read_bytes())
    for path, what in ((session, "a session file"),
                       (Path(f"{session}.holder"), "a session's holder record"),
                       (upper, "a session's holder record")):
        with pytest.raises(ConfigError, match=what) as info:
            load(path)
        assert "name the gateway's config file" in str(info.value)
    # What is not a file there is named as such.
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(ConfigError, match="Is a directory"):
        load(tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("depth", [40, 900])
def test_json5_nests_as_deep_as_json(tmp_path: Path, depth: int) -> None:
    """A config with a comment (JSON5) nesting as deep as one plain JSON reads (tools'
    JSON schemas, say): not "nested too deeply"."""
    deep = "{a:" * depth + "1" + "}" * depth
    path = tmp_path / "gw.json5"
    path.write_text("// gateway\n{agents: {list: [{id: 'a', heartbeat: "
                    "{isolatedSession: true}, tools: " + deep + "}]}}\n")
    done = subprocess.run([*_fencelock(), "check-config", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and "ok:" in done.stdout, done.stderr


def test_the_library_leaves_the_recursion_limit_alone(tmp_path: Path) -> None:
    before = sys.getrecursionlimit()
    path = tmp_path / "gw.json5"
    path.write_text("// gateway\n{agents: {}, x: " + "{a:" * 20 + "1" + "}" * 20 + "}\n")
    check_file(path)
    assert sys.getrecursionlimit() == before
    assert CliRunner().invoke(main, ["check-config", str(path)]).exit_code == 0  # put back
    assert sys.getrecursionlimit() == before


def test_agents_entries_keyed_by_id_is_the_roster_of_newer_gateways() -> None:
    """Newer gateways keep their agents in `agents.entries`, an object keyed by agent id
    (a leftover `agents.list` beside it is not read); it was not read at all, so every
    agent's block went unseen and only the implicit `main` was judged."""
    config = {"agents": {
        "defaults": {"heartbeat": {"every": "30m"}},
        "entries": {"main": {"heartbeat": {"isolatedSession": True}}, "Ops": {}},
        "list": [{"id": "stale", "heartbeat": {"isolatedSession": False}}]}}
    found = review(config)
    assert [(w.agent, w.where) for w in found.warnings] == []
    assert [(n.agent, n.where) for n in found.notices] == [("Ops", "agents.entries.Ops")]
    shared = check({"agents": {"entries": {"main": {}, "ops": {"heartbeat": {"every": "1h"}}}}})
    assert [(w.agent, w.where) for w in shared] == [("ops", "agents.entries.ops")]
    empty = check({"agents": {"entries": {}, "list": [{"id": "x", "heartbeat": {}}]}})
    assert [(w.where, w.implicit) for w in empty] == [
        ("agents (agents.entries is empty: the implicit default agent)", True)]
    with pytest.raises(ConfigError, match=r"agents\.entries is an array, expected an object"):
        check({"agents": {"entries": [{"id": "main"}]}})


def test_keyed_agents_are_taken_in_javascript_key_order() -> None:
    """An object's keys that are array indices come first, in ascending number, as
    JavaScript walks them: `2` is the first agent (the default one) before `10` and `a`."""
    keyed: dict[str, Any] = {"a": {}, "10": {}, "2": {}, "01": {}}
    (only,) = check({"agents": {"list": keyed}})
    assert (only.agent, only.implicit, only.chosen) == ("2", True, "the first listed")
    for roster in ("entries", "list"):
        everyone = check({"agents": {"defaults": {"heartbeat": {}}, roster: keyed}})
        assert names(everyone) == ["2", "10", "a", "01"]


def test_the_system_agent_gets_the_built_in_heartbeat_in_newer_gateways() -> None:
    """With nothing configured, newer gateways give the built-in heartbeat to
    `agents.defaults.systemAgent.agentId`, listed or not."""
    agents: dict[str, Any] = {"entries": {"main": {}, "ops": {}}}
    (ops,) = check({"agents": {**agents, "defaults": {"systemAgent": {"agentId": " Ops "}}}})
    assert (ops.agent, ops.where, ops.implicit) == ("ops", "agents.entries.ops", True)
    (ghost,) = check({"agents": {**agents, "defaults": {"systemAgent": {"agentId": "x"}}}})
    assert (ghost.agent, ghost.where) == ("x", "agents.defaults.systemAgent.agentId")
    off = {"entries": {"main": {}, "ops": {"heartbeat": {"every": "0m"}}}}
    assert check({"agents": {**off, "defaults": {"systemAgent": {"agentId": "ops"}}}}) == []


def test_the_built_in_heartbeat_goes_where_either_gateway_would_run_it() -> None:
    """With nothing configured: in `agents.list`, the first agent marked `default: true`,
    else both the first listed and `main` where listed (older gateways took `main`:
    it was passed over); in `agents.entries`, which only newer gateways read, the one
    marked agent (not under `ownership: "explicit"`), else the only agent, else none
    (they run none: it warned of the first)."""
    def owners(agents: dict[str, Any]) -> list[tuple[str, str]]:
        return [(w.agent, w.chosen) for w in check({"agents": agents}) if w.implicit]

    later_main = [{"id": "ops"}, {"id": "main"}]
    assert owners({"list": later_main}) == [
        ("main", "older gateways take main when no agent is marked default"),
        ("ops", "the first listed")]
    assert owners({"list": [*later_main, {"id": "x", "default": True}]}) == [
        ("x", "marked default: true")]
    assert owners({"entries": {"a": {}, "b": {}}}) == []
    assert owners({"entries": {"a": {}, "b": {"default": True}}}) == [
        ("b", "marked default: true")]
    assert owners({"ownership": "explicit", "entries": {"a": {}, "b": {"default": True}}}) == []
    assert owners({"entries": {"a": {}, "b": {"default": True}, "c": {"default": True}}}) == []
    assert owners({"entries": {"solo": {}}}) == [("solo", "the only agent")]
    assert owners({"entries": {"gone": None, "solo": {}}}) == [("solo", "the only agent")]
    (implicit,) = check({"agents": {"entries": {"solo": {}}}})
    assert "for the default agent (the only agent), not isolated" in implicit.message


# -- $include and ${VAR}, resolved as the gateway resolves them ---------------------------


def _write(tmp_path: Path, **files: str) -> None:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_included_agents_are_checked_as_the_gateway_merges_them(tmp_path: Path) -> None:
    """The gateway resolves ``$include`` before it reads a setting: an agent whose
    heartbeat block is in an included file runs that heartbeat, and the explicit-only
    rule then leaves the others none. Read as a key of its own, the include hid the
    real warning and made one up for the built-in heartbeat of ``main``."""
    _write(tmp_path, **{
        "openclaw.json5": '{agents: {"$include": "./agents/list.json5"}}',
        # relative to the file that names it
        "agents/list.json5": '{"$include": "./ops.json5", list: [{id: "main"}]}',
        "agents/ops.json5": '{list: [{id: "ops", heartbeat: {every: "5m"}}]}',
    })
    report = review_file(tmp_path / "openclaw.json5")
    # arrays concatenate: the included list first, then the one beside the include
    assert [(w.agent, w.where) for w in report.warnings] == [("ops", "agents.list[0]")]
    assert not any(w.implicit for w in report.warnings)  # main runs none


@pytest.mark.parametrize(("top", "expected"), [
    # an include in a heartbeat block: what it holds is the block
    ('{agents: {list: [{id: "a", heartbeat: {"$include": "./hb.json5"}}]}}', []),
    # keys beside the include are merged over it, and win
    ('{agents: {list: [{id: "a", heartbeat: {"$include": "./hb.json5", '
     'isolatedSession: false}}]}}', ["a"]),
    # files of an array merged in order: the later file's value wins
    ('{agents: {list: [{id: "a", heartbeat: {"$include": ["./hb.json5", "./off.json5"]}}]}}',
     ["a"]),
    ('{"$include": "./base.json5"}', []),
])
def test_includes_merge_deeply_siblings_and_later_files_winning(
    tmp_path: Path, top: str, expected: list[str]
) -> None:
    _write(tmp_path, **{
        "top.json5": top,
        "hb.json5": '{every: "5m", isolatedSession: true}',
        "off.json5": "{isolatedSession: false}",
        "base.json5": '{agents: {defaults: {heartbeat: {every: "5m", isolatedSession: '
                      'true}}, list: [{id: "a"}]}}',
    })
    assert names(check_file(tmp_path / "top.json5")) == expected


@pytest.mark.parametrize(("files", "said"), [
    ({"top.json5": '{"$include": "./top.json5"}'}, "includes a file that includes it"),
    ({"top.json5": '{"$include": "./a.json5"}', "a.json5": '{"$include": "./top.json5"}'},
     "includes a file that includes it"),
    ({"top.json5": '{"$include": "./missing.json5"}'},
     "missing.json5: cannot read it: No such file or directory; fix the $include that "
     "names it (named by the $include in"),
    ({"top.json5": '{"$include": 5}'}, "not a file name or an array of file names"),
    ({"top.json5": '{"$include": "./list.json5", agents: {}}', "list.json5": "[1]"},
     "do not hold an object"),
    ({"top.json5": '{"$include": "./0.json5"}',
      **{f"{i}.json5": f'{{"$include": "./{i + 1}.json5"}}' for i in range(11)},
      "11.json5": "{}"}, "nests includes more than 10 deep"),
])
def test_an_include_the_gateway_refuses_is_an_error_naming_it(
    tmp_path: Path, files: dict[str, str], said: str
) -> None:
    _write(tmp_path, **files)
    out = CliRunner().invoke(main, ["check-config", str(tmp_path / "top.json5")])
    assert out.exit_code == 1, out.output
    assert said in out.output and "Traceback" not in out.output, out.output


@pytest.mark.parametrize(("name", "said"), [("a\\u0000b.json", "a NUL byte"),
                                           ("\\ud800.json", "text that is not valid Unicode")])
def test_an_include_whose_name_no_file_can_have_is_an_error_naming_it(
    tmp_path: Path, name: str, said: str
) -> None:
    """An `$include` naming a file with a NUL byte or a lone surrogate in its name: one
    error line naming the include, no traceback."""
    _write(tmp_path, **{"top.json": f'{{"$include": ["./ok.json", "{name}"]}}', "ok.json": "{}"})
    out = CliRunner().invoke(main, ["check-config", str(tmp_path / "top.json")])
    assert out.exit_code == 1, out.output
    assert f"cannot read it: its name holds {said}; fix the $include that names it" in \
        out.output and "Traceback" not in out.output, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception


def test_an_included_file_is_read_whatever_its_name(tmp_path: Path) -> None:
    """The gateway includes any file that parses: one named `*.jsonl` or `*.holder` is
    read as the rest of the config (only the config named on the command line is taken
    for a session file named by mistake)."""
    agents = '{"agents": {"list": [{"id": "main", "heartbeat": {"every": "5m"}}]}}'
    _write(tmp_path, **{"top.json": '{"$include": "./agents.jsonl"}', "agents.jsonl": agents})
    out = CliRunner().invoke(main, ["check-config", str(tmp_path / "top.json")])
    assert out.exit_code == 0 and "warning: agent 'main'" in out.output, out.output
    with pytest.raises(ConfigError, match="a session file"):
        load(tmp_path / "agents.jsonl")


def test_an_include_that_is_no_regular_file_or_a_dangling_symlink_is_named_as_such(
    tmp_path: Path
) -> None:
    """An `$include` naming a FIFO is mended in the `$include` (not by naming another
    config: the one named is right); a dangling symlink, named or included, is said to
    be one, with where it leads."""
    os.mkfifo(tmp_path / "inc.fifo")
    _write(tmp_path, **{"top.json5": '{"$include": "./inc.fifo"}'})
    out = CliRunner().invoke(main, ["check-config", str(tmp_path / "top.json5")])
    assert out.exit_code == 1, out.output
    assert "inc.fifo: a FIFO, not a regular file; fix the $include that names it" in \
        out.output, out.output
    (tmp_path / "dangling.json").symlink_to("nowhere.json")
    with pytest.raises(ConfigError, match=re.escape(
            "cannot read it: a symlink to nowhere.json, which does not exist; check the path")):
        load(tmp_path / "dangling.json")


def test_includes_ten_deep_are_read(tmp_path: Path) -> None:
    """The gateway's limit: ten nested includes are read, an eleventh is refused."""
    _write(tmp_path, **{"top.json5": '{"$include": "./0.json5"}',
                        **{f"{i}.json5": f'{{"$include": "./{i + 1}.json5"}}' for i in range(9)},
                        "9.json5": '{agents: {list: [{id: "deep", heartbeat: {}}]}}'})
    assert names(check_file(tmp_path / "top.json5")) == ["deep"]


@pytest.mark.parametrize(("every", "environ", "warned", "unknown"), [
    ("${HB_EVERY}", {"HB_EVERY": "5m"}, True, ""),
    ("${HB_EVERY}", {"HB_EVERY": "0m"}, False, ""),  # the gateway reads no interval
    # not set here (or empty, which the gateway takes for unset): taken to run, and said
    ("${HB_EVERY}", {}, True, "${HB_EVERY}"),
    ("${HB_EVERY}", {"HB_EVERY": ""}, True, "${HB_EVERY}"),
    ("$${HB_EVERY}", {"HB_EVERY": "5m"}, False, ""),  # escaped: the text ${HB_EVERY}
    ("${hb_every}", {"hb_every": "5m"}, False, ""),  # upper case only: left as written
])
def test_environment_references_are_substituted_as_the_gateway_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: str, environ: dict[str, str],
    warned: bool, unknown: str,
) -> None:
    """An interval from the environment (``every: "${HB_EVERY}"``) read as written is
    no interval, and the heartbeat was taken to be off."""
    for name in ("HB_EVERY", "hb_every"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "openclaw.json"
    path.write_text(json.dumps(cfg(defaults={"every": every}, agents=[{"id": "a"}])))
    warnings = check_file(path)
    assert names(warnings) == (["a"] if warned else [])
    if warned:
        assert warnings[0].unknown_every == unknown
        assert ("taken to run" in warnings[0].message) == bool(unknown)


@pytest.mark.parametrize(("env", "environ", "warned"), [
    ({"vars": {"HB_EVERY": "0m"}}, {}, False),  # the config's own: the heartbeat is off
    ({"HB_EVERY": "0m"}, {}, False),  # a string directly under env, as vars
    ({"vars": {"HB_EVERY": "0m"}}, {"HB_EVERY": "5m"}, True),  # the environment's first
    ({"vars": {"HB_EVERY": "0m"}}, {"HB_EVERY": " "}, False),  # ...unless blank
    ({"vars": {"HB_EVERY": "${OTHER}"}}, {"OTHER": "0m"}, True),  # not a reference itself
    ({}, {"HB_EVERY": " "}, False),  # blank, with none in the config: " ", no interval
])
def test_a_configs_own_variables_fill_in_where_the_environment_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, Any],
    environ: dict[str, str], warned: bool,
) -> None:
    for name in ("HB_EVERY", "OTHER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    config = cfg(defaults={"every": "${HB_EVERY}"}, agents=[{"id": "a"}])
    config["env"] = env
    path = tmp_path / "openclaw.json"
    path.write_text(json.dumps(config))
    assert names(check_file(path)) == (["a"] if warned else [])

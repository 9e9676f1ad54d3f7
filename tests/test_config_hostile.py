"""Hostile config files get one clear ConfigError (issue 23, item 10, config part)."""

from __future__ import annotations

import pytest

from accelops.train.config import ConfigError, apply_overrides, load_config


def test_deeply_nested_json_is_a_config_error(tmp_path):
    """Before: a raw RecursionError with ~200 KB of traceback."""
    p = tmp_path / "deep.json"
    p.write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nests too deep to parse|nests deeper than 16 levels"):
        load_config(p)


def test_deeply_nested_toml_is_a_config_error(tmp_path):
    p = tmp_path / "deep.toml"
    p.write_text("[model]\nx = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nests too deep to parse|nests deeper"):
        load_config(p)


def test_moderately_nested_config_names_the_key(tmp_path):
    p = tmp_path / "nested.json"
    p.write_text('{"train": {"x": ' + "[" * 30 + "]" * 30 + "}}")
    with pytest.raises(ConfigError, match=r"train\.x\[0\].* nests deeper than 16 levels"):
        load_config(p)


def test_a_huge_string_is_not_echoed(tmp_path):
    """Before: a 10 MB string was echoed whole into the error message."""
    p = tmp_path / "big.toml"
    p.write_text('[model]\nquant = "' + "x" * 100_000 + '"\n')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    message = str(info.value)
    assert "model.quant is a string of 100,000 characters" in message and len(message) < 500
    big = tmp_path / "huge.toml"
    big.write_text('[model]\nquant = "' + "x" * (10 << 20) + '"\n')
    with pytest.raises(ConfigError, match=r"is 10,485,7\d\d bytes; a config is at most 1,048,576") as info:
        load_config(big)
    assert len(str(info.value)) < 500
    with pytest.raises(ConfigError, match="model.quant is a string of 5,000 characters"):
        apply_overrides({}, ["model.quant=" + "y" * 5000])


def test_a_parse_error_message_is_clipped(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"model": "' + "z" * 5000)  # unterminated
    with pytest.raises(ConfigError, match="does not parse") as info:
        load_config(p)
    assert len(str(info.value)) < 1000

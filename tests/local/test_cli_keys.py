"""``serve`` takes its key from a file or the environment, so that it never shows in the
process list; the ``--api-key`` flag stays, with a warning in its help."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from firetitan.cli import build_parser
from firetitan.cli_keys import ApiKeyError, api_key_from


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_the_key_comes_from_the_file_the_flag_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("tml-from-file\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("FIRETITAN_API_KEY", "tml-from-env")
    assert api_key_from(_args("--api-key-file", str(key_file))) == ("tml-from-file", "file")
    assert api_key_from(_args("--api-key", "tml-flag")) == ("tml-flag", "flag")
    assert api_key_from(_args()) == ("tml-from-env", "env")
    monkeypatch.delenv("FIRETITAN_API_KEY")
    assert api_key_from(_args()) == (None, "none")


def test_unusable_key_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ApiKeyError, match="the first line holds no key"):
        api_key_from(_args("--api-key-file", str(empty)))
    with pytest.raises(ApiKeyError, match="cannot be read"):
        api_key_from(_args("--api-key-file", str(tmp_path / "missing")))
    with pytest.raises(SystemExit):  # argparse: not allowed with each other
        _args("--api-key", "k", "--api-key-file", str(empty))


def test_a_key_file_readable_by_others_is_used_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("tml-shared")
    key_file.chmod(0o644)
    assert api_key_from(_args("--api-key-file", str(key_file)))[0] == "tml-shared"
    assert "readable by other users (mode 644); chmod 600 it" in capsys.readouterr().err


def test_the_flag_help_warns_about_the_process_list(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "every local user sees it in the process list" in help_text
    assert "--api-key-file" in help_text

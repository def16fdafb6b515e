import pytest

from bcc_pipeline import cli


@pytest.fixture
def failing_command(tmp_path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A command that ends in a BCCError at once: base weights from a file that does not exist."""
    for name in ("BCC_DEBUG", "BCC_PROFILE", "BCC_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BCC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BCC_BASE_WEIGHTS", str(tmp_path / "missing.h5"))
    return ["model-info"]


def test_a_bcc_error_is_one_line_by_default(failing_command, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(failing_command) == 1
    err = capsys.readouterr().err
    assert err.startswith("bcc: error: base weights file") and "missing.h5" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bcc_debug_shows_the_traceback_of_a_bcc_error(
    failing_command, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BCC_DEBUG", "1")
    assert cli.main(failing_command) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "WeightsUnavailableError" in err
    assert err.strip().splitlines()[-1].startswith("bcc: error: base weights file")


def test_bcc_config_never_prints_a_password(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    monkeypatch.setenv("BCC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(
        "BCC_DATABASE_URL", "postgresql://bcc:hunter2pw@db/bcc?password=querysecret&sslpassword=ssl1"
    )
    assert cli.main(["config", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["settings"]["database_url"].startswith("postgresql://bcc:***@db/bcc?")
    assert cli.main(["config"]) == 0
    out += capsys.readouterr().out
    for secret in ("hunter2pw", "querysecret", "ssl1"):
        assert secret not in out

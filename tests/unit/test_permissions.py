"""The permission policy (``BCC_UMASK``, default 027): what BCC creates is group-readable and not
world-readable, whatever umask the login shell had."""

import os
import stat
from pathlib import Path

import pytest

from bcc_pipeline import cli, files
from bcc_pipeline.config import load_settings
from bcc_pipeline.errors import ConfigError
from bcc_pipeline.store import dispose_engine


@pytest.fixture
def loose_umask():
    """A typical login umask (022: world-readable) for the test, the process's own restored afterwards."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def cli_home(tmp_path, monkeypatch):
    for name in ("BCC_DATABASE_URL", "BCC_PROFILE", "BCC_UMASK"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("BCC_HOME", str(home))
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    yield home
    dispose_engine(f"sqlite:///{home / 'bcc.db'}")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_cli_creates_the_database_and_the_dataset_store_group_readable_only(
    loose_umask, cli_home, png_writer
):
    assert cli.main(["db", "upgrade"]) == 0
    db = cli_home / "bcc.db"
    assert _mode(db) == 0o640
    for extra in (Path(f"{db}-wal"), Path(f"{db}-shm")):  # SQLite gives its WAL files the database's mode
        if extra.exists():
            assert _mode(extra) == 0o640
    png_writer(cli_home / "landing" / "benign" / "a.png", seed=1)
    (cli_home / "landing" / "benign" / "bad.png").write_bytes(b"not an image at all")
    assert cli.main(["intake", "--json"]) == 0
    stored = [p for p in (cli_home / "dataset").rglob("*") if p.is_file()]
    assert len(stored) == 1 and _mode(stored[0]) == 0o640
    assert _mode(stored[0].parent) == 0o750 and _mode(cli_home / "dataset") == 0o750
    reasons = list((cli_home / "quarantine").rglob("*.reason.txt"))
    assert len(reasons) == 1 and _mode(reasons[0]) == 0o640


def test_bcc_score_creates_archive_quarantine_runs_and_the_compiled_cache_group_readable_only(
    loose_umask, cli_home, png_writer, register_champion
):
    """What ``bcc score`` creates follows the policy too: the run's archive and quarantine folders, the
    reason files, ``runs/<run>/`` and the converted-model cache (``models/<v>/compiled/``)."""
    assert cli.main(["db", "upgrade"]) == 0
    s = load_settings()
    os.umask(0o022)  # the CLI applied the policy in this process: back to the login umask
    version = register_champion(s)
    png_writer(cli_home / "inbox" / "ward_1" / "a.png", seed=1, size=40)
    (cli_home / "inbox" / "ward_1" / "bad.png").write_bytes(b"not an image at all")
    assert cli.main(["score", "--inference", "openvino", "--force-unvalidated", "--json"]) == 0
    archive, quarantine = cli_home / "archive", cli_home / "quarantine"
    compiled = cli_home / "models" / version / "compiled"
    assert len(list(archive.rglob("a.png"))) == 1 and len(list(quarantine.rglob("bad.png"))) == 1
    assert compiled.is_dir() and any(compiled.iterdir()), "the openvino conversion was not cached"
    for root in (archive, quarantine, cli_home / "runs", compiled):
        folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
        made = [p for p in root.rglob("*") if p.is_file() and p.suffix != ".png"]  # moved images keep theirs
        assert {str(p): oct(_mode(p)) for p in folders} == {str(p): oct(0o750) for p in folders}
        assert {str(p): oct(_mode(p)) for p in made} == {str(p): oct(0o640) for p in made}
    assert list(quarantine.rglob("*.reason.txt")) and list((cli_home / "runs").rglob("plan.json"))
    assert list(compiled.rglob("source.json"))


def test_bcc_umask_077_makes_everything_private(loose_umask, cli_home, monkeypatch):
    monkeypatch.setenv("BCC_UMASK", "077")
    assert cli.main(["db", "upgrade"]) == 0
    assert _mode(cli_home / "bcc.db") == 0o600 and _mode(cli_home) == 0o700


def test_saved_model_artifacts_follow_the_umask(loose_umask, tmp_path):
    from tests.support import save_tiny_artifact

    files.apply_umask(load_settings(env={}).umask)
    path, _sha = save_tiny_artifact(tmp_path / "models" / "v1")
    assert _mode(path) == 0o640 and _mode(path.parent / "metadata.json") == 0o640
    assert _mode(path.parent) == 0o750


def test_atomic_write_gives_the_umask_mode_not_mkstemps_0600(loose_umask, tmp_path):
    assert files.apply_umask(0o027) == 0o022 and files.current_umask() == 0o027
    assert _mode(files.atomic_write(tmp_path / "a.json", "{}")) == 0o640
    assert _mode(files.atomic_write(tmp_path / "b.bin", lambda p: p.write_bytes(b"x"))) == 0o640
    files.apply_umask(0o002)
    assert _mode(files.atomic_write(tmp_path / "c.json", "{}")) == 0o664
    assert files.created_mode(directory=True) == 0o775


@pytest.mark.parametrize("raw", ["0o177", "777", "8", "abc", "-1"])
def test_bcc_umask_must_leave_the_owner_read_and_write(raw):
    with pytest.raises(ConfigError, match="BCC_UMASK"):
        load_settings(env={"BCC_UMASK": raw})


def test_bcc_umask_is_octal_everywhere():
    assert load_settings(env={}).umask == 0o027
    assert load_settings(env={"BCC_UMASK": "0o007"}).umask == 0o007
    assert load_settings(env={"BCC_UMASK": "22"}).as_dict()["umask"] == "022"


def test_a_group_shared_home_keeps_its_group_down_to_the_compiled_cache(
    cli_home, png_writer, register_champion
):
    """README "Permissions": a home whose folders are setgid to the shared group keeps that group on what
    BCC creates, so the other user of the group can read it. Round 21: the converted-model cache folder lost
    the setgid bit (an explicit chmod), so its files took the creator's own group, and the other user
    converted the model again on every run."""
    import grp

    if os.geteuid() != 0:
        pytest.skip("needs root to give the home a group of which the test user is not the primary member")
    shared = next((g for g in grp.getgrall() if g.gr_gid not in (0, os.getegid())), None)
    if shared is None:
        pytest.skip("no second group on this machine")
    cli_home.mkdir()
    os.chown(cli_home, -1, shared.gr_gid)
    os.chmod(cli_home, 0o2770)
    assert cli.main(["db", "upgrade"]) == 0
    version = register_champion(load_settings())
    png_writer(cli_home / "inbox" / "ward_1" / "a.png", seed=1, size=40)
    assert cli.main(["score", "--inference", "openvino", "--force-unvalidated", "--json"]) == 0
    compiled = cli_home / "models" / version / "compiled"
    assert list(compiled.rglob("source.json")), "the openvino conversion was not cached"
    for root in (cli_home / "archive", cli_home / "runs", compiled):
        made = [root, *root.rglob("*")]
        assert {str(p): os.lstat(p).st_gid for p in made} == {str(p): shared.gr_gid for p in made}
        folders = [p for p in made if p.is_dir()]
        assert all(os.lstat(p).st_mode & stat.S_ISGID for p in folders), [
            str(p) for p in folders if not os.lstat(p).st_mode & stat.S_ISGID
        ]

"""The Airflow 3 DAGs: integrity, parse lightness, and real `dag.test()` runs (via `airflow dags test`)
on SQLite and on PostgreSQL (Airflow's metadata database and the project database, separately)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.support import write_png

from .airflow_support import DAGS, REPO, airflow, airflow_env, dags_test, migrate, register_tiny_champion
from .cli_support import (
    bcc_cli_env,
    bcc_json,
    check_listed_validation,
    check_rollback_and_promote,
    check_trained_model_dir,
)

DAG_FILES = sorted(p for p in DAGS.glob("*.py") if p.name != "bcc_common.py")
HEAVY = ("tensorflow", "keras", "cv2", "sklearn", "pandas", "matplotlib")
# The DAG folder parsed the way Airflow's DAG processor, task runner and `airflow dags test` parse it:
# BundleDagBag puts the bundle folder on sys.path, so the DAG files can import bcc_common.
BUNDLE_BAG = (
    "from airflow.dag_processing.dagbag import BundleDagBag\n"
    f"bag = BundleDagBag(dag_folder={str(DAGS)!r}, bundle_path={str(DAGS)!r}, bundle_name='dags-folder')"
)


def _python(code: str, env_extra: dict[str, str], tmp_path: Path) -> str:
    from .airflow_support import airflow_env as _env

    env = _env(tmp_path / "af", metadata_url=None, bcc={})
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def test_dag_files_exist():
    assert {p.name for p in DAG_FILES} == {"bcc_retrain.py", "bcc_score.py"}


@pytest.mark.parametrize("dag_file", DAG_FILES + [DAGS / "bcc_common.py"], ids=lambda p: p.name)
def test_parsing_a_dag_file_imports_no_heavy_module(dag_file, tmp_path):
    code = (
        "import importlib.util, json, sys\n"
        f"sys.path.insert(0, {str(DAGS)!r})\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(dag_file)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    assert json.loads(_python(code, {}, tmp_path)) == []


def test_dagbag_integrity(tmp_path):
    code = (
        "import json\n"
        f"{BUNDLE_BAG}\n"
        "out = {'errors': {k: str(v)[:500] for k, v in bag.import_errors.items()}, 'dags': {}}\n"
        "for dag_id, d in bag.dags.items():\n"
        "    out['dags'][dag_id] = {'tags': sorted(d.tags), 'max_active_runs': d.max_active_runs,\n"
        "        'schedule': str(getattr(d.timetable, 'expression', None) or type(d.timetable).__name__), 'doc': bool(d.doc_md), 'catchup': d.catchup,\n"
        "        'retries': {t.task_id: t.retries for t in d.tasks}, 'params': sorted(d.params.keys()),\n"
        "        'inference': (d.params.get_param('inference').schema.get('enum') if 'inference' in d.params else None),\n"
        "        'profile': (d.params.get_param('profile').schema.get('enum') if 'profile' in d.params else None)}\n"
        "print(json.dumps(out))\n"
    )
    out = json.loads(_python(code, {}, tmp_path))
    assert out["errors"] == {}
    assert set(out["dags"]) == {"bcc_retrain", "bcc_score"}
    for dag_id, d in out["dags"].items():
        assert "bcc" in d["tags"] and d["max_active_runs"] == 1 and d["doc"] and not d["catchup"], dag_id
        assert d["schedule"] not in ("None", ""), dag_id
        assert any(r > 0 for r in d["retries"].values()), dag_id
    retrain, score = out["dags"]["bcc_retrain"], out["dags"]["bcc_score"]
    assert retrain["schedule"] == "0 3 * * 0" and score["schedule"] == "0 2 * * *"
    assert retrain["retries"]["train"] == 0 and retrain["retries"]["intake"] == 2
    assert retrain["params"] == [
        "candidate",
        "epochs",
        "force",
        "min_new_images",
        "profile",
        "require_approval",
    ]
    assert score["params"] == ["batch_size", "force_unvalidated", "inbox", "inference", "shards"]
    from bcc_pipeline.config import INFERENCE_CHOICES

    assert score["inference"][0] is None and sorted(score["inference"][1:]) == sorted(INFERENCE_CHOICES)
    from bcc_pipeline.config import PROFILES

    assert retrain["profile"][0] is None and sorted(retrain["profile"][1:]) == sorted(PROFILES)


def test_schedules_are_configurable(tmp_path):
    code = (
        "import json\n"
        f"{BUNDLE_BAG}\n"
        "print(json.dumps({k: str(getattr(d.timetable, 'expression', None) or type(d.timetable).__name__) for k, d in bag.dags.items()}))\n"
    )
    out = json.loads(
        _python(code, {"BCC_RETRAIN_SCHEDULE": "0 5 * * 1", "BCC_SCORE_SCHEDULE": "30 1 * * *"}, tmp_path)
    )
    assert out == {"bcc_retrain": "0 5 * * 1", "bcc_score": "30 1 * * *"}


def test_the_nightly_run_shards_follow_bcc_score_shards(tmp_path):
    """The scheduled run has no conf, so it runs with the `shards` param's default: BCC_SCORE_SHARDS,
    read when the file is parsed, with the bounds of the declared setting; a bad value is an import
    error naming the variable, never a silent 1."""
    code = (
        "import json, os\n"
        "from airflow.dag_processing.dagbag import BundleDagBag\n"
        "out = {}\n"
        "for value in (None, '4', ' 12 ', '0', '65', 'four'):\n"
        "    os.environ.pop('BCC_SCORE_SHARDS', None)\n"
        "    if value is not None:\n"
        "        os.environ['BCC_SCORE_SHARDS'] = value\n"
        f"    bag = BundleDagBag(dag_folder={str(DAGS)!r}, bundle_path={str(DAGS)!r}, bundle_name='dags-folder')\n"
        "    dag = bag.dags.get('bcc_score')\n"
        "    p = dag.params.get_param('shards') if dag else None\n"
        "    out[str(value)] = {'default': p.value if p else None, 'max': p.schema.get('maximum') if p else None,\n"
        "        'errors': [str(e)[-300:] for e in bag.import_errors.values()]}\n"
        "print(json.dumps(out))\n"
    )
    out = json.loads(_python(code, {}, tmp_path))
    from bcc_pipeline.config import SETTINGS

    spec = SETTINGS["score_shards"]
    assert out["None"] == {"default": spec.default, "max": spec.maximum, "errors": []}
    assert out["4"]["default"] == 4 and out["4"]["errors"] == []
    assert out[" 12 "]["default"] == 12
    for bad in ("0", "65", "four"):
        assert out[bad]["default"] is None, bad  # the DAG is not loaded with some other value
        assert any("BCC_SCORE_SHARDS must be a whole number from 1 to 64" in e for e in out[bad]["errors"]), (
            out[bad]
        )


def test_airflow_records_no_import_errors(tmp_path):
    """The DAG files import bcc_common at parse time. Parsed by Airflow itself (`dags reserialize`
    parses the bundle as the DAG processor does and records import errors in the metadata database,
    which the UI and `list-import-errors` show), and by the local check of the bundle, they load."""
    env = airflow_env(
        tmp_path / "af",
        metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}",
        bcc={"BCC_HOME": str(tmp_path / "bcc")},
    )
    migrate(env)
    airflow(env, "dags", "reserialize")

    def listing(*args: str) -> list:  # the JSON line of `-o json` (warnings may precede it)
        out = airflow(env, "dags", *args, "-o", "json").stdout  # exits 1 when it lists import errors
        return json.loads([line for line in out.splitlines() if line.startswith("[")][-1])

    assert listing("list-import-errors") == []
    assert listing("list-import-errors", "--local", "--bundle-name", "dags-folder") == []
    assert {d["dag_id"] for d in listing("list")} == {"bcc_retrain", "bcc_score"}


# -- full runs ---------------------------------------------------------------------------------
@pytest.fixture
def airflow_pg_url(pg_server):
    """Airflow's own metadata database on PostgreSQL, separate from the project database."""
    from tests.support import create_pg_database

    url, drop = create_pg_database("airflow_test")
    yield url
    drop()


def _bcc_env(home: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {
        "BCC_HOME": str(home),
        "BCC_DATABASE_URL": database_url,
        "BCC_SETTLE_SECONDS": "0",
        "BCC_IMAGE_SIZE": "32",
        "BCC_BASE_WEIGHTS": "none",
        # a promotion validates fp32 Keras only (reloaded and recorded, no conversion); the real
        # OpenVINO conversion at promotion is test_cli_e2e.py::test_cli_end_to_end_sqlite's
        "BCC_PUBLISH_BACKENDS": "keras",
    }
    env.update(extra)
    return env


def _landing(settings_home: Path, n: int = 20) -> None:
    from bcc_pipeline.demo_data import generate

    generate(settings_home / "landing", benign=n, malignant=n, size=64, seed=5)


def _inbox(settings_home: Path, n: int = 6) -> int:
    from bcc_pipeline.demo_data import generate

    out = generate(settings_home / "inbox" / "batch1", benign=n, malignant=n, size=64, seed=11)
    # flatten benign/ malignant/ names: the inbox is unlabelled, nesting is arbitrary
    return len(out["files"])


def _predictions(url: str) -> int:
    from bcc_pipeline.store import Prediction, session_scope

    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(Prediction))


def _retrain_short_circuit(env_factory, tmp_path: Path, bcc_url: str) -> tuple[dict[str, str], str]:
    """A run with too few new images skips training (and stays green). Returns (env, champion)."""
    home = tmp_path / "bcc"
    champion = register_tiny_champion(bcc_url, home / "models")
    env = env_factory(_bcc_env(home, bcc_url, BCC_GATE_MIN_ACCURACY="1.0", BCC_GATE_MIN_SENSITIVITY="1.0"))
    migrate(env)
    _landing(home, n=4)  # 8 new images < min_new_images
    states = dags_test(env, "bcc_retrain", {"profile": "demo", "epochs": 1, "min_new_images": 20})
    assert states["__run__"] == "success"
    assert states["intake"] == "success" and states["check_new_data"] == "success"
    assert all(
        states[t] == "skipped"
        for t in (
            "split",
            "train",
            "evaluate",
            "gate",
            "needs_approval",
            "approve",
            "approved",
            "record_decision",
            "publish_champion",
        )
    )
    assert "skipping training: 8 < min_new_images=20" in states["__log__"]
    return env, champion


def _retrain_short_circuit_then_reject(env_factory, tmp_path: Path, bcc_url: str) -> None:
    home = tmp_path / "bcc"
    env, champion = _retrain_short_circuit(env_factory, tmp_path, bcc_url)

    _landing(home, n=16)
    states = dags_test(env, "bcc_retrain", {"profile": "demo", "epochs": 1, "min_new_images": 20})
    assert states["__run__"] == "success", states["__log__"][-5000:]
    assert [states[t] for t in ("split", "train", "evaluate", "gate")] == ["success"] * 4
    assert states["publish_champion"] == "skipped"  # rejected: no Asset event, champion unchanged
    from bcc_pipeline import registry
    from bcc_pipeline.store import ModelVersion, session_scope

    with session_scope(bcc_url) as s:
        assert registry.get_champion(s).version == champion
        rejected = s.scalars(select(ModelVersion).where(ModelVersion.status == "rejected")).all()
        assert len(rejected) == 1
    assert "was rejected" in states["__log__"] and f"the champion stays {champion}" in states["__log__"]


def _retrain_promotes(env_factory, tmp_path: Path, bcc_url: str) -> None:
    """The DAG trains, evaluates, gates and promotes a DenseNet over the tiny champion; then the `bcc`
    CLI's registry commands (models, rollback, promote) on the same database."""
    home = tmp_path / "bcc"
    champion = register_tiny_champion(bcc_url, home / "models")
    env = env_factory(
        _bcc_env(
            home, bcc_url, BCC_GATE_MIN_ACCURACY="0", BCC_GATE_MIN_SENSITIVITY="0", BCC_GATE_MARGIN="0.99"
        )
    )
    migrate(env)
    _landing(home, n=10)
    # a frozen holdout big enough for the statistical gate to decide (64-px tiles score in seconds)
    from bcc_pipeline import dataset
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.demo_data import generate

    generate(tmp_path / "holdout-tiles", benign=20, malignant=20, size=64, seed=9, groups=8)
    settings = load_settings(profile="demo", env=_bcc_env(home, bcc_url))
    dataset.extend_holdout(settings, tmp_path / "holdout-tiles", actor="pytest", reason="a decidable holdout")
    states = dags_test(env, "bcc_retrain", {"profile": "demo", "epochs": 1, "min_new_images": 0})
    assert states["__run__"] == "success", states["__log__"][-5000:]
    assert states["publish_champion"] == "success", states["__log__"][-5000:]
    from bcc_pipeline import registry
    from bcc_pipeline.store import Promotion, session_scope

    with session_scope(bcc_url) as s:
        new = registry.get_champion(s).version
        assert new != champion
        row = s.scalars(select(Promotion).where(Promotion.to_version == new)).one()
        assert row.from_version == champion and row.actor.startswith("airflow:bcc_retrain/")
        assert row.evidence["champion"] is not None  # the tiny champion was re-scored on the same images
    from bcc_pipeline.validation import validations_here

    # fp32 Keras validated at promotion and recorded on PostgreSQL
    assert [(r["backend"], r["validated"]) for r in validations_here(settings, new)] == [("keras", True)]

    # the `bcc` CLI's registry commands on this PostgreSQL database (as test_cli_e2e.py does on SQLite)
    cli = bcc_cli_env(_bcc_env(home, bcc_url))
    check_trained_model_dir(home / "models" / new)
    models = bcc_json(cli, "models")
    assert {m["version"]: m["status"] for m in models} == {new: "champion", champion: "retired"}
    check_listed_validation(next(m for m in models if m["version"] == new))
    check_rollback_and_promote(cli, new, champion)


def _score_twice(env_factory, tmp_path: Path, bcc_url: str) -> None:
    home = tmp_path / "bcc"
    register_tiny_champion(bcc_url, home / "models")
    env = env_factory(_bcc_env(home, bcc_url))
    migrate(env)
    n = _inbox(home)
    states = dags_test(env, "bcc_score", {"shards": 2, "batch_size": 4})
    assert states["__run__"] == "success", states["__log__"][-5000:]
    assert states["score_shard[0]"] == "success" and states["score_shard[1]"] == "success"
    assert _predictions(bcc_url) == n
    archived = [p for p in (home / "archive").rglob("*.png")]
    assert len(archived) == n and not [p for p in (home / "inbox").rglob("*.png")]
    # a second run finds an empty inbox and adds nothing
    states = dags_test(env, "bcc_score", {"shards": 2})
    assert states["__run__"] == "success" and _predictions(bcc_url) == n


def test_retrain_dag_skips_training_without_enough_new_images(tmp_path):
    """prepare_database → intake → check_new_data (should_retrain) on the tiny champion: no training."""
    url = f"sqlite:///{tmp_path / 'bcc.db'}"
    af_db = f"sqlite:///{tmp_path / 'airflow.db'}"
    _retrain_short_circuit(
        lambda bcc: airflow_env(tmp_path / "af", metadata_url=af_db, bcc=bcc), tmp_path, url
    )


@pytest.mark.slow
def test_retrain_dag_sqlite_short_circuit_then_gate_rejection(tmp_path):
    url = f"sqlite:///{tmp_path / 'bcc.db'}"
    af_db = f"sqlite:///{tmp_path / 'airflow.db'}"
    _retrain_short_circuit_then_reject(
        lambda bcc: airflow_env(tmp_path / "af", metadata_url=af_db, bcc=bcc), tmp_path, url
    )


@pytest.mark.slow
@pytest.mark.postgres
def test_retrain_dag_postgres_promotes(tmp_path, pg_url, airflow_pg_url):
    _retrain_promotes(
        lambda bcc: airflow_env(tmp_path / "af", metadata_url=airflow_pg_url, bcc=bcc), tmp_path, pg_url
    )


def test_score_dag_fails_when_a_shard_fails_and_loses_nothing(tmp_path):
    """A tampered champion artifact fails every shard; finalize records the counts and fails the run
    (a green run would hide it), and every inbox file is still there."""
    url = f"sqlite:///{tmp_path / 'bcc.db'}"
    home = tmp_path / "bcc"
    register_tiny_champion(url, home / "models")
    with open(home / "models" / "vtiny-champion" / "model.keras", "ab") as fh:
        fh.write(b"tampered")
    env = airflow_env(
        tmp_path / "af", metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}", bcc=_bcc_env(home, url)
    )
    migrate(env)
    n = _inbox(home, n=2)
    states = dags_test(env, "bcc_score", {"shards": 2})
    assert states["__run__"] == "failed"
    assert states["score_shard[0]"] == "failed" and states["finalize"] == "failed"
    assert "shards finished" in states["__log__"] and "sha256" in states["__log__"]
    assert _predictions(url) == 0 and len(list((home / "inbox").rglob("*.png"))) == n


def test_score_dag_refuses_an_inbox_outside_the_allowed_roots(tmp_path):
    """The DAG's ``inbox`` Param pointed at a folder outside BCC_INBOX_ROOTS: plan fails at once (no retry),
    with one line that says why, and nothing there is touched."""
    url = f"sqlite:///{tmp_path / 'bcc.db'}"
    home = tmp_path / "bcc"
    register_tiny_champion(url, home / "models")
    system = tmp_path / "usr" / "share"
    system.mkdir(parents=True)
    write_png(system / "icon.png")
    env = airflow_env(
        tmp_path / "af", metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}", bcc=_bcc_env(home, url)
    )
    migrate(env)
    states = dags_test(env, "bcc_score", {"shards": 1, "inbox": str(tmp_path / "usr")})
    assert states["__run__"] == "failed" and states["plan"] == "failed" and states["finalize"] == "failed"
    assert "refusing to score the inbox" in states["__log__"] and "BCC_INBOX_ROOTS" in states["__log__"]
    assert "up_for_retry" not in states["__log__"]  # neither plan nor finalize is retried
    assert (system / "icon.png").exists() and _predictions(url) == 0


def test_a_database_url_whose_driver_is_missing_fails_at_once_and_says_which_to_use(tmp_path):
    """Round 27: `postgresql://` asks SQLAlchemy for psycopg (3), which is not installed: the task said only
    "No module named 'psycopg'" and was retried twice. It fails at once now, naming the driver to use, the
    password masked."""
    home = tmp_path / "bcc"
    env = airflow_env(
        tmp_path / "af",
        metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}",
        bcc=_bcc_env(home, "postgresql://bcc:hunter2@127.0.0.1:1/bcc"),
    )
    migrate(env)
    states = dags_test(env, "bcc_score", {"shards": 1})
    assert states["__run__"] == "failed" and states["prepare_database"] == "failed"
    assert "postgresql+psycopg2://" in states["__log__"] and "hunter2" not in states["__log__"]
    assert "up_for_retry" not in states["__log__"]


def test_score_dag_turns_red_when_a_move_keeps_failing(tmp_path):
    """Files that cannot be archived: the first run reports them (green, ``move_failed``); when the next
    run cannot move them either, its finalize fails and names them. They stay in the inbox."""
    url = f"sqlite:///{tmp_path / 'bcc.db'}"
    home = tmp_path / "bcc"
    register_tiny_champion(url, home / "models")
    env = airflow_env(
        tmp_path / "af", metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}", bcc=_bcc_env(home, url)
    )
    migrate(env)
    n = _inbox(home, n=1)
    (home / "archive").write_text("a file where the archive folder should be")
    first = dags_test(env, "bcc_score", {"shards": 1})
    assert first["__run__"] == "success" and _predictions(url) == n
    second = dags_test(env, "bcc_score", {"shards": 1})
    assert second["__run__"] == "failed" and second["finalize"] == "failed"
    assert "could not be moved in more than one run" in second["__log__"] and "batch1/" in second["__log__"]
    assert len(list((home / "inbox").rglob("*.png"))) == n


def test_retrain_dag_intake_turns_red_when_a_quarantine_move_keeps_failing(tmp_path):
    """A rejected landing file that cannot be quarantined: the first run reports it (green,
    ``move_failed``); when the next run cannot move it either, intake fails, names it, and is not
    retried. The file stays in landing."""
    url = f"sqlite:///{tmp_path / 'bcc.db'}"
    home = tmp_path / "bcc"
    register_tiny_champion(url, home / "models")
    env = airflow_env(
        tmp_path / "af", metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}", bcc=_bcc_env(home, url)
    )
    migrate(env)
    (home / "landing" / "benign").mkdir(parents=True)
    (home / "landing" / "benign" / "bad.png").write_bytes(b"not an image at all")
    (home / "quarantine").write_text("a file where the quarantine folder should be")
    params = {"profile": "demo", "epochs": 1, "min_new_images": 20}
    first = dags_test(env, "bcc_retrain", params)
    assert first["__run__"] == "success" and first["intake"] == "success"
    assert "1 could not be quarantined" in first["__log__"]
    second = dags_test(env, "bcc_retrain", params)
    assert second["__run__"] == "failed" and second["intake"] == "failed"
    assert "could not be quarantined in more than one attempt" in second["__log__"]
    assert "benign/bad.png" in second["__log__"] and "up_for_retry" not in second["__log__"]
    assert (home / "landing" / "benign" / "bad.png").exists()


def test_score_dag_without_champion_skips(tmp_path):
    url = f"sqlite:///{tmp_path / 'bcc.db'}"
    home = tmp_path / "bcc"
    env = airflow_env(
        tmp_path / "af", metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}", bcc=_bcc_env(home, url)
    )
    migrate(env)
    states = dags_test(env, "bcc_score", {"shards": 1})
    assert states["__run__"] == "success"
    assert states["plan"] == "skipped" and states["finalize"] == "skipped"
    assert "run bcc_retrain first" in states["__log__"]


def test_score_dag_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'bcc.db'}"
    af_db = f"sqlite:///{tmp_path / 'airflow.db'}"
    _score_twice(lambda bcc: airflow_env(tmp_path / "af", metadata_url=af_db, bcc=bcc), tmp_path, url)


@pytest.mark.postgres
def test_score_dag_postgres(tmp_path, pg_url, airflow_pg_url):
    _score_twice(
        lambda bcc: airflow_env(tmp_path / "af", metadata_url=airflow_pg_url, bcc=bcc), tmp_path, pg_url
    )


def test_database_comes_from_the_bcc_db_connection(tmp_path):
    """Without BCC_DATABASE_URL the tasks use the Airflow connection `bcc_db`."""
    url = f"sqlite:///{tmp_path / 'from-conn.db'}"
    code = (
        f"import sys; sys.path.insert(0, {str(DAGS)!r})\n"
        "import bcc_common\n"
        "print(bcc_common.settings().database_url)\n"
    )
    got = _python(
        code,
        {
            "AIRFLOW_CONN_BCC_DB": json.dumps(
                {"conn_type": "sqlite", "host": str(tmp_path / "from-conn.db")}
            ),
            "BCC_HOME": str(tmp_path),
        },
        tmp_path,
    )
    assert got == url
    pg = _python(
        code,
        {
            "AIRFLOW_CONN_BCC_DB": "postgresql://u:p%40ss@db.example:5433/bcc?sslmode=require",
            "BCC_HOME": str(tmp_path),
        },
        tmp_path,
    )
    assert pg == "postgresql+psycopg2://u:p%40ss@db.example:5433/bcc?sslmode=require"
    wins = _python(
        code,
        {"AIRFLOW_CONN_BCC_DB": "postgresql://u@h/bcc", "BCC_DATABASE_URL": url, "BCC_HOME": str(tmp_path)},
        tmp_path,
    )
    assert wins == url
    default = _python(code, {"BCC_HOME": str(tmp_path)}, tmp_path)
    assert default == f"sqlite:///{tmp_path / 'bcc.db'}"


assert REPO.is_dir()

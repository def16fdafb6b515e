"""The BCC pages in a real browser: Debian's Chromium driven by Selenium against `airflow api-server` on
loopback, with the plugin loaded from plugins/ and real scored data (a tiny champion scoring generated
H&E-like tiles, a second version promoted by the quality gate, real evaluation plots).

The browser logs in through the Airflow login page, lands on the BCC predictions page, filters, opens
the models page and sees the plots, and downloads the CSV. Screenshots go to the test's tmp folder
(printed; ``pytest -s`` shows where).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .airflow_support import (
    Services,
    airflow_env,
    api_server_args,
    evaluate_version,
    free_port,
    jwt_token,
    migrate,
    register_tiny_champion,
    rest,
)
from .test_plugin_routes import FILES, PAGES

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
PATIENT_FOLDER = "patient_0042"  # a filter value that must never reach the api-server's log

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver; .ci/run installs them)",
    ),
]


def _scored_home(tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A BCC home with two model versions, two scoring runs and a few rejected, waiting and
    still-being-written files. Returns (BCC environment, facts for the assertions)."""
    from sqlalchemy import update

    from bcc_pipeline import registry
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.demo_data import generate
    from bcc_pipeline.scoring import score_inbox
    from bcc_pipeline.store import ModelVersion, session_scope

    home = tmp_path / "bcc"
    env = {"BCC_HOME": str(home), "BCC_DATABASE_URL": f"sqlite:///{tmp_path / 'bcc.db'}"}
    s = load_settings(env=env, overrides={"settle_seconds": 0, "inference": "keras"})
    v1 = register_tiny_champion(
        s.database_url, s.models_dir, version="v20261120-080000-a1b2c3", threshold=0.45
    )
    evaluate_version(s.database_url, v1, s.models_dir / v1 / "plots", seed=1, noise=0.3)
    generate(s.inbox_dir / "patient_0007", benign=2, malignant=2, size=64, seed=3)
    score_inbox(s)
    v2 = register_tiny_champion(
        s.database_url, s.models_dir, version="v20261127-080000-d4e5f6", threshold=0.465, status="candidate"
    )
    metrics = evaluate_version(s.database_url, v2, s.models_dir / v2 / "plots", seed=4, noise=0.22)
    import numpy as np

    from bcc_pipeline import stats

    # the two tiny versions give the same calls on a synthetic holdout: clearly non-inferior
    y = np.arange(60) % 2
    p = np.clip(0.465 + (y - 0.5) * 0.6, 0.0, 1.0)
    diffs = stats.paired_differences(y, p, 0.465, p, 0.465, seed=s.seed)
    with session_scope(s.database_url) as db:
        champ = registry.metrics_of(db, v1)
        decision = registry.evaluate_gate(
            metrics,
            champ,
            min_accuracy=s.gate_min_accuracy,
            min_sensitivity=s.gate_min_sensitivity,
            margin=s.gate_margin,
            differences=diffs,
            champion_version=v1,
        )
        registry.record_gate_decision(db, v2, decision, actor="bcc_retrain")
        assert db.get(ModelVersion, v2).status == "champion", decision.summary
    generate(s.inbox_dir / PATIENT_FOLDER, benign=3, malignant=3, size=64, seed=4)
    (s.inbox_dir / PATIENT_FOLDER / "scan_export.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    score_inbox(s)
    # the inbox page: one file waiting, one still being written (the api-server runs with a 10 min settle time)
    generate(s.inbox_dir / "patient_0099", benign=1, malignant=0, size=64, seed=5)
    waiting = next((s.inbox_dir / "patient_0099").rglob("*.png"))
    os.utime(waiting, (time.time() - 3600, time.time() - 3600))
    generate(s.inbox_dir / "patient_0100", benign=0, malignant=1, size=64, seed=6)
    with session_scope(s.database_url) as db:  # the display order of versions does not depend on this
        db.execute(update(ModelVersion).where(ModelVersion.version == v1).values(n_train=180, n_val=46))
        db.execute(update(ModelVersion).where(ModelVersion.version == v2).values(n_train=191, n_val=48))
    return env, {"v1": v1, "v2": v2, "db": s.database_url}


def _chrome(tmp_path: Path, downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
        "--window-size=1440,1000",
    ):
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(
        options=opts, service=Service(CHROMEDRIVER, log_output=str(tmp_path / "driver.log"))
    )
    driver.set_page_load_timeout(120)
    return driver


def _shot(driver, folder: Path, name: str, *, full: bool = True) -> Path:
    """A screenshot of the whole page (the window grows to the page's height)."""
    if full:
        for _ in range(3):  # resizing can reflow the page: measure again until it fits
            height = driver.execute_script("return Math.max(document.documentElement.scrollHeight, 800)")
            driver.set_window_size(1440, min(int(height) + 120, 6000))
            time.sleep(0.3)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1440, 1000)
    return path


def _loaded(driver, css: str) -> list[int]:
    """naturalWidth of each image matching ``css`` (0: not loaded)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(i => i.complete ? i.naturalWidth : 0)",
        css,
    )


def test_login_filter_models_and_csv_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    bcc_env, facts = _scored_home(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    af_home = tmp_path / "af"
    af_home.mkdir()
    (af_home / "passwords.json").write_text(json.dumps({"admin": "test-pass"}))
    env = airflow_env(
        af_home,
        metadata_url=f"sqlite:///{tmp_path / 'airflow.db'}",
        bcc=bcc_env | {"BCC_SETTLE_SECONDS": "600"},
    )
    env.update(
        {
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API_AUTH__JWT_SECRET": "bcc-browser-test-secret-not-for-production",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(af_home / "passwords.json"),
        }
    )
    migrate(env)
    shots = tmp_path / "screenshots"
    downloads = tmp_path / "downloads"
    shots.mkdir()
    downloads.mkdir()
    print(f"\nscreenshots: {shots}")
    services = Services(tmp_path)
    driver = None
    try:
        services.start("api-server", api_server_args(port), env)
        services.wait_for(
            lambda: rest("GET", f"{base}/api/v2/monitor/health")[0] == 200, 240, "the api-server"
        )
        services.assert_loopback_only({"api-server": port})  # the api-server listens on loopback only
        # the plugin is loaded and every route of it is behind login (what `curl` without a token gets)
        token = jwt_token(base, "admin", "test-pass")
        status, rows = rest("GET", f"{base}/bcc/api/predictions?limit=1", token)
        assert status == 200 and rows
        for route in PAGES + FILES:
            url = base + route.format(sha=rows[0]["sha256"], version=facts["v2"])
            for method in ("GET", "HEAD", "POST", "DELETE"):
                assert rest(method, url)[0] == 401, (method, url)
        assert rest("GET", f"{base}/bcc")[0] == 401  # not the Airflow UI's catch-all page
        assert rest("GET", f"{base}/bcc/no/such/page")[0] == 401
        assert rest("POST", f"{base}/bcc/api/predictions", token, {"label": "benign"})[0] == 405
        status, plugins = rest("GET", f"{base}/api/v2/plugins", token)
        assert status == 200 and any(p["name"] == "bcc" and p["external_views"] for p in plugins["plugins"])
        status, api_models = rest("GET", f"{base}/bcc/api/models", token)
        assert status == 200 and api_models["models"][0]["version"] == facts["v2"]
        # with a token from /auth/token, the JSON is what `bcc predictions --format json` prints
        cli = subprocess.run(
            [str(Path(sys.executable).with_name("bcc")), "predictions", "--format", "json"],
            env={k: v for k, v in os.environ.items() if not k.startswith("BCC_")} | bcc_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        status, served = rest("GET", f"{base}/bcc/api/predictions", token)
        assert status == 200 and served == json.loads(cli.stdout) and len(served) == 10

        driver = _chrome(tmp_path, downloads)
        wait = WebDriverWait(driver, 90)
        driver.get(f"{base}/bcc/predictions")  # not logged in: Airflow's login page, then back here
        user = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "input[name='username']")))
        assert "/auth/login" in driver.current_url
        user.send_keys("admin")
        driver.find_element(By.CSS_SELECTOR, "input[type='password']").send_keys("test-pass")
        _shot(driver, shots, "01-airflow-login", full=False)
        driver.find_element(By.CSS_SELECTOR, "button[type='submit']").click()
        wait.until(ec.url_contains("/bcc/predictions"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table tbody tr")))
        assert "signed in as admin" in driver.find_element(By.TAG_NAME, "header").text
        rows = driver.find_elements(By.CSS_SELECTOR, "table tbody tr")
        assert len(rows) == 10  # 4 + 6 tiles scored; the truncated file was quarantined
        wait.until(lambda d: all(_loaded(d, "img.thumb")) and len(_loaded(d, "img.thumb")) == 10)
        _shot(driver, shots, "02-predictions")

        # filter: one patient's folder, newest model only, most malignant first
        box = driver.find_element(By.NAME, "path")
        box.clear()
        box.send_keys(PATIENT_FOLDER)
        Select(driver.find_element(By.NAME, "model_version")).select_by_value(facts["v2"])
        Select(driver.find_element(By.NAME, "sort")).select_by_value("-prob_malignant")
        driver.find_element(By.CSS_SELECTOR, "form.filters button[type='submit']").click()
        wait.until(ec.url_contains("model_version="))
        rows = driver.find_elements(By.CSS_SELECTOR, "table tbody tr")
        assert len(rows) == 6 and all(PATIENT_FOLDER in r.text and facts["v2"] in r.text for r in rows)
        probs = [float(r.find_element(By.CSS_SELECTOR, "td.num strong").text) for r in rows]
        assert probs == sorted(probs, reverse=True)
        assert "6 predictions" in driver.page_source
        assert all("frozen holdout (95% intervals): sensitivity" in r.text for r in rows)
        _shot(driver, shots, "03-predictions-filtered")

        # what did the model say about this image, with which model, how good is it: one click
        first_file = rows[0].find_element(By.CSS_SELECTOR, "td strong").text
        rows[0].find_element(By.LINK_TEXT, facts["v2"]).click()
        wait.until(ec.url_contains(f"/bcc/models/{facts['v2']}"))
        main = driver.find_element(By.TAG_NAME, "main").text
        assert "Frozen holdout, 95% intervals: sensitivity" in main and "champion" in main
        assert f"Model card: {facts['v2']}" in main and "passed the quality gate" in main
        _shot(driver, shots, "04-model-of-a-prediction")
        driver.back()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table tbody tr")))
        assert first_file in driver.find_element(By.CSS_SELECTOR, "table tbody tr").text

        # the CSV of the filtered set
        driver.find_element(By.PARTIAL_LINK_TEXT, "Download CSV").click()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not [p for p in downloads.glob("*.csv")]:
            time.sleep(0.5)
        files = list(downloads.glob("*.csv"))
        assert files, f"no CSV downloaded into {downloads}"
        with open(files[0], newline="") as fh:
            got = list(csv.DictReader(fh))
        status, want = rest(
            "GET",
            f"{base}/bcc/api/predictions?path={PATIENT_FOLDER}&model_version={facts['v2']}"
            "&sort=-prob_malignant",
            token,
        )
        assert status == 200 and len(got) == len(want) == 6
        assert got == [{k: str(v) for k, v in row.items()} for row in want]

        # the models page: champion first, its metrics and its four plots (reliability too), loaded
        driver.find_element(By.LINK_TEXT, "Models").click()
        wait.until(ec.presence_of_element_located((By.ID, f"v-{facts['v2']}")))
        sections = driver.find_elements(By.CSS_SELECTOR, "section.card")
        assert sections[0].get_attribute("id") == f"v-{facts['v2']}" and "champion" in sections[0].text
        assert "holdout" in sections[0].text and "roc auc" in sections[0].text.lower()
        plots = f"#v-{facts['v2']} .plots img"
        wait.until(lambda d: len(_loaded(d, plots)) == 4 and all(w > 100 for w in _loaded(d, plots)))
        assert "passed the quality gate" in driver.page_source
        _shot(driver, shots, "05-models")

        driver.find_element(By.LINK_TEXT, "Scoring runs").click()
        wait.until(ec.presence_of_element_located((By.ID, "rejections")))
        assert "scan_export.png" in driver.page_source
        _shot(driver, shots, "06-runs")
        driver.find_element(By.LINK_TEXT, "Inbox").click()
        wait.until(ec.presence_of_element_located((By.TAG_NAME, "h1")))
        text = driver.find_element(By.TAG_NAME, "main").text
        assert (
            "1 waiting to be scored" in text and "1 still being written" in text and "scan_export.png" in text
        )
        _shot(driver, shots, "07-inbox")

        # the Airflow UI's own navigation lists the BCC entry, which shows the pages inside Airflow
        driver.get(f"{base}/plugin/bcc")
        wait.until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
        time.sleep(3)
        _shot(driver, shots, "08-inside-airflow", full=False)
        assert "BCC" in driver.find_element(By.TAG_NAME, "body").text
        driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table tbody tr")))
        assert "signed in as admin" in driver.find_element(By.TAG_NAME, "header").text
        driver.switch_to.default_content()
    except BaseException:
        if driver is not None:  # what the browser showed when it failed
            try:
                _shot(driver, shots, "99-failure", full=False)
            except Exception:  # noqa: BLE001 - the failure itself is what matters
                pass
        raise
    finally:
        if driver is not None:
            driver.quit()
        services.stop_all()
    log = services.logs["api-server"].read_text(errors="replace")
    assert "/bcc/predictions" in log  # the access log is on ...
    assert PATIENT_FOLDER not in log  # ... but never shows what was searched for

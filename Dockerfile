# The BCC pipeline on the official Airflow image: Airflow 3.3.2 on Python 3.11, plus this package,
# its DAGs and the Celery executor. One image for every Airflow service in docker-compose.yaml.
#
#   docker compose build                 (or: docker build -t bcc-pipeline-airflow .)
#   docker build --build-arg TENSORFLOW_EXTRA=and-cuda -t bcc-pipeline-airflow:latest-gpu .
#
# Pinning. Airflow's constraints file pins Airflow's own dependency tree, but not TensorFlow,
# OpenVINO or this package's other libraries, and it cannot be combined with them without
# conflicts; so the image uses the official image's documented pattern instead: pin
# apache-airflow to the image's own version (pip then may not up- or downgrade Airflow while
# resolving our dependencies) and pin explicitly the packages whose versions matter here:
#  - apache-airflow-providers-celery 3.26.0 with celery[redis] 5.6.3: celery 5.7.0 breaks the
#    executor ("cannot import name 'retry' from 'celery.backends.database'"); pyproject.toml's
#    `celery` extra keeps celery below 5.7 as well;
#  - asyncpg: Airflow 3 opens an async engine (postgresql+asyncpg) on a PostgreSQL metadata
#    database, and every airflow command fails without it.
# This package's other dependencies are bounded by pyproject.toml. The last step imports the
# executor, the async driver and this package, so a broken resolution fails the build, not a task.
FROM apache/airflow:3.3.2-python3.11

# "" for the CPU build; "and-cuda" adds TensorFlow's CUDA libraries (the GPU worker's image)
ARG TENSORFLOW_EXTRA=""
ARG CELERY_PROVIDER_VERSION=3.26.0
ARG CELERY_VERSION=5.6.3
ARG ASYNCPG_VERSION=0.32.0

USER airflow
COPY --chown=airflow:root pyproject.toml README.md /opt/bcc-src/
COPY --chown=airflow:root bcc_pipeline /opt/bcc-src/bcc_pipeline
RUN pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        "/opt/bcc-src[celery]" \
        "apache-airflow-providers-celery==${CELERY_PROVIDER_VERSION}" \
        "celery[redis]==${CELERY_VERSION}" \
        "asyncpg==${ASYNCPG_VERSION}" \
    && if [ -n "${TENSORFLOW_EXTRA}" ]; then \
         tf_version="$(python -c 'import importlib.metadata as m; print(m.version("tensorflow"))')" \
         && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
              "tensorflow[${TENSORFLOW_EXTRA}]==${tf_version}"; \
       fi \
    && python -c "import airflow.providers.celery.executors.celery_executor, asyncpg, cv2, bcc_pipeline.cli"

# The DAGs are part of the image, so every scheduler, dag-processor and worker runs the same code; the
# plugin (the BCC pages of the api-server: plugins/bcc_plugin.py and plugins/bcc_templates/) goes to
# Airflow's plugins folder (AIRFLOW__CORE__PLUGINS_FOLDER in docker-compose.yaml).
COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/

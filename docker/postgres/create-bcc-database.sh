#!/usr/bin/env bash
# Runs once, when the postgres service starts on an empty data volume: creates the project's own
# role and database (BCC_DB_USER / BCC_DB_PASSWORD / BCC_DB_NAME), separate from Airflow's
# metadata database. With BCC_DB_HOST or BCC_DATABASE_URL pointing at another server this database
# stays unused.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v bcc_user="$BCC_DB_USER" -v bcc_password="$BCC_DB_PASSWORD" -v bcc_db="$BCC_DB_NAME" <<'SQL'
CREATE ROLE :"bcc_user" LOGIN PASSWORD :'bcc_password';
CREATE DATABASE :"bcc_db" OWNER :"bcc_user";
SQL

#!/usr/bin/env bash
# compose.yaml's PostgreSQL, first start only (/docker-entrypoint-initdb.d): the same roles as
# infra/postgres.sh (docs/database-roles.md). The image's POSTGRES_USER is a superuser used for
# this script alone; `mpesa` owns the schema and runs the migrations; each service logs in as its
# own role, a member of the NOLOGIN group that migrations/0009_roles.sql grants to. Passwords come
# from the environment and travel on psql's stdin.
set -euo pipefail
declare -A GROUP_OF=([ingress]=mpesa_ingress [stk_worker]=mpesa_stk_worker [ledger]=mpesa_ledger
                     [onboarding]=mpesa_onboarding [auditor]=mpesa_auditor [notifier]=mpesa_notifier
                     [privacy]=mpesa_privacy)
password() {
  local v="${1^^}_DB_PASSWORD"
  [[ ${!v:-} =~ ^[A-Za-z0-9_-]{16,}$ ]] || { echo "set $v: 16 or more letters, digits, - or _" >&2; exit 1; }
  printf '%s' "${!v}"
}

sql="\\set pw '$(password mpesa)'
CREATE ROLE mpesa LOGIN PASSWORD :'pw';
CREATE DATABASE mpesa OWNER mpesa;
"
for role in "${!GROUP_OF[@]}"; do
  sql+="CREATE ROLE ${GROUP_OF[$role]} NOLOGIN;
\\set pw '$(password "$role")'
CREATE ROLE $role LOGIN IN ROLE ${GROUP_OF[$role]} PASSWORD :'pw';
"
done
psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname postgres <<<"$sql"

#!/usr/bin/env bash
# The shared MLflow tracking server: basic auth on, bound to a private address, metadata in PostgreSQL,
# artifacts proxied to S3 (clients need no S3 credentials, only their MLflow user).
#
# Production (see infra/README.md, "MLflow server"):
#   pip install 'crema[server]'                       # mlflow + psycopg + boto3
#   MLFLOW_HOST=10.0.1.20 MLFLOW_SERVER_NAME=mlflow.internal.example.org \
#   MLFLOW_DB_URI_FILE=/etc/crema/mlflow-db-uri       # postgresql+psycopg://mlflow:...@db:5432/mlflow
#   MLFLOW_AUTH_DB_URI_FILE=/etc/crema/mlflow-auth-db-uri   # postgresql+psycopg://.../mlflow_auth
#   MLFLOW_ARTIFACTS=s3://crema-mlflow/artifacts \
#   MLFLOW_ADMIN_PASSWORD_FILE=/etc/crema/mlflow-admin-password \
#     infra/mlflow-server.sh
#
# Local variant (what tests/ops/test_mlflow_server.py starts): SQLite + an S3 API server on loopback:
#   MLFLOW_DB_URI=sqlite:////tmp/m/mlflow.db MLFLOW_ARTIFACTS=s3://bucket/mlflow MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 \
#   MLFLOW_ADMIN_PASSWORD_FILE=/tmp/m/admin-password infra/mlflow-server.sh
#
# Settings (environment):
#   MLFLOW_DB_URI | MLFLOW_DB_URI_FILE    tracking store (postgresql+psycopg://... or sqlite:///...); the _FILE form
#                                         keeps the database password out of the process list and environment
#   MLFLOW_AUTH_DB_URI | _FILE            user/permission store (default: sqlite in MLFLOW_STATE_DIR)
#   MLFLOW_ARTIFACTS                      s3://bucket/prefix (or a folder) the server proxies artifacts to
#   MLFLOW_ADMIN_PASSWORD_FILE            file holding the admin password (required; read once, never exported)
#   MLFLOW_ADMIN_USERNAME                 default admin
#   MLFLOW_DEFAULT_PERMISSION             what a signed-in user may do on others' experiments: READ (default),
#                                         EDIT, MANAGE or NO_PERMISSIONS. Anonymous requests always get 401.
#   MLFLOW_SECRET_KEY_FILE                Flask secret (CSRF); default: a fresh random one per start
#   MLFLOW_HOST                           address to bind; default 127.0.0.1. 0.0.0.0/:: are refused unless
#                                         MLFLOW_BIND_ALL_INTERFACES=1 (put it behind a private load balancer then)
#   MLFLOW_PORT                           default 5000
#   MLFLOW_SERVER_NAME                    DNS name(s) clients use, comma-separated; added to --allowed-hosts
#   MLFLOW_ALLOWED_HOSTS                  full --allowed-hosts list (overrides the computed one)
#   MLFLOW_WORKERS                        default 4
#   MLFLOW_STATE_DIR                      private folder for the generated auth config; default ~/.crema-mlflow
set -euo pipefail

die() { echo "mlflow-server: $*" >&2; exit 2; }

read_secret() {  # read_secret NAME: $NAME, or the content of the file named by ${NAME}_FILE
  local name=$1 file_var="${1}_FILE"
  if [[ -n "${!file_var:-}" ]]; then
    [[ -r "${!file_var}" ]] || die "$file_var=${!file_var} is not a readable file"
    head -n1 -- "${!file_var}" | tr -d '\r\n'
  else
    printf '%s' "${!name:-}"
  fi
}

db_uri=$(read_secret MLFLOW_DB_URI)
[[ -n "$db_uri" ]] || die "set MLFLOW_DB_URI_FILE or MLFLOW_DB_URI (postgresql+psycopg://... or sqlite:///path/mlflow.db)"
artifacts=${MLFLOW_ARTIFACTS:-}
[[ -n "$artifacts" ]] || die "set MLFLOW_ARTIFACTS (s3://bucket/prefix)"
[[ -n "${MLFLOW_ADMIN_PASSWORD_FILE:-}" ]] || die "set MLFLOW_ADMIN_PASSWORD_FILE (a file holding the admin password)"
[[ -r "$MLFLOW_ADMIN_PASSWORD_FILE" ]] || die "MLFLOW_ADMIN_PASSWORD_FILE=$MLFLOW_ADMIN_PASSWORD_FILE is not readable"
admin_password=$(head -n1 -- "$MLFLOW_ADMIN_PASSWORD_FILE" | tr -d '\r\n')
(( ${#admin_password} >= 12 )) || die "the admin password in $MLFLOW_ADMIN_PASSWORD_FILE must have at least 12 characters"

host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
case "$host" in
  0.0.0.0|::|"[::]"|"*")
    [[ "${MLFLOW_BIND_ALL_INTERFACES:-0}" == 1 ]] || die "refusing to bind $host: set MLFLOW_HOST to a private address (or MLFLOW_BIND_ALL_INTERFACES=1 behind a private load balancer)";;
esac

allowed=${MLFLOW_ALLOWED_HOSTS:-}
if [[ -z "$allowed" ]]; then
  allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*"
  server_names=${MLFLOW_SERVER_NAME:-}
  for name in ${host} ${server_names//,/ }; do
    case "$name" in 0.0.0.0|::|"[::]"|127.0.0.1|localhost) ;; *) allowed+=",$name,$name:*";; esac
  done
fi

state=${MLFLOW_STATE_DIR:-$HOME/.crema-mlflow}
mkdir -p -- "$state"
chmod 700 -- "$state"
auth_db=$(read_secret MLFLOW_AUTH_DB_URI)
auth_db=${auth_db:-sqlite:///$state/basic_auth.db}

# The auth app reads its settings from an ini file (MLFLOW_AUTH_CONFIG_PATH); it holds the admin password
# (used only to create the admin on first start), so it is private to this user.
umask 077
ini="$state/basic_auth.ini"
cat > "$ini" <<INI
[mlflow]
default_permission = ${MLFLOW_DEFAULT_PERMISSION:-READ}
database_uri = ${auth_db//%/%%}
admin_username = ${MLFLOW_ADMIN_USERNAME:-admin}
admin_password = ${admin_password//%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
unset admin_password
export MLFLOW_AUTH_CONFIG_PATH="$ini"
unset MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_AUTH_ADMIN_USERNAME  # the ini is the one source

secret=$(read_secret MLFLOW_SECRET_KEY)
if [[ -z "$secret" ]]; then
  secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
fi
export MLFLOW_FLASK_SERVER_SECRET_KEY="$secret"
unset secret

# The tracking store URI goes through the environment, not argv, so `ps` does not show its password.
export MLFLOW_BACKEND_STORE_URI="$db_uri"
unset db_uri

echo "mlflow-server: http://$host:$port  auth=basic-auth  artifacts=$artifacts  allowed-hosts=$allowed" >&2
exec "${MLFLOW_BIN:-mlflow}" server \
  --app-name basic-auth \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "$host" --port "$port" \
  --allowed-hosts "$allowed" \
  --workers "${MLFLOW_WORKERS:-4}"

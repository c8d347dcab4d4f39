#!/usr/bin/env bash
# Create the Secrets the manifests reference (they never hold a secret themselves):
#   procrop-redis     password                  Redis (pods, KEDA's TriggerAuthentication)
#   procrop-s3        access-key, secret-key    S3 (ProCrop; dev: MinIO's root user too)
#   procrop-milvus    token                     Milvus "user:password" (optional)
#   procrop-api-keys  api-keys                  the gateway's PROCROP_API_KEYS
# and for prod, in procrop-data, what the Helm releases read (procrop-redis, procrop-minio-root,
# procrop-s3 for MinIO's procrop user).
# Values come from the environment (REDIS_PASSWORD, S3_SECRET_KEY, MILVUS_TOKEN, API_KEYS,
# MINIO_ROOT_PASSWORD); a value not given is drawn at random (hex, so it needs no URL quoting).
#   deploy/k8s/create-secrets.sh dev|prod [--dry-run]    (--dry-run prints the YAML instead)
set -euo pipefail
env_name="${1:?usage: create-secrets.sh dev|prod [--dry-run]}"
case "$env_name" in dev|prod) ;; *) echo "create-secrets.sh: dev or prod, not $env_name" >&2; exit 2 ;; esac
apply=(kubectl apply -f -)
[ "${2:-}" = "--dry-run" ] && apply=(cat)

random() { python3 -c 'import secrets; print(secrets.token_hex(24))'; }
REDIS_PASSWORD="${REDIS_PASSWORD:-$(random)}"
S3_ACCESS_KEY="${S3_ACCESS_KEY:-procrop}"
S3_SECRET_KEY="${S3_SECRET_KEY:-$(random)}"
API_KEYS="${API_KEYS:-$(random)}"

secret() {  # namespace name key=value...
  local namespace="$1" name="$2"; shift 2
  local args=()
  for pair in "$@"; do args+=(--from-literal="$pair"); done
  kubectl create secret generic "$name" --namespace "$namespace" "${args[@]}" \
    --dry-run=client -o yaml | "${apply[@]}"
  [ "${apply[0]}" = cat ] && echo "---"
  return 0
}

[ "${apply[0]}" = cat ] || kubectl create namespace procrop --dry-run=client -o yaml | kubectl apply -f -
secret procrop procrop-redis "password=$REDIS_PASSWORD"
secret procrop procrop-s3 "access-key=$S3_ACCESS_KEY" "secret-key=$S3_SECRET_KEY"
secret procrop procrop-api-keys "api-keys=$API_KEYS"
[ -n "${MILVUS_TOKEN:-}" ] && secret procrop procrop-milvus "token=$MILVUS_TOKEN"
if [ "$env_name" = prod ]; then
  [ "${apply[0]}" = cat ] || kubectl create namespace procrop-data --dry-run=client -o yaml | kubectl apply -f -
  secret procrop-data procrop-redis "password=$REDIS_PASSWORD"
  secret procrop-data procrop-minio-root "rootUser=root" "rootPassword=${MINIO_ROOT_PASSWORD:-$(random)}"
  secret procrop-data procrop-s3 "secret-key=$S3_SECRET_KEY"
fi
echo "create-secrets.sh: the gateway's API key is in Secret procrop-api-keys" >&2

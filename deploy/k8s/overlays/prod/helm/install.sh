#!/usr/bin/env bash
# Prod's backends and KEDA from their official Helm charts, at the versions named here (the
# values files beside this script). Run once per cluster, before `kubectl apply -k overlays/prod`;
# run deploy/k8s/create-secrets.sh prod first: the releases read their passwords from Secrets.
# Check for newer patch releases with `helm search repo NAME --versions` before upgrading.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

KEDA_CHART_VERSION=2.17.0      # kedacore/keda (KEDA 2.17; its CRDs: ../../../../../shared/schemas/keda)
REDIS_CHART_VERSION=20.6.0     # bitnami/redis (Redis 7.4)
MINIO_CHART_VERSION=5.4.0      # minio/minio, MinIO's own chart (charts.min.io)
MILVUS_CHART_VERSION=4.2.45    # zilliztech/milvus (Milvus 2.5.9; values pin the v2.5.10 image)

helm repo add kedacore https://kedacore.github.io/charts
helm repo add minio https://charts.min.io/
helm repo add zilliztech https://zilliztech.github.io/milvus-helm/
helm repo update

helm upgrade --install keda kedacore/keda --namespace keda --create-namespace \
  --version "$KEDA_CHART_VERSION" -f "$here/keda-values.yaml"
helm upgrade --install procrop-redis oci://registry-1.docker.io/bitnamicharts/redis \
  --namespace procrop-data --create-namespace --version "$REDIS_CHART_VERSION" -f "$here/redis-values.yaml"
helm upgrade --install procrop-minio minio/minio --namespace procrop-data \
  --version "$MINIO_CHART_VERSION" -f "$here/minio-values.yaml"
root() { kubectl -n procrop-data get secret procrop-minio-root -o "jsonpath={.data.$1}" | base64 -d; }
helm upgrade --install procrop-milvus zilliztech/milvus --namespace procrop-data \
  --version "$MILVUS_CHART_VERSION" -f "$here/milvus-values.yaml" \
  --set-string externalS3.accessKey="$(root rootUser)" --set-string externalS3.secretKey="$(root rootPassword)"

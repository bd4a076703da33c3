#!/usr/bin/env bash
# Once per AWS account, from your machine: the two instance profiles ray_cluster.yaml names.
#   gmwae-head:   the autoscaler's EC2 calls (terminate: this cluster's nodes only), passing
#                 the worker role and nothing else, and the study's bucket (MLflow's
#                 artifacts through the server, the trials' checkpoints);
#   gmwae-worker: the bucket's ray/ prefix (trial checkpoints), nothing else.
# Usage: bash cluster/aws/create_roles.sh BUCKET [CLUSTER_NAME]   (aws CLI, IAM rights)
set -euo pipefail
bucket=${1:?usage: bash cluster/aws/create_roles.sh BUCKET [CLUSTER_NAME]}
cluster=${2:-gmwae-studies}
here=$(cd "$(dirname "$0")" && pwd)
account=$(aws sts get-caller-identity --query Account --output text)
policy() {
    sed -e "s/BUCKET/$bucket/g" -e "s/ACCOUNT_ID/$account/g" -e "s/CLUSTER_NAME/$cluster/g" \
        "$here/$1-policy.json"
}
for role in gmwae-head gmwae-worker; do
    kind=${role#gmwae-}
    aws iam get-role --role-name "$role" >/dev/null 2>&1 ||
        aws iam create-role --role-name "$role" \
            --assume-role-policy-document "file://$here/trust-policy.json" >/dev/null
    aws iam put-role-policy --role-name "$role" --policy-name "$role" \
        --policy-document "$(policy "$kind")"
    if ! aws iam get-instance-profile --instance-profile-name "$role" >/dev/null 2>&1; then
        aws iam create-instance-profile --instance-profile-name "$role" >/dev/null
        aws iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role"
    fi
    echo "instance profile $role: $(policy "$kind" | tr -d ' \n' | head -c 80)..."
done

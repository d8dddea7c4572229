#!/usr/bin/env bash
# Build lambda/dist/cloudmail-lambda.zip: the handler alone (boto3 comes with the
# Lambda runtime, see requirements.txt). Deterministic: fixed timestamps and modes, so
# the same source gives the same bytes and CloudFormation sees no spurious change.
# Needs python3 (3.8+) and no network.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${here}/dist/cloudmail-lambda.zip"
mkdir -p "${here}/dist"

python3 - "${here}/lambda_handler.py" "${out}" <<'PY'
import sys
import zipfile

source, target = sys.argv[1], sys.argv[2]
with open(source, "rb") as handle:
    data = handle.read()

# 1980-01-01 is the earliest time a zip entry can carry.
info = zipfile.ZipInfo("lambda_handler.py", date_time=(1980, 1, 1, 0, 0, 0))
info.external_attr = 0o100644 << 16
info.compress_type = zipfile.ZIP_DEFLATED
info.create_system = 3
with zipfile.ZipFile(target, "w") as archive:
    archive.writestr(info, data, compresslevel=9)
PY

echo "built ${out}"

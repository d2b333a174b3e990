#!/usr/bin/env bash
# Regenerate cam_caffe/proto/caffe.desc (a serialized FileDescriptorSet) from the
# vendored caffe.proto. Run after editing caffe.proto. Needs grpcio-tools (protoc).
set -euo pipefail
cd "$(dirname "$0")/../cam_caffe/proto"
"${PYTHON:-python3}" -m grpc_tools.protoc -I. --descriptor_set_out=caffe.desc caffe.proto
echo "wrote $(pwd)/caffe.desc"

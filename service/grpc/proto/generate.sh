#!/bin/sh
# Regenerates the committed message classes (and their type stubs) from the vendored protos: `make proto`;
# tests/service/grpc/test_proto.py checks that the committed files are what this writes.
# Usage: generate.sh PYTHON [OUTDIR]. Only messages are generated: the servicer registers its handlers itself
# (service/grpc/servicer.py), so that a method it does not serve answers UNIMPLEMENTED.
# protoc writes `import model_config_pb2` (its imports are top-level); here the modules live in a package.
set -eu
python=$1
here=$(cd "$(dirname "$0")" && pwd)
out=${2:-$here}
PATH="$(dirname "$python"):$PATH" "$python" -m grpc_tools.protoc -I "$here" --python_out="$out" --mypy_out="$out" \
  "$here/grpc_service.proto" "$here/model_config.proto"
for f in "$out"/*_pb2.py "$out"/*_pb2.pyi; do
  sed -i -e 's/^import model_config_pb2\b/from . import model_config_pb2/' "$f"
done

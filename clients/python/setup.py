"""Generates the gRPC stubs from tally's .proto at build time, so that they are never edited by
hand and never drift from the API reference (`proto/tally/v1/ledger.proto`)."""

import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# In the repository the proto sits two levels up; an sdist carries a copy beside setup.py.
PROTO_CANDIDATES = [
    os.path.join(HERE, "..", "..", "proto", "tally", "v1", "ledger.proto"),
    os.path.join(HERE, "proto", "tally", "v1", "ledger.proto"),
]


def find_proto():
    for path in PROTO_CANDIDATES:
        if os.path.exists(path):
            return os.path.abspath(path)
    raise SystemExit("tally-client: cannot find proto/tally/v1/ledger.proto (looked in: %s)" % PROTO_CANDIDATES)


def generate(out_dir):
    """Compiles ledger.proto into out_dir/tally_client/_pb/ledger_pb2{,_grpc}.py."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as include:
        # Compiled from a path under the package, so that the generated module imports itself
        # as tally_client._pb.ledger_pb2 (the proto package stays tally.v1 on the wire).
        package = os.path.join(include, "tally_client", "_pb")
        os.makedirs(package)
        shutil.copy(find_proto(), os.path.join(package, "ledger.proto"))
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        target = os.path.join(out_dir, "tally_client", "_pb")
        os.makedirs(target, exist_ok=True)
        code = protoc.main([
            "grpc_tools.protoc",
            "-I" + include,
            "-I" + well_known,
            "--python_out=" + out_dir,
            "--grpc_python_out=" + out_dir,
            os.path.join(package, "ledger.proto"),
        ])
        if code != 0:
            raise SystemExit("tally-client: protoc failed on ledger.proto (exit %d)" % code)
        with open(os.path.join(target, "__init__.py"), "w") as init:
            init.write('"""Generated at build time from proto/tally/v1/ledger.proto; do not edit."""\n')


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        generate(self.build_lib)


def requirements():
    # The generated code checks at import that the runtime is at least as new as the generator.
    from importlib.metadata import version

    return ["grpcio>=" + version("grpcio-tools"), "protobuf>=" + version("protobuf")]


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildWithStubs}, install_requires=requirements())

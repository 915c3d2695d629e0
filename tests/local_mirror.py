"""
A loopback mirror of parquet shards built from the standard library's prose (the cpu profile's source), for a machine
that cannot reach the dataset host; prepare.py downloads from it exactly as from the real mirror. Throughput, MFU and
VRAM do not depend on the text, val_bpb does: runs record the tokenizer's hash, so analyze.py never compares a
val_bpb from these shards with one from climbmix.

Usage:
    uv run tests/local_mirror.py --dir /tmp/mirror --port 8765 &       # the cpu profile's shards, served until killed
    AUTORESEARCH_DATA_URL=http://127.0.0.1:8765 uv run prepare.py --num-shards 4
"""

import argparse
import functools
import http.server
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.dont_write_bytecode = True  # importing prepare from the repository must not leave __pycache__ there
import prepare  # noqa: E402


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description="serve shards built from local text on a loopback mirror")
    parser.add_argument("--dir", default="/tmp/alr-local-mirror", help="where the shards are built and served from")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    prepare.DATA_DIR = prepare.TOKENIZER_DIR = Path(args.dir)  # build_cpu_shards writes here; no tokenizer to remove
    prepare.build_cpu_shards()
    handler = functools.partial(QuietHandler, directory=args.dir)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)  # port 0: any free port
    print(f"serving shards from {args.dir}: AUTORESEARCH_DATA_URL=http://127.0.0.1:{server.server_port} "
          f"uv run prepare.py --num-shards {prepare.CPU_TRAIN_SHARDS}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

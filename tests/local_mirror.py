"""
A loopback mirror of parquet shards built from local text, for a machine that cannot reach the
dataset host (a GPU box without internet, an offline cluster node). prepare.py downloads from it
exactly as from the real mirror.

The text is the standard library's prose (the cpu profile's source). Throughput, MFU and VRAM do not
depend on the text; val_bpb does, so a val_bpb from these shards is never comparable with one from
climbmix. The tokenizer trained on them differs too, and every run's harness records the tokenizer's
hash, so analyze.py keeps such runs apart from the rest.

Usage:
    uv run tests/local_mirror.py --dir /tmp/mirror --port 8765 &       # build the shards once, serve until killed
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


def build_shards(dest, train_shards):
    """shard_00000.., the validation and the held-out shard from standard-library text; nothing is rebuilt."""
    dest = Path(dest)
    names = [prepare.shard_name(i) for i in range(train_shards)] + [prepare.VAL_FILENAME, prepare.HELDOUT_FILENAME]
    if not all((dest / n).exists() for n in names):
        train, val, heldout = prepare.split_documents(prepare.stdlib_documents(), num_train_shards=train_shards)
        dest.mkdir(parents=True, exist_ok=True)
        for name, texts in zip(names, train + [val, heldout]):
            prepare._write_shard(texts, dest / name)
    return names


def make_server(directory, port=0):
    """A quiet HTTP server for `directory` on 127.0.0.1 (port 0: any free port)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def main():
    parser = argparse.ArgumentParser(description="serve shards built from local text on a loopback mirror")
    parser.add_argument("--dir", default="/tmp/alr-local-mirror", help="where the shards are built and served from")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--train-shards", type=int, default=4)
    args = parser.parse_args()
    names = build_shards(args.dir, args.train_shards)
    server = make_server(args.dir, args.port)
    print(f"serving {len(names)} shards from {args.dir}: "
          f"AUTORESEARCH_DATA_URL=http://127.0.0.1:{server.server_address[1]} "
          f"uv run prepare.py --num-shards {args.train_shards}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

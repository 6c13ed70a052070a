"""S3 requests per output for bench.py's lattice shape, with outputs on S3 (moto's server).

    python benchmarks/s3_requests.py            # 200 tasks: width 20, depth 10
    python benchmarks/s3_requests.py --width 5 --depth 4

Starts moto's ThreadedMotoServer on 127.0.0.1 and a free port, points Luigi's S3Client at
it through ``[s3] endpoint_url``, and counts every S3 call with botocore's event hooks,
except those the tasks' own run() makes. Layer 0 reads local seeds; every other task three
outputs of the layer below, on S3; workers=1. Prints a table and one JSON line. Needs
``pip install 'moto[server]' boto3`` (the [test] extra).
"""

import argparse
import collections
import hashlib
import json
import os
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import boto3
import luigi
import luigi.configuration
import luigi.contrib.s3
from moto.server import ThreadedMotoServer

import luigi_hashcheck as hc

BUCKET = "bench"
COUNTS = collections.Counter()
PAUSED = [0]


def count(event_name, **_kwargs):
    if not PAUSED[0]:
        COUNTS[event_name.rsplit(".", 1)[1]] += 1


class Node(hc.HashCheckingTask):
    seeds = luigi.Parameter()
    width = luigi.IntParameter()
    layer = luigi.IntParameter()
    i = luigi.IntParameter()

    def requires(self):
        if self.layer == 0:
            return []
        return [Node(self.seeds, self.width, self.layer - 1, (self.i + k) % self.width) for k in range(3)]

    def input(self):
        if self.layer == 0:
            return [luigi.LocalTarget(os.path.join(self.seeds, f"seed-{self.i}.bin"))]
        return luigi.task.flatten(super().input())

    def output(self):
        return luigi.contrib.s3.S3Target(f"s3://{BUCKET}/n{self.layer}-{self.i}.txt")

    def run(self):
        PAUSED[0] += 1  # the task's own requests are not ours
        try:
            h = hashlib.sha256()
            for target in self.input():
                with target.open("r") as f:
                    h.update(f.read().encode())
            with self.output().open("w") as f:
                f.write(h.hexdigest())
        finally:
            PAUSED[0] -= 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--depth", type=int, default=10)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        config = luigi.configuration.get_config()
        for section, key, value in [("s3", "endpoint_url", f"http://127.0.0.1:{port}"), ("core", "autoload_range", "false")]:
            if not config.has_section(section):
                config.add_section(section)
            config.set(section, key, value)
        boto3.setup_default_session()
        boto3.DEFAULT_SESSION.events.register("before-call.s3", count)
        luigi.contrib.s3.S3Client().s3.meta.client.create_bucket(Bucket=BUCKET)
        seeds = tempfile.mkdtemp(prefix="s3bench-")
        then = time.time() - 100
        for i in range(args.width):
            path = os.path.join(seeds, f"seed-{i}.bin")
            with open(path, "w") as f:
                f.write(f"seed {i}\n" * 1000)
            os.utime(path, (then, then))  # old seeds: their stat vouches for them
        tops = [Node(seeds, args.width, args.depth - 1, i) for i in range(args.width)]
        outputs = args.width * args.depth
        edges = args.width * (args.depth - 1) * 3
        results = {}
        for name in ("full_build", "no_op"):
            COUNTS.clear()
            hc._forget_process_state()  # as a new process would start
            luigi.task_register.Register.clear_instance_cache()
            tops = [Node(seeds, args.width, args.depth - 1, i) for i in range(args.width)]
            assert luigi.build(tops, local_scheduler=True, workers=1, log_level="WARNING")
            results[name] = dict(sorted(COUNTS.items()))
    finally:
        server.stop()
    print(f"{outputs} outputs on S3, {edges} S3 input edges, workers=1")
    print(f"{'':12} {'total':>6} {'per output':>11}  by call")
    for name, counts in results.items():
        total = sum(counts.values())
        calls = ", ".join(f"{k} {v} ({v / outputs:.2f})" for k, v in counts.items())
        print(f"{name:12} {total:6} {total / outputs:11.2f}  {calls}")
    budget = {"full_build": 4 * outputs + edges, "no_op": 2 * outputs}
    print(json.dumps({"outputs": outputs, "edges": edges, "results": results, "budget": budget,
                      "met": {name: sum(results[name].values()) <= budget[name] for name in results}}))


if __name__ == "__main__":
    main()

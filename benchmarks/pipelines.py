"""The graphs the benchmarks build, as plain Luigi or as luigi_hashcheck tasks.

``BENCH_KIND=plain`` (the default) gives ``luigi.Task``; ``BENCH_KIND=hash`` gives
``HashCheckingTask``. Everything else is the same code, so the two can be timed side by side.
"""

import hashlib
import os

import luigi

if os.environ.get("BENCH_KIND", "plain") == "hash":
    from luigi_hashcheck import HashCheckingTask as Base
else:
    Base = luigi.Task


def digest_of(targets):
    """The work each task does: read its inputs, write a short digest of them."""
    h = hashlib.sha256()
    for target in targets:
        with open(target.path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


class Seed(luigi.ExternalTask):
    root = luigi.Parameter()
    i = luigi.IntParameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"seed-{self.i}.bin"))


class Node(Base):
    """A lattice node: layer 0 reads a seed, every other node three nodes of the layer below."""

    root = luigi.Parameter()
    width = luigi.IntParameter()
    layer = luigi.IntParameter()
    i = luigi.IntParameter()

    def requires(self):
        if self.layer == 0:
            return [Seed(self.root, self.i)]
        return [Node(self.root, self.width, self.layer - 1, (self.i + k) % self.width) for k in range(3)]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"n{self.layer}-{self.i}.txt"))

    def run(self):
        with self.output().open("w") as f:
            f.write(digest_of(self.input()))


class Lattice(luigi.WrapperTask):
    root = luigi.Parameter()
    width = luigi.IntParameter()
    depth = luigi.IntParameter()

    def requires(self):
        return [Node(self.root, self.width, self.depth - 1, i) for i in range(self.width)]


class Link(Base):
    """One link of a chain: link 0 reads the chain's seed, link k reads link k - 1."""

    root = luigi.Parameter()
    chain = luigi.IntParameter()
    k = luigi.IntParameter()

    def requires(self):
        return Link(self.root, self.chain, self.k - 1) if self.k else Seed(self.root, self.chain)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"c{self.chain}-{self.k}.txt"))

    def run(self):
        with open(os.path.join(self.root, "runs.log"), "a") as f:
            f.write(f"{self.chain}\n")
        with self.output().open("w") as f:
            f.write(digest_of([self.input()]))


class Forest(luigi.WrapperTask):
    root = luigi.Parameter()
    chains = luigi.IntParameter()
    depth = luigi.IntParameter()

    def requires(self):
        return [Link(self.root, c, self.depth - 1) for c in range(self.chains)]

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


# A folder of many small files, as data science pipelines make (image tiles, partitions).
FILES_PER_FOLDER = 1000


def tile_name(i):
    """The path of file ``i`` in a folder of tiles, relative to that folder."""
    return f"s{i // FILES_PER_FOLDER:05d}/f{i % FILES_PER_FOLDER:03d}.bin"


def write_tiles(folder, n, mtime_ns=None):
    """Write ``n`` files of 100 to 200 bytes, each unlike the others, in ``folder``, 1,000 to a
    subfolder: ``s00000/f000.bin``, ``s00000/f001.bin``, ... With ``mtime_ns``, date each one
    then, through its open descriptor.

    Plain ``os.open`` and ``os.write`` relative to each subfolder's descriptor: a million
    files take about a minute this way, several times less than through ``open()``.
    """
    noise = os.urandom(1 << 16)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    at_fd = os.utime in os.supports_fd
    os.makedirs(folder)
    for first in range(0, n, FILES_PER_FOLDER):
        sub = os.path.join(folder, os.path.dirname(tile_name(first)))
        os.mkdir(sub)
        dir_fd = os.open(sub, os.O_RDONLY)
        try:
            for i in range(first, min(n, first + FILES_PER_FOLDER)):
                size = 100 + i % 101
                start = i * 7919 % (len(noise) - 200)
                name = os.path.basename(tile_name(i))
                fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
                try:
                    os.write(fd, (b"%d\n" % i + noise[start:start + size])[:size])
                    if mtime_ns is not None and at_fd:
                        os.utime(fd, ns=(mtime_ns, mtime_ns))
                finally:
                    os.close(fd)
                if mtime_ns is not None and not at_fd:
                    os.utime(os.path.join(sub, name), ns=(mtime_ns, mtime_ns))
        finally:
            os.close(dir_fd)


def note_run(root, name):
    """Log a run, so the benchmark can tell that its no-ops ran nothing."""
    with open(os.path.join(root, "runs.log"), "a") as f:
        f.write(f"{name}\n")


class Tiles(Base):
    """A folder output of ``n`` small files in ``n / 1000`` subfolders. bench.py writes the
    files itself and records them with ``adopt``; this run() is there for a real rebuild."""

    root = luigi.Parameter()
    n = luigi.IntParameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "tiles"))

    def run(self):
        note_run(self.root, "tiles")
        write_tiles(self.output().path, self.n)


class TileCount(Base):
    """Reads the folder of tiles and writes one small file: how many there are."""

    root = luigi.Parameter()
    n = luigi.IntParameter()

    def requires(self):
        return Tiles(self.root, self.n)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "count.txt"))

    def run(self):
        note_run(self.root, "count")
        count = sum(len(files) for _folder, _subfolders, files in os.walk(self.input().path))
        with self.output().open("w") as f:
            f.write(f"{count}\n")

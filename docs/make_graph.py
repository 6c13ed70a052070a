"""Make docs/graph.dot and docs/graph.svg, the example graph README.md shows.

Builds a three-task pipeline in a temporary folder, edits its raw input, and prints what
``luigi-hashcheck explain --dot`` prints, then renders it with Graphviz's ``dot -Tsvg``.
Run from anywhere: ``python docs/make_graph.py`` (needs ``dot`` on PATH).
"""

import contextlib
import io
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import luigi

import luigi_hashcheck
from luigi_hashcheck import HashCheckingTask


class Raw(luigi.ExternalTask):
    day = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(f"raw/{self.day}.csv")


class Clean(HashCheckingTask):
    day = luigi.Parameter()

    def requires(self):
        return Raw(self.day)

    def output(self):
        return luigi.LocalTarget(f"clean/{self.day}.csv")

    def run(self):
        with self.input().open() as src, self.output().open("w") as dst:
            dst.write(src.read().lower())


class Report(HashCheckingTask):
    def requires(self):
        return [Clean("2024-01-01"), Clean("2024-01-02")]

    def output(self):
        return luigi.LocalTarget("report.txt")

    def run(self):
        with self.output().open("w") as dst:
            for target in self.input():
                with target.open() as src:
                    dst.write(src.read())


def main():
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        os.makedirs("raw")
        for day in ("2024-01-01", "2024-01-02"):
            with open(f"raw/{day}.csv", "w") as f:
                f.write("A,B\n")
        assert luigi.build([Report()], local_scheduler=True, log_level="WARNING")
        with open("raw/2024-01-02.csv", "w") as f:
            f.write("A,B,C\n")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            luigi_hashcheck._explain(Report(), luigi_hashcheck._settings(), "dot")
        os.chdir(HERE)
    dot = out.getvalue()
    with open(os.path.join(HERE, "graph.dot"), "w") as f:
        f.write(dot)
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
    with open(os.path.join(HERE, "graph.svg"), "w") as f:
        f.write(svg)
    print(dot, end="")


if __name__ == "__main__":
    main()

"""Example pipeline for luigi_hashcheck: raw CSV -> cleaned -> features -> report.

RawSales is produced outside the pipeline (here by make_sample_data); Clean, Features and
Report are HashCheckingTasks writing plain luigi.LocalTargets, all under one --root folder.
Each output gets a JSON record in a hidden .luigi_hashes/ folder beside it. Try:

    python examples/pipeline.py [ROOT]

A second run does nothing; edit ROOT/raw/sales.csv and only what depends on the change reruns.
"""

import csv
import os
import sys

import luigi

from luigi_hashcheck import HashCheckingTask

HEADER = ["date", "region", "product", "units", "price"]

# The tasks whose run() body executed in this process, in order (quickstart.py reads it).
# A task luigi_hashcheck skips by early cutoff never gets this far.
RAN = []


def _ran(task):
    print(f"ran {task.task_family}", flush=True)
    RAN.append(task.task_family)


def make_sample_data(root):
    """Write a small raw sales CSV (two rows malformed) under root, unless it exists."""
    path = os.path.join(root, "raw", "sales.csv")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    regions, products = ["North", "south ", "EAST", "West"], ["Widget", "gadget", "GIZMO"]
    rows = [[f"2024-01-{day:02d}", regions[day % 4], products[day % 3], str(day % 5 + 1), f"{2.5 + day % 3:.2f}"]
            for day in range(1, 21)]
    rows[6] = ["2024-01-07", "north", "widget", "", "3.50"]  # malformed: no units
    rows[13] = ["2024-01-14", "east", "gizmo", "two", "4.50"]  # malformed: units not a number
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([HEADER] + rows)
    return path


def parse_row(row):
    """Return a raw row cleaned (strings stripped and lower-cased), or None if it is malformed."""
    if len(row) != len(HEADER) or not all(field.strip() for field in row):
        return None
    date, region, product, units, price = (field.strip().lower() for field in row)
    try:
        return [date, region, product, str(int(units)), f"{float(price):.2f}"]
    except ValueError:
        return None


class RawSales(luigi.ExternalTask):
    """The raw export, produced outside this pipeline."""

    root = luigi.Parameter(default="example_data")

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "raw", "sales.csv"))


class Clean(HashCheckingTask):
    """Drop malformed rows and normalise case."""

    root = luigi.Parameter(default="example_data")
    # parse_row lives outside the class, so name it: editing it then reruns Clean too.
    code_dependencies = (parse_row,)

    def requires(self):
        return RawSales(root=self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "clean", "sales.csv"))

    def run(self):
        _ran(self)
        with self.input().open("r") as src, self.output().open("w") as dst:
            reader, writer = csv.reader(src), csv.writer(dst, lineterminator="\n")
            writer.writerow(next(reader))  # the header
            writer.writerows(row for row in map(parse_row, reader) if row is not None)


class Features(HashCheckingTask):
    """Aggregate the cleaned rows per region: orders, units and revenue."""

    root = luigi.Parameter(default="example_data")

    def requires(self):
        return Clean(root=self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "features", "regions.csv"))

    def run(self):
        _ran(self)
        totals = {}
        with self.input().open("r") as src:
            for row in csv.DictReader(src):
                orders, units, revenue = totals.get(row["region"], (0, 0, 0.0))
                totals[row["region"]] = (orders + 1, units + int(row["units"]),
                                         revenue + int(row["units"]) * float(row["price"]))
        with self.output().open("w") as dst:
            writer = csv.writer(dst, lineterminator="\n")
            writer.writerow(["region", "orders", "units", "revenue"])
            # Sorted, so the same input always gives byte-identical output.
            for region, (orders, units, revenue) in sorted(totals.items()):
                writer.writerow([region, orders, units, f"{revenue:.2f}"])


class Report(HashCheckingTask):
    """A short plain-text summary of the features."""

    root = luigi.Parameter(default="example_data")

    def requires(self):
        return Features(root=self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "report", "report.txt"))

    def run(self):
        _ran(self)
        with self.input().open("r") as src:
            regions = list(csv.DictReader(src))
        best = max(regions, key=lambda r: float(r["revenue"]))
        with self.output().open("w") as dst:
            dst.write(f"Sales report: {sum(int(r['orders']) for r in regions)} orders, {len(regions)} regions\n\n")
            for r in regions:
                dst.write(f"{r['region']:<8}{r['orders']:>4} orders{r['units']:>5} units{r['revenue']:>9}\n")
            dst.write(f"\nTop region by revenue: {best['region']}\n")


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "example_data"
    make_sample_data(root)
    sys.exit(0 if luigi.build([Report(root=root)], local_scheduler=True) else 1)

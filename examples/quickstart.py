"""Quickstart for luigi_hashcheck: build the example pipeline five times and check what ran.

    python examples/quickstart.py

Works from any folder. Everything is written to a fresh temporary folder, which is kept so
you can look at the outputs and at the .luigi_hashes/ records beside them.
"""

import os
import sys
import tempfile

# A fresh folder for the data, and a luigi.cfg in it. Luigi reads LUIGI_CONFIG_PATH, and
# warns about autoload_range, when it is first imported, so both come before the imports.
ROOT = tempfile.mkdtemp(prefix="luigi_hashcheck_quickstart_")
CONFIG = os.path.join(ROOT, "luigi.cfg")
with open(CONFIG, "w") as f:
    f.write("[core]\nautoload_range = false\n")
os.environ["LUIGI_CONFIG_PATH"] = CONFIG

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # to import pipeline
sys.path.append(os.path.dirname(HERE))  # luigi_hashcheck from the checkout, if not installed

import luigi
import pipeline

RAW = pipeline.make_sample_data(ROOT)


def build(heading):
    """Print the heading, build Report, and return the names of the tasks whose run() ran."""
    print(f"\n== {heading} ==", flush=True)
    del pipeline.RAN[:]
    if not luigi.build([pipeline.Report(root=ROOT)], local_scheduler=True, log_level="WARNING"):
        sys.exit(f"quickstart FAILED: the build for step {heading!r} failed (see the log above)")
    if not pipeline.RAN:
        print("(nothing ran)")
    return set(pipeline.RAN)


def edit_raw(old, new):
    """Replace one piece of text in the raw CSV, which must contain it exactly once."""
    with open(RAW) as f:
        text = f.read()
    if text.count(old) != 1:
        sys.exit(f"quickstart FAILED: {old!r} is not in {RAW} exactly once")
    with open(RAW, "w") as f:
        f.write(text.replace(old, new))


print(f"working in {ROOT}")
ran = {}
ran[1] = build("1. first build: everything should run")
ran[2] = build("2. build again: nothing should run")

os.utime(RAW)  # a new mtime, the same bytes
ran[3] = build("3. touch raw/sales.csv: nothing should run")

edit_raw("2024-01-05,south ,GIZMO,1,4.50", "2024-01-05,south ,GIZMO,6,4.50")  # a valid row
ran[4] = build("4. edit a valid row: Clean, Features and Report should run")

edit_raw("2024-01-14,east,gizmo,two,4.50", "2024-01-14,east,gizmo,three,4.50")  # a dropped row
ran[5] = build("5. edit a malformed row: only Clean should run (early cutoff)")

expected = {
    1: {"Clean", "Features", "Report"},
    2: set(),
    3: set(),
    4: {"Clean", "Features", "Report"},
    5: {"Clean"},
}
wrong = [f"step {step}: expected {sorted(expected[step]) or 'nothing'}, ran {sorted(ran[step]) or 'nothing'}"
         for step in expected if ran[step] != expected[step]]
if wrong:
    print("\nquickstart FAILED:\n  " + "\n  ".join(wrong), file=sys.stderr)
    sys.exit(1)
with open(os.path.join(ROOT, "report", "report.txt")) as f:
    print(f"\nthe report:\n{f.read()}")
print("quickstart OK")

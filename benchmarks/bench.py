"""Benchmarks for luigi_hashcheck, against plain Luigi and doit, measured side by side.

    python benchmarks/bench.py            # the full set: over an hour, about 5 GB of scratch
    python benchmarks/bench.py --quick    # small graphs, about a minute: what the tests run
    python benchmarks/bench.py --against ../old   # this module against the one in ../old
    python benchmarks/bench.py --folders  # only issue 13's folders of 1,000,000 files (--quick: 5,000)
    python benchmarks/bench.py --huge     # only the folder no-op at 10,000,000 files: by hand
    BENCH_MODULE=../main python benchmarks/bench.py --folders   # the luigi_hashcheck.py in ../main

Every figure is a ratio of two commands run alternately, A B B A, in this one call; the
median of the pairs is quoted. A command is a whole process, and its cost is CPU seconds
(user + sys, its children included), with wall time beside it. Prints a table, then one
JSON line. doit figures need ``pip install doit==0.37.0``; without it they are skipped.
"""

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The folder whose luigi_hashcheck.py is timed: this checkout's, or BENCH_MODULE's.
MODULE = os.path.abspath(os.environ.get("BENCH_MODULE", REPO))

FULL = {
    "width": 20, "depth": 50, "seed_bytes": 1 << 20, "pairs": 6,
    "big_file": 1 << 30, "dir_big": (8, 128 << 20), "dir_small": (2000, 4096),
    "scaling_widths": (5, 20, 80), "chains": 20, "chain_depth": 50,
    "folder_files": 1_000_000, "folder_scaling": (100_000, 1_000_000),
    # The one-change figures compare two checks that differ by a few percent of their cost,
    # on machines whose pairs spread by a tenth or more: they take three times the pairs.
    "change_pairs_factor": 3,
}
QUICK = {
    "width": 5, "depth": 6, "seed_bytes": 64 << 10, "pairs": 2,
    "big_file": 16 << 20, "dir_big": (4, 4 << 20), "dir_small": (50, 4096),
    "scaling_widths": (2, 4, 8), "chains": 4, "chain_depth": 6,
    "folder_files": 5_000, "folder_scaling": (1_000, 5_000), "change_pairs_factor": 1,
}

TARGETS = {
    "full_build": ("<=", 1.10),
    "noop_vs_floor": ("<=", 1.3),
    "noop_vs_doit": ("<=", 2.0),
    "hash_file_speed": (">=", 0.95),
    "hash_dir_speedup": (">=", 1.6),
    "scaling_marginal": ("within", 0.2),
    # "No more than": equal cost, within the spread of medians of ABBA pairs on one machine.
    "one_seed_check": ("<=", 1.05),
    # The watch on undeclared reads: 1.02, or the spread of the pairs when that is larger.
    "audit_reads": ("<=", 1.02),
    # Folders of a million files (issue 13), each against its own floor.
    "folder_noop_vs_floor": ("<=", 1.3),
    "folder_rss": ("<=", 150),  # MB of peak RSS over the floor walk's
    "folder_one_edit": ("<=", 1.05),
    "folder_one_added": ("<=", 1.05),
    "folder_one_removed": ("<=", 1.05),
    "folder_create_vs_pool": ("<=", 1.2),
    "folder_scaling": ("within", 0.2),
}


###############################################################################
# Child processes: each timed command is one of these #########################
###############################################################################


def child(argv):
    """Run one timed command in this (fresh) process."""
    command, args = argv[0], json.loads(argv[1])
    sys.path[:0] = [MODULE, HERE]
    if command == "build":
        import luigi
        import pipelines

        task = pipelines.Lattice(args["root"], args["width"], args["depth"]) if "width" in args else \
            pipelines.Forest(args["root"], args["chains"], args["depth"])
        ok = luigi.build([task], local_scheduler=True, workers=args.get("workers", 1), log_level="WARNING")
        sys.exit(0 if ok else 1)
    if command == "floor":
        # The least any content check must do: import the pipeline, make every task, call
        # requires() once each, and stat every output.
        import pipelines
        from luigi.task import flatten

        seen, todo = set(), [pipelines.Lattice(args["root"], args["width"], args["depth"])]
        while todo:
            task = todo.pop()
            for dep in flatten(task.requires()):
                if dep.task_id not in seen:
                    seen.add(dep.task_id)
                    todo.append(dep)
                    for target in flatten(dep.output()):
                        os.stat(target.path)
        return
    if command == "check":
        import pipelines

        import luigi_hashcheck

        # Every chain, as Luigi's scheduling asks each one; Forest.complete() would stop
        # at the first stale chain.
        chains = pipelines.Forest(args["root"], args["chains"], args["depth"]).requires()
        complete = all([chain.complete() for chain in chains])  # noqa: C419 - no short-circuit
        assert complete == args["expect_complete"], complete
        if args.get("hash"):
            luigi_hashcheck._hash_file(args["hash"], "sha256")
        return
    if command == "hash_rss":
        import luigi_hashcheck

        luigi_hashcheck._hash_file(args["path"], "sha256")
        return
    if command == "folder_build":
        import luigi
        import pipelines

        ok = luigi.build([pipelines.TileCount(args["root"], args["n"])], local_scheduler=True, workers=1, log_level="WARNING")
        sys.exit(0 if ok else 1)
    if command == "folder_floor":
        # The least a no-op check of a folder must do: import Luigi, walk the folder in one
        # thread, and stat every file.
        import luigi  # the floor pays what every check pays: importing Luigi

        files, todo = 0, [args["path"]]
        while todo:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
                    else:
                        entry.stat(follow_symlinks=False)
                        files += 1
        assert files == args["n"], files
        return
    if command == "folder_check":
        import pipelines

        import luigi_hashcheck

        # The check alone, as Luigi's scheduling asks it; no build, no rerun.
        complete = pipelines.Tiles(args["root"], args["n"]).complete()
        assert complete == args["expect_complete"], complete
        if args.get("hash"):
            luigi_hashcheck._hash_file(args["hash"], "sha256")
        if args.get("listing"):
            with open(args["listing"], encoding="utf-8", errors="surrogateescape") as f:
                for _line in f:
                    pass
        return
    if command == "hash_pool":
        # Hashing every file of a folder with hashlib in a pool of a thread per core, each
        # file read whole: what making a folder's record cannot do with less. The pool takes
        # a subfolder's worth of files per task, so it does not pay a future per file.
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        import luigi  # the floor pays what every check pays: importing Luigi

        paths, todo = [], [args["path"]]
        while todo:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    (todo if entry.is_dir(follow_symlinks=False) else paths).append(entry.path)
        assert len(paths) == args["n"], len(paths)

        def hash_all(chunk):
            for path in chunk:
                with open(path, "rb") as f:
                    hashlib.sha256(f.read()).hexdigest()

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(hash_all, [paths[i:i + 1000] for i in range(0, len(paths), 1000)]))
        return
    raise SystemExit(f"unknown child command {command}")


def child_env(kind="plain", module=None, config=None):
    """The environment of a child command.

    :param module: the folder whose luigi_hashcheck.py the command imports (default: MODULE).
    :param config: the luigi.cfg it reads (default: CONFIG).
    """
    module = module or MODULE
    env = dict(os.environ, BENCH_KIND=kind, BENCH_MODULE=module, PYTHONPATH=os.pathsep.join([module, HERE]), LUIGI_CONFIG_PATH=config or CONFIG)
    # Steady state: pip installs Luigi compiled, so with PYTHONDONTWRITEBYTECODE set only the
    # module under test would be compiled again by every command.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_child(command, args, kind="plain", module=None, config=None):
    """Run a child command (see child_env); return (cpu seconds, wall seconds, peak RSS in KiB)."""
    return run([sys.executable, os.path.abspath(__file__), "_child", command, json.dumps(args)], child_env(kind, module, config))


def run(cmd, env, cwd=None):
    """Run ``cmd``; return its CPU seconds, wall seconds and peak RSS in KiB, its own
    (os.wait4's rusage is the child's, where getrusage(RUSAGE_CHILDREN) would be the largest
    child's so far)."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    err = process.stderr.read().decode()
    process.stderr.close()
    if status:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{err}")
    return usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss


###############################################################################
# Measuring ###################################################################
###############################################################################


def abba(a, b, pairs):
    """Run ``a`` and ``b`` as A B B A until there are ``pairs`` pairs; return medians."""
    times = {"a": [], "b": []}
    for _ in range((pairs + 1) // 2):
        for side in "abba":
            times[side].append((a if side == "a" else b)())
    cpu = [x[0] / y[0] for x, y in zip(times["a"], times["b"])]
    wall = [x[1] / y[1] for x, y in zip(times["a"], times["b"])]
    med = statistics.median
    return {
        "ratio": round(med(cpu), 3), "wall_ratio": round(med(wall), 3), "pairs": len(cpu),
        "spread": round(max(cpu) - min(cpu), 3),
        "a_cpu": round(med(t[0] for t in times["a"]), 3), "b_cpu": round(med(t[0] for t in times["b"]), 3),
        "a_wall": round(med(t[1] for t in times["a"]), 3), "b_wall": round(med(t[1] for t in times["b"]), 3),
        # ru_maxrss is in KiB on Linux.
        "a_rss_mb": round(med(t[2] for t in times["a"]) * 1024 / 1e6, 1), "b_rss_mb": round(med(t[2] for t in times["b"]) * 1024 / 1e6, 1),
    }


def make_seeds(root, count, size):
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        with open(os.path.join(root, f"seed-{i}.bin"), "wb") as f:
            f.write(os.urandom(size))
        old = time.time() - 3600  # made long before the build, as real inputs are
        os.utime(os.path.join(root, f"seed-{i}.bin"), (old, old))


def seeded_folder(scratch, seeds, width, prefix):
    """A new folder in ``scratch`` holding the ``width`` seeds, hard-linked where possible."""
    root = tempfile.mkdtemp(prefix=prefix, dir=scratch)
    for i in range(width):
        seed, link = os.path.join(seeds, f"seed-{i}.bin"), os.path.join(root, f"seed-{i}.bin")
        try:
            os.link(seed, link)
        except OSError:  # no hard links here
            shutil.copy2(seed, link)
    return root


def age(root):
    """Date every file an hour back, so records written a moment ago can be trusted."""
    old = time.time() - 3600
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(folder, name), (old, old))


###############################################################################
# The figures #################################################################
###############################################################################


def fig_audit(scratch, p):
    """A full build with the watch on undeclared reads against one with it off."""
    off = os.path.join(scratch, "luigi-audit-off.cfg")
    with open(off, "w") as f:
        f.write("[core]\nautoload_range = false\n[hashcheck]\naudit_reads = false\n")
    return fig_full_build(scratch, p, workers=1, against=("hash", off))


def fig_full_build(scratch, p, workers, against=("plain", None)):
    """A full build against plain Luigi's, or against ``against``: (kind, luigi.cfg)."""
    seeds = os.path.join(scratch, "seeds")
    if not os.path.exists(seeds):
        make_seeds(seeds, p["width"], p["seed_bytes"])

    def fresh_root(kind):
        # Every build gets a new folder, and nothing is deleted before the end: on ext4 without
        # a journal, each new file costs time for every file deleted in the last minutes, and
        # a build that creates twice as many files would pay that twice.
        return seeded_folder(scratch, seeds, p["width"], f"full-{workers}-{kind}-")

    args = {"width": p["width"], "depth": p["depth"], "workers": workers}
    return abba(
        lambda: run_child("build", dict(args, root=fresh_root("hash")), "hash"),
        lambda: run_child("build", dict(args, root=fresh_root(against[0])), against[0], config=against[1]),
        p["pairs"],
    )


def built_lattice(scratch, p, width=None):
    width = width or p["width"]
    root = os.path.join(scratch, f"noop-{width}")
    if not os.path.exists(root):
        make_seeds(root, width, p["seed_bytes"])
        run_child("build", {"root": root, "width": width, "depth": p["depth"]}, "hash")
        age(root)
        run_child("build", {"root": root, "width": width, "depth": p["depth"]}, "hash")  # records take the aged stat
    return root


def fig_noop_vs_floor(scratch, p):
    root = built_lattice(scratch, p)
    args = {"root": root, "width": p["width"], "depth": p["depth"]}
    return abba(lambda: run_child("build", args, "hash"), lambda: run_child("floor", args, "hash"), p["pairs"])


DODO = '''
import hashlib, os
ROOT, WIDTH, DEPTH = {root!r}, {width}, {depth}


def node(layer, i):
    return os.path.join(ROOT, f"d{{layer}}-{{i}}.txt")


def make(sources, target):
    h = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as f:
            h.update(f.read())
    with open(target, "w") as f:
        f.write(h.hexdigest())


def task_node():
    for layer in range(DEPTH):
        for i in range(WIDTH):
            if layer == 0:
                sources = [os.path.join(ROOT, f"seed-{{i}}.bin")]
            else:
                sources = [node(layer - 1, (i + k) % WIDTH) for k in range(3)]
            yield {{"name": f"{{layer}}-{{i}}", "file_dep": sources, "targets": [node(layer, i)],
                    "actions": [(make, [sources, node(layer, i)])]}}
'''


def fig_noop_vs_doit(scratch, p):
    try:
        import doit  # noqa: F401
    except ImportError:
        return {"skipped": "doit is not installed: pip install doit==0.37.0"}
    hash_root = built_lattice(scratch, p)
    root = os.path.join(scratch, "doit")
    make_seeds(root, p["width"], p["seed_bytes"])
    with open(os.path.join(root, "dodo.py"), "w") as f:
        f.write(DODO.format(root=root, width=p["width"], depth=p["depth"]))
    env = dict(os.environ)
    doit_cmd = [sys.executable, "-m", "doit", "-f", os.path.join(root, "dodo.py"), "--db-file", os.path.join(root, ".doit.db")]
    run(doit_cmd, env, cwd=root)
    args = {"root": hash_root, "width": p["width"], "depth": p["depth"]}
    return abba(lambda: run_child("build", args, "hash"), lambda: run(doit_cmd, env, cwd=root), p["pairs"])


HASH_SPEED = '''
import hashlib, json, sys, time
sys.path.insert(0, {repo!r})
import luigi_hashcheck as hc
path, rounds = {path!r}, {rounds}
def ours():
    return hc._hash_file(path, "sha256")["digest"]
def stdlib():
    if hasattr(hashlib, "file_digest"):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
fast, slow = ours, stdlib
'''

DIR_SPEED = '''
import hashlib, json, os, sys, time
sys.path.insert(0, {repo!r})
import luigi_hashcheck as hc
path, rounds = {path!r}, {rounds}
def threaded():
    hc._digest_cache.clear()
    return hc._digest(path, "sha256", trust_mtime=False)["digest"]
def single():
    hc._digest_cache.clear()
    h = hashlib.sha256()
    files = []
    for folder, subfolders, names in os.walk(path):  # plain files only, as this figure's folder holds
        subfolders[:] = [name for name in subfolders if name != ".luigi_hashes"]
        files += [(os.path.relpath(os.path.join(folder, name), path).replace(os.sep, "/"), os.path.join(folder, name)) for name in names]
    for rel, full in sorted(files):
        h.update(f"{{hc._hash_file(full, 'sha256')['digest']}}  {{rel}}\\n".encode())
    return h.hexdigest()
fast, slow = threaded, single
'''


# Appended to HASH_SPEED and DIR_SPEED, which name the two ways to compare: the median,
# over A B B A rounds in one process, of how many times faster ``fast`` is than ``slow``.
IN_PROCESS_ABBA = """
assert fast() == slow()
ratios = []
for _ in range(rounds):
    t = {"fast": [], "slow": []}
    for name in ("fast", "slow", "slow", "fast"):
        start = time.perf_counter(); globals()[name](); t[name].append(time.perf_counter() - start)
    ratios += [s / f for s, f in zip(t["slow"], t["fast"])]
print(json.dumps(ratios))
"""


def in_process(script):
    out = subprocess.run([sys.executable, "-c", script + IN_PROCESS_ABBA], capture_output=True, text=True, check=True).stdout
    return statistics.median(json.loads(out))


def write_random(path, size):
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.writelines(block[: min(len(block), size - offset)] for offset in range(0, size, len(block)))


def fig_hashing(scratch, p):
    big = os.path.join(scratch, "big.bin")
    write_random(big, p["big_file"])
    rounds = (p["pairs"] + 1) // 2
    speed = in_process(HASH_SPEED.format(repo=MODULE, path=big, rounds=rounds))
    rss = run_child("hash_rss", {"path": big})[2]
    os.remove(big)
    folder = os.path.join(scratch, "dir")
    os.makedirs(folder)
    count, size = p["dir_big"]
    for i in range(count):
        write_random(os.path.join(folder, f"big-{i}.bin"), size)
    count, size = p["dir_small"]
    for i in range(count):
        with open(os.path.join(folder, f"small-{i}.bin"), "wb") as f:
            f.write(os.urandom(size))
    speedup = in_process(DIR_SPEED.format(repo=MODULE, path=folder, rounds=rounds))
    shutil.rmtree(folder)
    return {"file_speed": round(speed, 3), "peak_rss_mib": round(rss / 1024, 1), "dir_speedup": round(speedup, 3)}


def fig_scaling(scratch, p):
    widths = p["scaling_widths"]
    roots = {w: built_lattice(scratch, p, w) for w in widths}
    samples = {w: [] for w in widths}
    for _ in range(p["pairs"]):
        for w in widths:  # interleaved, so drift hits every size alike
            samples[w].append(run_child("build", {"root": roots[w], "width": w, "depth": p["depth"]}, "hash")[0])
    t = {w: statistics.median(samples[w]) for w in widths}
    n = {w: w * p["depth"] for w in widths}
    small, mid, large = widths
    low = (t[mid] - t[small]) / (n[mid] - n[small])
    high = (t[large] - t[mid]) / (n[large] - n[mid])
    return {
        "tasks": [n[w] for w in widths], "cpu": [round(t[w], 3) for w in widths],
        "marginal_ms": [round(low * 1000, 3), round(high * 1000, 3)], "ratio": round(high / low, 3),
    }


def fig_one_seed(scratch, p):
    roots = {}
    for name in ("changed", "unchanged"):
        roots[name] = root = os.path.join(scratch, f"forest-{name}")
        make_seeds(root, p["chains"], p["seed_bytes"])
        args = {"root": root, "chains": p["chains"], "depth": p["chain_depth"]}
        run_child("build", args, "hash")
        age(root)
        run_child("build", args, "hash")
        os.remove(os.path.join(root, "runs.log"))
    seed = os.path.join(roots["changed"], "seed-1.bin")
    with open(seed, "r+b") as f:
        f.write(b"changed")
    spare = os.path.join(scratch, "spare.bin")
    write_random(spare, p["seed_bytes"])
    common = {"chains": p["chains"], "depth": p["chain_depth"]}
    result = abba(
        lambda: run_child("check", dict(common, root=roots["changed"], expect_complete=False), "hash"),
        lambda: run_child("check", dict(common, root=roots["unchanged"], expect_complete=True, hash=spare), "hash"),
        p["pairs"],
    )
    run_child("build", dict(common, root=roots["changed"]), "hash")
    with open(os.path.join(roots["changed"], "runs.log")) as f:
        reran = f.read().split()
    result.update(reran=len(reran), chains_rerun=sorted(set(map(int, reran))))
    return result


def fig_against(scratch, p, old):
    """This module against the one in ``old``: a full build and a no-op, A B B A."""
    seeds = os.path.join(scratch, "seeds")
    make_seeds(seeds, p["width"], p["seed_bytes"])
    args = {"width": p["width"], "depth": p["depth"]}

    def fresh_root(side):
        return seeded_folder(scratch, seeds, p["width"], f"against-{side}-")  # deleted at the end only

    full = abba(
        lambda: run_child("build", dict(args, root=fresh_root("new")), "hash"),
        lambda: run_child("build", dict(args, root=fresh_root("old")), "hash", module=old),
        p["pairs"],
    )
    noop_roots = {}
    for side, module in (("new", MODULE), ("old", old)):
        noop_roots[side] = root = fresh_root(f"noop-{side}")
        run_child("build", dict(args, root=root), "hash", module=module)
        age(root)
        run_child("build", dict(args, root=root), "hash", module=module)  # records take the aged stat
    noop = abba(
        lambda: run_child("build", dict(args, root=noop_roots["new"]), "hash"),
        lambda: run_child("build", dict(args, root=noop_roots["old"]), "hash", module=old),
        p["pairs"],
    )
    return {"full_build": full, "noop": noop}


def main_against(p, old, quick):
    """Print how this module's full build and no-op compare with the module in ``old``."""
    old = os.path.abspath(old)
    if not os.path.isfile(os.path.join(old, "luigi_hashcheck.py")):
        raise SystemExit(f"--against {old}: no luigi_hashcheck.py there; give a checkout of the old commit")
    scratch = new_scratch()
    try:
        results = fig_against(scratch, p, old)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"luigi_hashcheck {MODULE} against {old} ({p['width']}x{p['depth']} lattice; median of {p['pairs']} ABBA pairs)")
    print(f"{'figure':<36} {'ratio':>7}  {'new CPU s':>9} {'old CPU s':>9}  verdict (within 5%)")
    for label, key in (("full build, workers=1 (CPU new/old)", "full_build"), ("no-op rebuild (CPU new/old)", "noop")):
        r = results[key]
        print(f"{label:<36} {r['ratio']:>7.3f}  {r['a_cpu']:>9.3f} {r['b_cpu']:>9.3f}  {'met' if r['ratio'] <= 1.05 else 'MISSED'}")
    print(json.dumps(dict(results, against=old, quick=quick), sort_keys=True))
    return 0


###############################################################################
# Folders of a million files (issue 13) #######################################
###############################################################################

# A folder for the scaling figure's start-up cost: the same pipeline, next to no files.
FOLDER_BASE_FILES = 10
HUGE_FILES = 10_000_000
# Wall seconds of each step that made a folder, by file count, for the report.
FOLDER_SETUP = {}


def trash(scratch):
    """A new name in the scratch folder's trash, on the same filesystem as everything else.

    Nothing big is deleted before the end of the run: on this machine, creating files costs
    ten times more in the minute after a mass deletion, so trees are moved here instead.
    """
    folder = os.path.join(scratch, "trash")
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkdtemp(dir=folder)


def check_room(scratch, n):
    """Refuse to start a folder of ``n`` files that the disk has no room or inodes for."""
    st = os.statvfs(scratch)
    need = n * max(st.f_frsize, 4096) * 1.1  # a 200-byte file takes a block
    if st.f_bavail * st.f_frsize < need or (st.f_files and st.f_favail < n * 1.1):
        raise SystemExit(f"{scratch}: a folder of {n:,} files needs {need / 1e9:.1f} GB and {n * 1.1:,.0f} inodes; "
                         f"{st.f_bavail * st.f_frsize / 1e9:.1f} GB and {st.f_favail:,} inodes are free")


def adopt_command(root, n, task="Tiles"):
    return [sys.executable, "-m", "luigi_hashcheck", "adopt", "--module", "pipelines", task, "--root", root, "--n", str(n)]


def folder_build(root, n):
    return run_child("folder_build", {"root": root, "n": n}, "hash")


def tile_folder(scratch, n):
    """A folder ``folder-N/tiles`` of ``n`` files, recorded and read by a recorded TileCount.

    The files, and TileCount's count.txt, are written here, dated an hour back, then one
    ``adopt`` records both tasks, as a run of TileCount would have, and one build, untimed,
    warms the caches, so the timed no-ops are steady ones.
    """
    import pipelines

    root = os.path.join(scratch, f"folder-{n}")
    if os.path.exists(root):
        return root
    check_room(scratch, n)
    os.makedirs(root)
    steps, start = {}, time.perf_counter()
    pipelines.write_tiles(os.path.join(root, "tiles"), n, mtime_ns=time.time_ns() - 3600 * 10**9)
    with open(os.path.join(root, "count.txt"), "w") as f:
        f.write(f"{n}\n")
    age_file(os.path.join(root, "count.txt"))
    steps["write"] = time.perf_counter() - start
    steps["adopt"] = run(adopt_command(root, n, "TileCount"), child_env("hash"))[1]
    steps["warm_up"] = folder_build(root, n)[1]
    FOLDER_SETUP[n] = {step: round(seconds, 1) for step, seconds in steps.items()}
    return root


def age_file(path):
    old = time.time() - 3600
    os.utime(path, (old, old))


def reruns(root):
    """The tasks that ran in ``root``: none should, as its setup recorded them with adopt."""
    try:
        with open(os.path.join(root, "runs.log")) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def sidecar(root):
    """The folder's listing beside it, ``.luigi_hashes/tiles.<16 hex>.list``, or None."""
    lists = glob.glob(os.path.join(glob.escape(root), ".luigi_hashes", "tiles.*.list"))
    return max(lists, key=os.path.getmtime) if lists else None


def fig_folder_noop(scratch, p, n):
    """A no-op build of Tiles and TileCount against the floor walk of the folder."""
    root = tile_folder(scratch, n)
    floor = {"path": os.path.join(root, "tiles"), "n": n}
    result = abba(lambda: folder_build(root, n), lambda: run_child("folder_floor", floor), p["pairs"])
    return dict(result, files=n)


def change_one(scratch, tiles, n, change):
    """Edit, add or remove one file at the end of the folder; return what puts it back.

    The end in sorted order, so a check that stops at the first difference walks the whole
    folder all the same. Putting back leaves every stat the record holds as it was: the same
    bytes in the same inode with the old mtime, and the subfolder's own times.
    """
    import pipelines

    last = os.path.join(tiles, pipelines.tile_name(n - 1))
    sub = os.path.dirname(last)
    sub_st = os.stat(sub)

    def put_back_subfolder():
        os.utime(sub, ns=(sub_st.st_atime_ns, sub_st.st_mtime_ns))

    if change == "edited":
        st = os.stat(last)
        with open(last, "rb") as f:
            old = f.read()

        def overwrite(data):
            fd = os.open(last, os.O_WRONLY)
            try:
                os.pwrite(fd, data, 0)
            finally:
                os.close(fd)

        overwrite(bytes(byte ^ 0xFF for byte in old))  # the same size, new bytes

        def undo():
            overwrite(old)
            os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns))
        return undo
    if change == "added":
        added = os.path.join(sub, "z-added.bin")  # after every other name
        with open(added, "wb") as f:
            f.write(os.urandom(150))

        def undo():
            os.rename(added, os.path.join(trash(scratch), "added"))
            put_back_subfolder()
        return undo
    aside = os.path.join(trash(scratch), "removed")
    os.rename(last, aside)

    def undo():
        os.rename(aside, last)
        put_back_subfolder()
    return undo


def fig_folder_one_change(scratch, p, n, change):
    """The check of a folder with one file ``change``d (edited, added or removed) against the
    check of the same folder unchanged, plus hashing that one file, plus reading the listing
    once, line by line.

    Both sides are one child each, as in fig_one_seed: three children for the one would
    count Python's and Luigi's start-up three times. Only the check is timed, never a rebuild.
    """
    root = tile_folder(scratch, n)
    listing = sidecar(root)
    if listing is None:
        return {"skipped": "no .luigi_hashes/tiles.*.list beside the folder: this module keeps the listing in the record"}
    tiles = os.path.join(root, "tiles")
    one_file = None
    if change == "edited":
        import pipelines

        one_file = os.path.join(tiles, pipelines.tile_name(n - 1))
    elif change == "added":
        one_file = os.path.join(trash(scratch), "spare.bin")
        with open(one_file, "wb") as f:
            f.write(os.urandom(150))

    def changed():
        undo = change_one(scratch, tiles, n, change)
        try:
            return run_child("folder_check", {"root": root, "n": n, "expect_complete": False}, "hash")
        finally:
            undo()

    unchanged = {"root": root, "n": n, "expect_complete": True, "hash": one_file, "listing": listing}
    return abba(changed, lambda: run_child("folder_check", unchanged, "hash"), p["pairs"] * p.get("change_pairs_factor", 1))


def fig_folder_scaling(scratch, p, sizes):
    """The no-op's CPU per file at two sizes, less the start-up that a folder of
    FOLDER_BASE_FILES files costs; each size built in turn, interleaved."""
    counts = (FOLDER_BASE_FILES, *sizes)
    roots = {n: tile_folder(scratch, n) for n in counts}
    samples = {n: [] for n in counts}
    for _ in range(p["pairs"]):
        for n in counts:  # interleaved, so drift hits every size alike
            samples[n].append(folder_build(roots[n], n)[0])
    t = {n: statistics.median(samples[n]) for n in counts}
    per_file = {n: (t[n] - t[FOLDER_BASE_FILES]) / (n - FOLDER_BASE_FILES) for n in sizes}
    small, large = sizes
    return {
        "files": list(counts), "cpu": [round(t[n], 3) for n in counts],
        "per_file_us": [round(per_file[n] * 1e6, 3) for n in sizes],
        "ratio": round(per_file[large] / per_file[small], 3) if per_file[small] > 0 else None,
        "reruns": [task for n in counts for task in reruns(roots[n])],
    }


def fig_folder_create(scratch, p, n):
    """Making the folder's record with ``adopt``, each time with no record there, against
    hashing every file in a pool of threads. Last: it rewrites the folder's record, so it
    puts the first one back after."""
    root = tile_folder(scratch, n)
    records = os.path.join(root, ".luigi_hashes")

    def move_records():
        aside = trash(scratch)
        for name in os.listdir(records):
            if name.startswith("tiles."):
                os.rename(os.path.join(records, name), os.path.join(aside, name))
        return aside

    moved, env = [], child_env("hash")

    def adopt():
        moved.append(move_records())
        return run(adopt_command(root, n), env)

    result = abba(adopt, lambda: run_child("hash_pool", {"path": os.path.join(root, "tiles"), "n": n}), p["pairs"])
    assert os.path.exists(os.path.join(records, "tiles.json")), "adopt wrote no record"
    move_records()
    for name in os.listdir(moved[0]):
        os.rename(os.path.join(moved[0], name), os.path.join(records, name))
    return result


def fig_folders(scratch, p):
    """Every folder figure, at p["folder_files"] files: the no-op and its RSS, one file
    changed three ways, scaling, and last the record's making."""
    n = p["folder_files"]
    results = {}
    noop = results["folder_noop_vs_floor"] = fig_folder_noop(scratch, p, n)
    results["folder_rss"] = {"noop_mb": noop["a_rss_mb"], "floor_mb": noop["b_rss_mb"],
                             "over_floor_mb": round(noop["a_rss_mb"] - noop["b_rss_mb"], 1)}
    for change, name in (("edited", "folder_one_edit"), ("added", "folder_one_added"), ("removed", "folder_one_removed")):
        results[name] = fig_folder_one_change(scratch, p, n, change)
    results["folder_scaling"] = fig_folder_scaling(scratch, p, p["folder_scaling"])
    results["folder_create_vs_pool"] = fig_folder_create(scratch, p, n)
    results["folder_reruns"] = reruns(os.path.join(scratch, f"folder-{n}")) + results["folder_scaling"]["reruns"]
    results["folder_setup_s"] = {str(files): steps for files, steps in FOLDER_SETUP.items()}
    return results


def fig_huge(scratch, p):
    """The no-op against the floor, and its RSS, at HUGE_FILES files in 10,000 subfolders."""
    noop = fig_folder_noop(scratch, p, HUGE_FILES)
    return {
        "folder_noop_vs_floor": noop,
        "folder_rss": {"noop_mb": noop["a_rss_mb"], "floor_mb": noop["b_rss_mb"], "over_floor_mb": round(noop["a_rss_mb"] - noop["b_rss_mb"], 1)},
        "folder_reruns": reruns(os.path.join(scratch, f"folder-{HUGE_FILES}")),
        "folder_setup_s": {str(files): steps for files, steps in FOLDER_SETUP.items()},
    }


def folder_rows(results):
    """The report's rows for the folder figures that ran: (label, target, value, why none)."""
    labels = (
        ("folder no-op build (CPU vs floor walk)", "folder_noop_vs_floor", "ratio"),
        ("folder no-op peak RSS over the floor's, MB", "folder_rss", "over_floor_mb"),
        ("one file edited: check vs no-op + hash + listing", "folder_one_edit", "ratio"),
        ("one file added: check vs no-op + hash + listing", "folder_one_added", "ratio"),
        ("one file removed: check vs no-op + listing", "folder_one_removed", "ratio"),
        ("folder record by adopt (CPU vs hashlib pool)", "folder_create_vs_pool", "ratio"),
        ("folder no-op CPU per file, large/small", "folder_scaling", "ratio"),
    )
    return [(label, name, results[name].get(key), results[name].get("skipped", "not measured"))
            for label, name, key in labels if name in results]


def print_folder_notes(results):
    noop = results["folder_noop_vs_floor"]
    print(f"folder of {noop['files']:,} files: no-op {noop['a_cpu']} s CPU ({noop['a_wall']} s wall), "
          f"floor {noop['b_cpu']} s CPU ({noop['b_wall']} s wall); peak RSS {noop['a_rss_mb']} MB vs {noop['b_rss_mb']} MB")
    if "folder_scaling" in results:
        scaling = results["folder_scaling"]
        print(f"folder no-op CPU per file, start-up left out: {scaling['per_file_us']} µs at {scaling['files'][1:]} files")
    if "folder_create_vs_pool" in results:
        create = results["folder_create_vs_pool"]
        print(f"folder record by adopt: {create['a_cpu']} s CPU ({create['a_wall']} s wall), "
              f"hashlib pool {create['b_cpu']} s CPU ({create['b_wall']} s wall)")
    for files, steps in results["folder_setup_s"].items():
        print(f"setup of {int(files):,} files, wall s: " + ", ".join(f"{step} {seconds}" for step, seconds in steps.items()))
    print(f"tasks that ran in a folder no-op: {results['folder_reruns'] or 'none'} (expected none)")


###############################################################################
# Report ######################################################################
###############################################################################


def judge(name, value):
    how, limit = TARGETS[name]
    if how == "<=":
        ok = value <= limit
    elif how == ">=":
        ok = value >= limit
    else:
        ok = abs(value - 1) <= limit
    return f"{how} {limit}" if how != "within" else f"1 ± {limit}", "met" if ok else "MISSED"


def new_scratch():
    """A scratch folder with its own luigi.cfg, which CONFIG names, for every command."""
    scratch = tempfile.mkdtemp(prefix="luigi_hashcheck_bench_")
    global CONFIG
    CONFIG = os.path.join(scratch, "luigi.cfg")
    with open(CONFIG, "w") as f:
        f.write("[core]\nautoload_range = false\n")
    return scratch


def print_rows(rows):
    """Print (label, target, value, why there is none) rows under a header."""
    print(f"{'figure':<48} {'ratio':>7}  {'target':<9} verdict")
    for label, target, value, missing in rows:
        if value is None:
            print(f"{label:<48} {'-':>7}  {'':<9} {missing}")
            continue
        goal, verdict = judge(target, value) if target else ("", "")
        print(f"{label:<48} {value:>7.3f}  {goal:<9} {verdict}")


def main_folders(p, args):
    """Only the folder figures: --folders, or --huge (the no-op at HUGE_FILES, by hand)."""
    scratch = new_scratch()
    try:
        results = fig_huge(scratch, p) if args.huge else fig_folders(scratch, p)
        files = HUGE_FILES if args.huge else p["folder_files"]
        print(f"luigi_hashcheck {MODULE}: folders of {files:,} files in {files // 1000:,} subfolders (median of {p['pairs']} ABBA pairs, {p['pairs'] * p.get('change_pairs_factor', 1)} for one file changed)")
        print_rows(folder_rows(results))
        print_folder_notes(results)
        results.update(machine(), quick=args.quick, huge=args.huge, module=MODULE)
        print(json.dumps(results, sort_keys=True), flush=True)
    finally:
        # After the report: removing a million files takes minutes.
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def machine():
    return {"machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
            "date": time.strftime("%Y-%m-%d")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small graphs, for the tests")
    parser.add_argument("--pairs", type=int, help="pairs per figure (default 6, quick 2, --huge 2; three times as many for the one-file-changed figures, but in quick)")
    parser.add_argument("--against", metavar="PATH", help="time this module against the luigi_hashcheck.py in PATH, a checkout of an older commit")
    parser.add_argument("--folders", action="store_true", help="only the folder figures: 1,000,000 files (quick: 5,000)")
    parser.add_argument("--files", type=int, metavar="N", help="the folder figures at N files, scaling at N/10 and N (default 1,000,000, quick 5,000)")
    parser.add_argument("--huge", action="store_true", help=f"only the folder no-op against its floor, at {HUGE_FILES:,} files: by hand, about 45 GB")
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.huge:
        p["pairs"] = 2  # one A B B A round: each side takes minutes
    if args.pairs:
        p["pairs"] = args.pairs
    if args.files is not None and args.files < 1000:
        parser.error("--files: at least 1,000, as scaling takes a tenth of it against a folder of 10")
    if args.files:
        p["folder_files"], p["folder_scaling"] = args.files, (args.files // 10, args.files)
    if args.against:
        return main_against(p, args.against, args.quick)
    if args.folders or args.huge:
        return main_folders(p, args)
    scratch = new_scratch()
    results = {}
    try:
        results["full_build"] = fig_full_build(scratch, p, workers=1)
        results["full_build_workers2"] = fig_full_build(scratch, p, workers=2)
        results["audit_reads"] = fig_audit(scratch, p)
        results["noop_vs_floor"] = fig_noop_vs_floor(scratch, p)
        results["noop_vs_doit"] = fig_noop_vs_doit(scratch, p)
        results["hashing"] = fig_hashing(scratch, p)
        results["scaling"] = fig_scaling(scratch, p)
        results["one_seed"] = fig_one_seed(scratch, p)
        results.update(fig_folders(scratch, p))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise

    doit_skipped = results["noop_vs_doit"].get("skipped", "")
    rows = [
        ("full build, workers=1 (CPU vs plain Luigi)", "full_build", results["full_build"]["ratio"], ""),
        ("full build, workers=2 (CPU vs plain Luigi)", None, results["full_build_workers2"]["ratio"], ""),
        ("full build, read watch on vs off", "audit_reads", results["audit_reads"]["ratio"], ""),
        ("no-op rebuild (CPU vs floor walk)", "noop_vs_floor", results["noop_vs_floor"]["ratio"], ""),
        ("no-op rebuild (CPU vs doit 0.37)", "noop_vs_doit", results["noop_vs_doit"].get("ratio"), doit_skipped),
        ("hash one file (speed vs hashlib.file_digest)", "hash_file_speed", results["hashing"]["file_speed"], ""),
        ("hash a directory (speed vs one thread)", "hash_dir_speedup", results["hashing"]["dir_speedup"], ""),
        ("no-op marginal cost per task, large/small", "scaling_marginal", results["scaling"]["ratio"], ""),
        ("one seed changed: check vs no-op + one hash", "one_seed_check", results["one_seed"]["ratio"], ""),
    ]
    size = f"{p['width']}x{p['depth']} lattice, {p['chains']}x{p['chain_depth']} forest, {p['folder_files']:,}-file folder"
    print(f"luigi_hashcheck benchmarks ({'quick' if args.quick else 'full'}: {size}; median of {p['pairs']} ABBA pairs, {p['pairs'] * p.get('change_pairs_factor', 1)} for one file changed)")
    # The watch's target widens to the spread of its own pairs, when that is larger.
    TARGETS["audit_reads"] = ("<=", round(max(1.02, 1 + results["audit_reads"]["spread"]), 3))
    print_rows(rows + folder_rows(results))
    print(f"peak RSS hashing one {p['big_file'] >> 20} MiB file: {results['hashing']['peak_rss_mib']} MiB (target < 64 MiB)")
    print(f"one seed changed: {results['one_seed']['reran']} tasks reran, in chains {results['one_seed']['chains_rerun']} "
          f"(expected {p['chain_depth']}, in one chain)")
    print_folder_notes(results)
    results.update(machine(), quick=args.quick)
    print(json.dumps(results, sort_keys=True), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)  # after the report: removing a million files takes minutes
    return 0


CONFIG = None

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
    else:
        sys.exit(main())

"""Tests for luigi_hashcheck: real Luigi builds in tmp_path, arranged as the module is."""

import ast
import contextlib
import errno
import functools
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import typing
import urllib.parse
import uuid

import luigi
import luigi.configuration
import luigi.format
import luigi.mock
import luigi.target
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import luigi_hashcheck as hc
from luigi_hashcheck import HashableLocalTarget, HashableTarget, HashCheckingTask

HERE = os.path.dirname(os.path.abspath(__file__))


###############################################################################
# Helpers #####################################################################
###############################################################################


def note_run(root, name):
    """Append to the run log; a file, so forked workers' runs are seen too."""
    with open(os.path.join(root, "runs.log"), "a") as f:
        f.write(name + "\n")


def ran(root):
    """Return the names logged since the last call, in order, and clear the log."""
    path = os.path.join(root, "runs.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        names = f.read().split()
    os.remove(path)
    return names


def build(*tasks, **kwargs):
    kwargs.setdefault("local_scheduler", True)
    kwargs.setdefault("log_level", "WARNING")
    return luigi.build(list(tasks), **kwargs)


def failures_of(cls, *tasks):
    """Build ``tasks``, which must fail; return the exceptions tasks of ``cls`` failed with."""
    failures = []
    handler = cls.event_handler(luigi.Event.FAILURE)(lambda task, exc: failures.append(exc))
    try:
        assert not build(*tasks)
    finally:
        cls._event_callbacks[cls][luigi.Event.FAILURE].discard(handler)
    return failures


def write(path, text):
    folder = os.path.dirname(str(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path):
    with open(path) as f:
        return f.read()


def record_of(path):
    folder, name = os.path.split(os.path.abspath(str(path)))
    with open(os.path.join(folder, ".luigi_hashes", name + ".json")) as f:
        return json.load(f)


def listing_of(output, entry=None, folder=None):
    """The lines of the listing that a folder entry names, as lists [name, digest, *stat]
    of strings (stat: size, mtime_ns and inode; on a store, size and token): by
    default the output's own; an input's listing is beside its ``folder`` or in the output's
    records folder."""
    records = os.path.join(os.path.dirname(os.path.abspath(str(output))), ".luigi_hashes")
    entry = entry or record_of(output)["output"]
    places = [records] + ([os.path.join(os.path.dirname(os.path.abspath(str(folder))), ".luigi_hashes")] if folder else [])
    for place in places:
        path = os.path.join(place, entry["listing"])
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            assert hashlib.sha256(data).hexdigest() == entry["listing_digest"]
            return listing_files(data)
    raise AssertionError(f"no listing {entry['listing']} in {places}")


def listing_files(data):
    """The files of a listing's bytes, as listing_of gives them, read by hand from the
    format DESIGN.md gives: a header line, then blocks of COUNT STATBYTES DIGESTBYTES, the
    stat lines, the digest lines and a flag per file."""
    header, _, rest = data.partition(b"\n")
    assert header == b"luigi_hashcheck listing 2"
    found = []
    while rest:
        head, _, rest = rest.partition(b"\n")
        count, stat_bytes, digest_bytes = map(int, head.split(b" "))
        stats, digests = rest[:stat_bytes], rest[stat_bytes : stat_bytes + digest_bytes]
        flags, rest = rest[stat_bytes + digest_bytes : stat_bytes + digest_bytes + count], rest[stat_bytes + digest_bytes + count :]
        assert rest[:1] == b"\n" and set(flags) <= set(b"v-")
        rest = rest[1:]
        stats, digests = stats.decode("utf-8", "surrogateescape").split("\n"), digests.decode("utf-8", "surrogateescape").split("\n")
        assert len(stats) == len(digests) == count + 1 and stats.pop() == digests.pop() == ""
        for line, digest_line in zip(stats, digests):
            name, *stat = line.split("\t")
            digest, sep, listed_name = digest_line.partition("  ")
            assert sep and listed_name == name, (line, digest_line)
            found.append([name, digest, *stat])
    return found


def age(root, seconds=100):
    """Set every file's mtime into the past, as if built long ago."""
    then = time.time() - seconds
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.exists(path):  # not a dangling link
                os.utime(path, (then, then))


@pytest.fixture
def config():
    """Set luigi.cfg options for one test."""
    parser = luigi.configuration.get_config()
    added = []

    def set_option(section, key, value):
        if not parser.has_section(section):
            parser.add_section(section)
        added.append((section, key, parser.get(section, key, None)))
        parser.set(section, key, value)

    yield set_option
    for section, key, old in reversed(added):
        if old is None:
            parser.remove_option(section, key)
        else:
            parser.set(section, key, old)


@pytest.fixture
def root(tmp_path):
    write(tmp_path / "seed.txt", "hello")
    return str(tmp_path)


def as_new_process():
    """Forget what this process has learnt, as a new process would start: digests, code
    fingerprints, logged-once keys, cleaned records folders, counters."""
    hc._forget_process_state()  # private: no public way to restart a process's caches
    luigi.task_register.Register.clear_instance_cache()


@pytest.fixture(autouse=True)
def fresh_process():
    """Each test starts as in a new process, so none leans on what another left behind."""
    as_new_process()


# private: the module's own counters of reads, looks and record checks; no public way to count
# what a build hashed or looked at.
counters = hc._counts


def load_module(folder, source, name=None):
    """Write ``source`` to a new module file and import it, as a pipeline file would be."""
    name = name or f"pipe_{uuid.uuid4().hex[:10]}"
    path = os.path.join(str(folder), name + ".py")
    write(path, textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_python(args, cwd, timeout=120, env=None):
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, str(cwd)]), **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env, check=False)


def cli_main(args, capsys):
    code = hc.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def verified(args, capsys):
    """Run ``verify --json`` on ``args``; return its exit code and {absolute output path:
    (status, reason)}."""
    code, out, _ = cli_main(["verify", "--json", *args], capsys)
    return code, {os.path.abspath(e["path"]): (e["status"], e.get("reason")) for e in json.loads(out)["outputs"]}


def snapshot(folder):
    """Every file and folder below ``folder`` with its bytes and mtime."""
    found = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            found[path] = (st.st_mtime_ns, read(path) if os.path.isfile(path) and not name.endswith(".lock") else None)
    return found


###############################################################################
# Shared pipelines ############################################################
###############################################################################

# Seed -> Upper -> Head -> Count, a folder output, a lattice of any size, and a three-task
# chain for the command line: the pipelines tests in several sections build.


class Seed(luigi.ExternalTask):
    root = luigi.Parameter()
    name = luigi.Parameter(default="seed.txt")

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, self.name))


class Upper(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "upper.txt"))

    def run(self):
        note_run(self.root, "Upper")
        with self.input().open() as src, self.output().open("w") as dst:
            dst.write(src.read().upper())


class Head(HashCheckingTask):
    """The first three characters: many upstream edits leave it byte-identical."""

    root = luigi.Parameter()

    def requires(self):
        return Upper(self.root)

    def output(self):
        return HashableLocalTarget(os.path.join(self.root, "head.txt"))

    def run(self):
        note_run(self.root, "Head")
        with self.input().open() as src, self.output().open("w") as dst:
            dst.write(src.read()[:3])


class Count(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Head(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "count.txt"))

    def run(self):
        note_run(self.root, "Count")
        with self.input().open() as src, self.output().open("w") as dst:
            dst.write(str(len(src.read())))


class Folder(HashCheckingTask):
    root = luigi.Parameter()
    slash = luigi.BoolParameter(significant=False)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "folder" + ("/" if self.slash else "")))

    def run(self):
        note_run(self.root, "Folder")
        with self.output().temporary_path() as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            write(os.path.join(tmp, "one.txt"), "1")
            write(os.path.join(tmp, "sub", "two.txt"), "2")


def lattice(width, depth, pause=0.0, namespace=None):
    source = f'''
import hashlib
import os
import time
import luigi
from luigi_hashcheck import HashCheckingTask


class Node(HashCheckingTask):
    task_namespace = {namespace!r}
    root = luigi.Parameter()
    layer = luigi.IntParameter()
    i = luigi.IntParameter()

    def requires(self):
        if self.layer == 0:
            return Src(self.root, self.i)
        return [Node(self.root, self.layer - 1, (self.i + k) % {width}) for k in range(3)]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"n{{self.layer}}-{{self.i}}.txt"))

    def run(self):
        time.sleep({pause})
        with open(os.path.join(self.root, "runs.log"), "a") as f:
            f.write(f"{{self.task_id}}\\n")
        text = "".join(open(t.path).read() for t in luigi.task.flatten(self.input()))
        with self.output().open("w") as f:
            f.write(hashlib.sha256(text.encode()).hexdigest()[:16])


class Src(luigi.ExternalTask):
    task_namespace = {namespace!r}
    root = luigi.Parameter()
    i = luigi.IntParameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"seed-{{self.i}}.txt"))


class Top(luigi.WrapperTask):
    task_namespace = {namespace!r}
    root = luigi.Parameter()

    def requires(self):
        return [Node(self.root, {depth - 1}, i) for i in range({width})]
'''
    return source


def load_lattice(root, width, depth, pause=0.0):
    """Write seeds and import a lattice module; its families are namespaced by its name."""
    for i in range(width):
        write(os.path.join(str(root), f"seed-{i}.txt"), f"seed {i}")
    name = f"lattice_{uuid.uuid4().hex[:10]}"
    return load_module(root, lattice(width, depth, pause, namespace=name), name=name)


BUILD_SCRIPT = """
import importlib, sys
import luigi
sys.path.insert(0, sys.argv[1])
module = importlib.import_module(sys.argv[2])
kwargs = {"workers": int(sys.argv[3]), "log_level": "WARNING"}
if len(sys.argv) > 4:
    kwargs.update(scheduler_host="127.0.0.1", scheduler_port=int(sys.argv[4]))
else:
    kwargs.update(local_scheduler=True)
sys.exit(0 if luigi.build([module.Top(sys.argv[1])], **kwargs) else 1)
"""


def start_build(root, module, workers, port=None):
    """Start a build of the lattice ``module`` in a fresh interpreter, in its own process group."""
    args = [sys.executable, "-c", BUILD_SCRIPT, str(root), module.__name__, str(workers)] + ([str(port)] if port else [])
    env = dict(os.environ, PYTHONPATH=HERE)
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


CLI_PIPELINE = """
import os
import luigi
from luigi_hashcheck import HashCheckingTask

BASE = {base}


class Raw(luigi.ExternalTask):
    task_namespace = "{ns}"
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "raw.txt"))


class A(BASE):
    task_namespace = "{ns}"
    root = luigi.Parameter()

    def requires(self):
        return Raw(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "a.txt"))

    def run(self):
        with open(os.path.join(self.root, "runs.log"), "a") as f:
            f.write("A\\n")
        with self.input().open() as src, self.output().open("w") as dst:
            dst.write(src.read().upper())


class B(BASE):
    task_namespace = "{ns}"
    root = luigi.Parameter()

    def requires(self):
        return A(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "sub", "b.txt"))

    def run(self):
        with open(os.path.join(self.root, "runs.log"), "a") as f:
            f.write("B\\n")
        with self.input().open() as src, self.output().open("w") as dst:
            dst.write(src.read() + "!")


class C(BASE):
    task_namespace = "{ns}"
    root = luigi.Parameter()

    def requires(self):
        return B(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "c.txt"))

    def run(self):
        with open(os.path.join(self.root, "runs.log"), "a") as f:
            f.write("C\\n")
        with self.input().open() as src, self.output().open("w") as dst:
            dst.write(src.read() + "?")
"""


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """A built three-task chain, its module importable by name, the current folder its root."""
    ns = f"cli{uuid.uuid4().hex[:8]}"
    module = load_module(tmp_path, CLI_PIPELINE.format(base="HashCheckingTask", ns=ns), name=ns)
    write(tmp_path / "raw.txt", "hello")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build(module.C("."))
    ran(".")
    module.task = lambda name: ["--module", ns, f"{ns}.{name}", "--root", "."]
    return module


###############################################################################
# Errors ######################################################################
###############################################################################


class NotAFile(luigi.Target):
    """Neither a FileSystemTarget nor a HashableTarget: nothing to hash."""

    def exists(self):
        return True


class Mocked(HashCheckingTask):
    def output(self):
        return NotAFile()

    def run(self):
        pass


class MockedInput(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Mocked()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "m.txt"))


def test_an_unhashable_target_names_task_class_and_fix(root):
    with pytest.raises(hc.UnhashableTargetError) as info:
        Mocked().complete()
    message = str(info.value)
    assert "Mocked()" in message and "NotAFile" in message and "HashableTarget" in message
    with pytest.raises(hc.UnhashableTargetError, match="NotAFile"):
        MockedInput(root).complete()
    assert not build(MockedInput(root))


###############################################################################
# Configuration ###############################################################
###############################################################################


def test_algorithm_is_configurable_and_each_record_keeps_its_own(root, config):
    config("hashcheck", "algorithm", "md5")
    assert build(Upper(root))
    record = record_of(os.path.join(root, "upper.txt"))
    assert record["algorithm"] == "md5" and record["output"]["digest"] == hashlib.md5(b"HELLO").hexdigest()
    config("hashcheck", "algorithm", "sha256")
    assert build(Upper(root))
    assert ran(root) == ["Upper"]  # the md5 record still checks with md5


@pytest.mark.parametrize("name", ["shake_128", "no-such-hash"])
def test_a_bad_algorithm_is_a_clear_configuration_error(root, config, name):
    config("hashcheck", "algorithm", name)
    with pytest.raises(hc.ConfigError, match=name):
        Upper(root).complete()


###############################################################################
# State #######################################################################
###############################################################################


def test_same_process_rebuild_sees_an_edit_with_the_same_instances(root):
    top = Count(root)
    assert build(top)
    assert Count(root) is top  # Luigi reuses task instances within a process
    ran(root)
    write(os.path.join(root, "seed.txt"), "world")
    assert build(top)
    assert ran(root) == ["Upper", "Head", "Count"]
    assert build(top)
    assert ran(root) == []


def test_a_worker_kept_open_sees_an_edit_between_runs(root):
    # The scheduler would not rerun a task within 10 s of it finishing.
    with luigi.worker.Worker(scheduler=luigi.scheduler.Scheduler(stable_done_cooldown_secs=0)) as worker:
        assert worker.add(Count(root))
        assert worker.run()
        write(os.path.join(root, "seed.txt"), "world")
        assert worker.add(Count(root))
        assert worker.run()
        assert worker.add(Count(root))
        assert worker.run()
    assert ran(root) == ["Upper", "Head", "Count"] * 2
    assert read(os.path.join(root, "upper.txt")) == "WORLD"


def test_a_cached_incomplete_is_checked_again_at_run_time(root, config):
    # With check_complete_on_run, Luigi asks each task again right after its run and each
    # dependency again right before; a remembered "incomplete" would fail the build.
    config("worker", "check_complete_on_run", "true")
    assert build(Count(root), workers=2)
    assert sorted(ran(root)) == ["Count", "Head", "Upper"]


class Gate(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "gate.txt"))

    def run(self):
        gates[self.root][0].set()
        gates[self.root][1].wait(30)
        write(self.output().path, "opened")


gates = {}


def test_a_build_in_another_thread_leaves_this_one_alone(root, config):
    config("worker", "no_install_shutdown_handler", "true")  # signals only work in the main thread
    gates[root] = (threading.Event(), threading.Event())
    thread = threading.Thread(target=build, args=(Gate(root),))
    thread.start()
    try:
        assert gates[root][0].wait(30)
        # private: which build is active in a thread has no public view.
        assert hc._active_memo() is None  # that thread's build, not this thread's
        assert not Upper(root).complete()
    finally:
        gates[root][1].set()
        thread.join(30)
    assert Gate(root).complete()


def test_workers_4(tmp_path):
    module = load_lattice(tmp_path, 4, 5)
    top = module.Top(str(tmp_path))
    assert build(top, workers=4)
    assert len(ran(str(tmp_path))) == 20
    assert build(top, workers=4)
    assert ran(str(tmp_path)) == []
    write(tmp_path / "seed-1.txt", "changed")  # n0-1 and everything built on it rerun
    assert build(top, workers=4)
    assert len(ran(str(tmp_path))) == 1 + 3 + 4 + 4 + 4


def test_parallel_scheduling_checks_in_a_pool(root):
    # [core] parallel_scheduling calls complete() in a multiprocessing pool: tasks must pickle.
    assert build(Count(root), parallel_scheduling=True, workers=2)
    assert build(Count(root), parallel_scheduling=True, workers=2)
    write(os.path.join(root, "seed.txt"), "world")
    assert build(Count(root), parallel_scheduling=True, workers=2)
    assert ran(root) == ["Upper", "Head", "Count"] * 2


def test_the_luigi_command_line_sees_an_edit(tmp_path):
    ns = f"cmdline{uuid.uuid4().hex[:8]}"
    write(tmp_path / ns / "__init__.py", CLI_PIPELINE.format(base="HashCheckingTask", ns=ns))  # never imported here
    args = ["-m", "luigi", "--module", ns, f"{ns}.A", "--root", str(tmp_path), "--local-scheduler"]
    for text, expected in (("hi", ["A"]), ("hi", []), ("ho", ["A"])):
        write(tmp_path / "raw.txt", text)
        result = run_python(args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert ran(str(tmp_path)) == expected, result.stderr
    assert read(tmp_path / "a.txt") == "HO"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_luigid(folder, cooldown):
    """A real central scheduler on 127.0.0.1 and a free port; yields the port."""
    (folder / "logs").mkdir()
    port = free_port()
    cfg = folder / "luigi.cfg"
    write(cfg, f"[scheduler]\nstable_done_cooldown_secs = {cooldown}\n[core]\nautoload_range = false\n")
    process = subprocess.Popen(
        [sys.executable, "-c", "import luigi.cmdline; luigi.cmdline.luigid()", "--address", "127.0.0.1", "--port", str(port),
         "--state-path", str(folder / "state.pickle"), "--logdir", str(folder / "logs")],
        env=dict(os.environ, LUIGI_CONFIG_PATH=str(cfg)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "luigid did not start"
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def luigid(tmp_path_factory):
    """A luigid that reruns a done task at once, for tests that rebuild right away."""
    with running_luigid(tmp_path_factory.mktemp("luigid"), cooldown=0) as port:
        yield port


def test_builds_through_luigid_see_an_edit(root, luigid):
    remote = {"local_scheduler": False, "scheduler_host": "127.0.0.1", "scheduler_port": luigid}
    assert build(Count(root), **remote)
    assert build(Count(root), **remote)
    write(os.path.join(root, "seed.txt"), "world")
    assert build(Count(root), workers=2, **remote)
    assert ran(root) == ["Upper", "Head", "Count"] * 2


def test_three_processes_through_one_luigid_run_each_task_once(tmp_path, tmp_path_factory):
    module = load_lattice(tmp_path, 4, 5, pause=0.05)
    # The default 10 s cooldown: a task done by one worker is not handed out again.
    with running_luigid(tmp_path_factory.mktemp("luigid"), cooldown=10) as port:
        builds = [start_build(tmp_path, module, workers=2, port=port) for _ in range(3)]
        for process in builds:
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err.decode()
    runs = ran(str(tmp_path))
    assert len(runs) == 20 and len(set(runs)) == 20
    assert hc.main(["verify", "--quiet", str(tmp_path)]) == 0


###############################################################################
# Storage #####################################################################
###############################################################################


def _local_storage(tmp_path):
    return hc._LOCAL, str(tmp_path)  # private: the storage seam has no public face


# Every kind of storage the module has, each a function of tmp_path that gives (the storage,
# a scratch folder in it). Another kind is one more entry, and must pass the same contract.
STORAGE_KINDS = {"local": _local_storage}


@pytest.fixture(params=sorted(STORAGE_KINDS))
def storage(request, tmp_path):
    """(A storage, a scratch folder path in it with "/" separators), for each storage kind."""
    yield STORAGE_KINDS[request.param](tmp_path)


def test_storage_contract(storage):
    """Every method of the interface _LocalStorage's docstring names, as the module uses it."""
    fs, folder = storage
    data = b"some bytes\n" * 100
    path = f"{folder}/a.txt"
    write(path, data.decode())
    # stat: a freshness token for an existing path, FileNotFoundError for a missing one.
    with pytest.raises(FileNotFoundError):
        fs.stat(f"{folder}/missing.txt")
    # hash: the file's entry, whose digest is what hashlib makes of its bytes.
    fresh = fs.hash(path, "sha256")
    assert fresh["digest"] == hashlib.sha256(data).hexdigest()
    assert fs.hash(path, "md5")["digest"] == hashlib.md5(data).hexdigest()
    # vouches: within a tick of its mtime a token vouches only for a digest rechecked later.
    assert not fs.vouches(fresh, fs.stat(path))
    assert fs.vouches(fresh, fs.stat(path), True)
    age(folder)
    old = fs.hash(path, "sha256")
    assert fs.vouches(old, fs.stat(path))  # an old, unchanged file
    write(path, "edited")
    assert not fs.vouches(old, fs.stat(path)) and not fs.vouches(old, fs.stat(path), True)
    # stat_chunks: recursive, sorted by relative path, without any .luigi_hashes folder,
    # without what is excluded; one stat line per file, and a link to a folder is listed
    # by where it points, not followed, as readlink says.
    for rel in ("sub/b.txt", "sub/deeper/c.txt", "skip.txt", "skipdir/d.txt", ".luigi_hashes/x.json", "sub/.luigi_hashes/y.json"):
        write(f"{folder}/{rel}", rel)
    os.symlink("sub", f"{folder}/link")
    lines = "".join(fs.stat_chunks(folder, ["skip.txt", "skipdir"])).splitlines()
    st = os.stat(f"{folder}/a.txt")
    assert lines[:2] == [f"a.txt\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}", "link\tlink:sub"]
    assert [line.split("\t")[0] for line in lines] == ["a.txt", "link", "sub/b.txt", "sub/deeper/c.txt"]
    assert [line.split("\t")[0] for line in "".join(fs.stat_chunks(f"{folder}/sub")).splitlines()] == ["b.txt", "deeper/c.txt"]
    assert fs.readlink(f"{folder}/link") == "sub"
    # records_folder makes .luigi_hashes, again and again; replace writes a record whole,
    # leaving no temporary file; read_record reads it back, None when there is none.
    records = fs.records_folder(f"{folder}/sub")
    assert records == f"{folder}/sub/.luigi_hashes" and fs.records_folder(f"{folder}/sub") == records
    record = f"{records}/b.txt.json"
    assert fs.read_record(f"{records}/none.json", 1000) is None
    fs.replace(record, b'{"first": 1}')
    fs.replace(record, b'{"second": 2}')
    assert fs.read_record(record, 1000) == b'{"second": 2}'
    assert sorted(os.listdir(records)) == ["b.txt.json", "y.json"]
    # A record that is a link, or too large, is damaged; nothing is written through a link.
    os.symlink("b.txt.json", f"{records}/link.json")
    with pytest.raises(hc._DamagedRecord, match="symbolic link"):  # private: the contract's own error
        fs.read_record(f"{records}/link.json", 1000)
    with pytest.raises(hc._DamagedRecord, match="too large"):
        fs.read_record(record, 3)
    with pytest.raises(hc.HashCheckError, match="symbolic link"):
        fs.replace(f"{records}/link.json", b"{}")
    assert fs.read_record(record, 1000) == b'{"second": 2}'
    # clean: a leftover older than any write could take goes; a fresh one, maybe a live
    # writer's, stays.
    dead, live = (f"{records}/.b.txt.json~elsewhere~1~{c * 12}.tmp" for c in "ab")
    write(dead, "{half")
    write(live, "{half")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    fs.clean(records)
    assert not os.path.exists(dead) and os.path.exists(live)
    # lock: one holder at a time, between threads too; a waiter gives up after its timeout.
    held, release = threading.Event(), threading.Event()

    def hold():
        with fs.lock(records, 10):
            held.set()
            release.wait(20)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(20)
        with pytest.raises(hc.LockTimeout), fs.lock(records, 0.1):
            pass
    finally:
        release.set()
        holder.join(20)
    with fs.lock(records, 5):  # free again
        pass
    # remove_record: the link, not what it points to; then the record; then nothing is left.
    assert fs.remove_record(f"{records}/link.json", 5) is True
    assert fs.read_record(record, 1000) == b'{"second": 2}'
    assert fs.remove_record(record, 5) is True
    assert fs.remove_record(record, 5) is False
    assert fs.read_record(record, 1000) is None
    # remove_output: a file, a link to a folder (not the folder), a folder.
    fs.remove_output(f"{folder}/a.txt")
    fs.remove_output(f"{folder}/link")
    assert not os.path.lexists(f"{folder}/a.txt") and not os.path.lexists(f"{folder}/link")
    assert os.path.isdir(f"{folder}/sub")
    fs.remove_output(f"{folder}/sub")
    assert not os.path.lexists(f"{folder}/sub")


def test_a_rewrite_within_one_tick_is_caught(root):
    seed = os.path.join(root, "seed.txt")
    assert build(Upper(root))
    st = os.stat(seed)
    with open(seed, "r+") as f:  # same size, same inode, same mtime
        f.write("jello")
    os.utime(seed, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(seed).st_size, os.stat(seed).st_ino, os.stat(seed).st_mtime_ns) == (st.st_size, st.st_ino, st.st_mtime_ns)
    assert not Upper(root).complete()


# private: the block size, and the storage's hash itself, so each block boundary is hit exactly.
@pytest.mark.parametrize("size", [0, 1, hc._BLOCK - 1, hc._BLOCK, hc._BLOCK + 1, 3 * hc._BLOCK + 5])
def test_hashing_reads_every_byte_whatever_the_size(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    entry = hc._hash_file(str(tmp_path / "f"), "sha256")
    assert entry["digest"] == hashlib.sha256(data).hexdigest()
    assert entry["size"] == size


def test_a_fifo_is_an_error_naming_it_and_never_blocks(root):
    os.remove(os.path.join(root, "seed.txt"))
    os.mkfifo(os.path.join(root, "seed.txt"))
    failures = failures_of(Upper, Upper(root))
    assert isinstance(failures[0], hc.HashCheckError) and "seed.txt" in str(failures[0]), failures
    assert ran(root) == []


def test_records_refuse_a_symlinked_records_folder(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    os.symlink(elsewhere, os.path.join(root, ".luigi_hashes"))
    failures = failures_of(Upper, Upper(root))
    assert os.listdir(elsewhere) == []
    assert isinstance(failures[0], hc.HashCheckError) and "symbolic link" in str(failures[0]), failures


def test_a_symlinked_records_folder_is_never_written_or_cleared_through(cli, capsys, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.move(".luigi_hashes", elsewhere / "records")
    os.symlink(elsewhere / "records", ".luigi_hashes")
    before = snapshot(elsewhere)
    _code, _, err = cli_main(["verify", "."], capsys)
    assert "symbolic link" in err
    cli_main(["forget", "."], capsys)
    assert snapshot(elsewhere) == before
    write("raw.txt", "world")  # A reruns, and its record is refused
    failures = failures_of(cli.A, cli.A("."))
    assert isinstance(failures[0], hc.HashCheckError) and "symbolic link" in str(failures[0]), failures
    assert snapshot(elsewhere) == before


# The lock tests take the records folder's lock itself (private): a build takes it only for
# the moment of a write, too short to hold it against another process or thread.


def hold_lock(folder, ready, release):
    with hc._locked(folder, 10):
        ready.set()
        release.wait(20)


def test_a_lock_held_by_another_process_times_out_naming_the_lock_file(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(20)
        with pytest.raises(hc.LockTimeout, match=os.path.join(str(tmp_path), ".lock")), hc._locked(str(tmp_path), 0.2):
            pass
    finally:
        release.set()
        holder.join(20)
    with hc._locked(str(tmp_path), 5):  # free again once the holder is gone
        pass


def test_threads_of_one_process_take_turns(tmp_path):
    order = []

    def writer(n):
        with hc._locked(str(tmp_path), 10):
            order.append(("in", n))
            time.sleep(0.05)
            order.append(("out", n))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(order[k][0] == "in" and order[k + 1] == ("out", order[k][1]) for k in range(0, 8, 2))


def add_under_lock(folder, counter, rounds):
    for _ in range(rounds):
        with hc._locked(folder, 30):
            value = int(read(counter))
            time.sleep(0.001)
            write(counter, str(value + 1))


def test_processes_contending_for_a_lock_lose_no_update(tmp_path):
    import multiprocessing

    counter = str(tmp_path / "counter")
    write(counter, "0")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=add_under_lock, args=(str(tmp_path), counter, 40)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert read(counter) == "160"


def test_a_long_host_name_keeps_temporary_names_short(tmp_path):
    # private: the host part of temporary names has no public view.
    code = "import socket; socket.gethostname = lambda: 'h' * 250; import luigi_hashcheck as hc; print(hc._HOST)"
    result = run_python(["-c", code], cwd=tmp_path)
    host = result.stdout.strip()
    assert result.returncode == 0 and 0 < len(host) <= 64, result.stderr
    assert run_python(["-c", code], cwd=tmp_path).stdout.strip() == host  # the same in every process


def test_leftovers_of_dead_writers_are_cleaned_and_live_ones_kept(root, monkeypatch):
    assert build(Upper(root))
    records = os.path.join(root, ".luigi_hashes")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {  # private: _HOST, as a writer on this host names its temporary files
            "dead": f".upper.txt.json~{hc._HOST}~{dead.stdout.strip()}~aaaaaaaaaaaa.tmp",
            "live": f".upper.txt.json~{hc._HOST}~{live.pid}~bbbbbbbbbbbb.tmp",
            "other host, fresh": ".upper.txt.json~elsewhere~1~cccccccccccc.tmp",
            "other host, old": ".upper.txt.json~elsewhere~1~dddddddddddd.tmp",
        }
        for path in names.values():
            write(os.path.join(records, path), "{half")
        old = time.time() - 3600
        os.utime(os.path.join(records, names["other host, old"]), (old, old))
        assert hc.main(["verify", "--quiet", root]) == 0  # leftovers are not records
        as_new_process()  # a folder is cleaned once per process
        write(os.path.join(root, "seed.txt"), "world")
        assert build(Upper(root))  # writes a record: cleans up under the lock
        left = set(os.listdir(records))
        assert names["dead"] not in left and names["other host, old"] not in left
        assert names["live"] in left and names["other host, fresh"] in left
    finally:
        live.kill()
        live.wait()


def test_a_record_that_is_a_symlink_is_never_written_through(root, tmp_path_factory):
    assert build(Upper(root))
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "target.json"
    write(elsewhere, "keep")
    record_path = os.path.join(root, ".luigi_hashes", "upper.txt.json")
    record = json.loads(read(record_path))
    os.remove(record_path)
    os.symlink(elsewhere, record_path)
    # private: a link made between a build's removal of its stale record and its write
    # cannot be staged through a build (which removes the link, never what it points to).
    with pytest.raises(hc.HashCheckError, match="symbolic link"):
        hc._write_record(record_path, record, hc._settings())
    assert read(elsewhere) == "keep"


###############################################################################
# Hashing #####################################################################
###############################################################################


def test_recorded_digest_is_what_sha256sum_prints(root):
    assert build(Upper(root))
    digest = record_of(os.path.join(root, "upper.txt"))["output"]["digest"]
    assert digest == hashlib.sha256(b"HELLO").hexdigest()
    if shutil.which("sha256sum"):
        out = subprocess.run(["sha256sum", os.path.join(root, "upper.txt")], capture_output=True, text=True, check=True).stdout
        assert out.split()[0] == digest


def test_unchanged_files_are_not_hashed_again(root):
    assert build(Count(root))
    age(root)
    assert build(Count(root))  # re-hashes the aged files once and refreshes the records
    as_new_process()
    assert build(Count(root))
    assert counters["reads"] == 0
    then = time.time() - 50
    os.utime(os.path.join(root, "seed.txt"), (then, then))  # touched, same bytes
    as_new_process()
    assert build(Count(root))
    assert counters["reads"] == 1
    as_new_process()
    assert build(Count(root))  # the touch's new stat fields were recorded
    assert counters["reads"] == 0
    assert ran(root) == ["Upper", "Head", "Count"]


def test_trust_mtime_false_hashes_every_time(root, config):
    assert build(Count(root))
    age(root)
    config("hashcheck", "trust_mtime", "false")
    counters.clear()
    assert build(Count(root))
    assert counters["reads"] >= 4  # seed, upper, head, count at least


def test_directory_output(root):
    assert build(Folder(root))
    assert build(Folder(root, slash=True))  # folder/ and folder are one output
    assert ran(root) == ["Folder"]
    expected = hashlib.sha256(
        f"{hashlib.sha256(b'1').hexdigest()}  one.txt\n{hashlib.sha256(b'2').hexdigest()}  sub/two.txt\n".encode()
    ).hexdigest()
    assert record_of(os.path.join(root, "folder"))["output"]["digest"] == expected
    assert record_of(os.path.join(root, "folder"))["output"]["kind"] == "dir"
    write(os.path.join(root, "folder", "sub", "two.txt"), "changed")
    assert build(Folder(root))
    assert ran(root) == ["Folder"]


def test_a_temporary_folder_that_is_gone_costs_listings_and_a_warning_never_a_wrong_answer(root, monkeypatch, caplog):
    # TMPDIR removed after Python chose it: listings are made in unnamed temporary files, so
    # checks make none. Once misread as "input does not exist", and a touched output was
    # called stale, its build failing.
    assert build(Folder(root))
    age(root)
    assert build(Folder(root)) and ran(root) == ["Folder"]
    monkeypatch.setattr(hc.tempfile, "tempdir", os.path.join(root, "gone"))
    caplog.set_level(logging.WARNING, logger="luigi-interface")
    then = time.time() - 50
    os.utime(os.path.join(root, "folder", "one.txt"), (then, then))  # touched: the same bytes
    as_new_process()
    assert Folder(root).complete() and build(Folder(root)) and ran(root) == []
    warned = [r.getMessage() for r in caplog.records if "temporary file" in r.getMessage()]
    assert len(warned) == 1 and "TMPDIR" in warned[0], warned
    write(os.path.join(root, "folder", "sub", "two.txt"), "changed")
    as_new_process()
    assert not Folder(root).complete()
    assert build(Folder(root)) and ran(root) == ["Folder"]
    assert read(os.path.join(root, "folder", "sub", "two.txt")) == "2"


def test_files_in_a_directory_are_not_hashed_again(root):
    assert build(Folder(root))
    age(root)
    assert build(Folder(root))  # re-hashes the aged files once and refreshes the record
    assert [f[0] for f in listing_of(os.path.join(root, "folder"))] == ["one.txt", "sub/two.txt"]
    as_new_process()
    assert Folder(root).complete()
    assert counters["reads"] == 0
    write(os.path.join(root, "folder", "one.txt"), "9")  # same size, new mtime: hashed, and seen
    assert not Folder(root).complete()


class LinkingFolder(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "linking"))

    def run(self):
        note_run(self.root, "LinkingFolder")
        with self.output().temporary_path() as tmp:
            os.makedirs(tmp)
            write(os.path.join(tmp, "file.txt"), "x")
            os.symlink("nowhere", os.path.join(tmp, "dangling"))
            os.symlink(self.root, os.path.join(tmp, "to-a-folder"))


def test_links_in_a_directory_output_count_by_their_target(root):
    assert build(LinkingFolder(root))
    assert build(LinkingFolder(root))
    assert ran(root) == ["LinkingFolder"]
    os.remove(os.path.join(root, "linking", "dangling"))
    os.symlink("elsewhere", os.path.join(root, "linking", "dangling"))
    assert not LinkingFolder(root).complete()


class LoopFolder(HashCheckingTask):
    """A folder output holding a symbolic link loop, ``a -> b`` and ``b -> a``."""

    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "looped"))

    def run(self):
        note_run(self.root, "LoopFolder")
        with self.output().temporary_path() as tmp:
            os.makedirs(tmp)
            write(os.path.join(tmp, "file.txt"), "x")
            os.symlink("b", os.path.join(tmp, "a"))
            os.symlink("a", os.path.join(tmp, "b"))


class ReadLoopFolder(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root, "raw")

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "listing.txt"))

    def run(self):
        note_run(self.root, "ReadLoopFolder")
        write(self.output().path, " ".join(sorted(os.listdir(self.input().path))))


def test_a_symlink_loop_in_a_folder_output_or_input_counts_by_its_target(root, capsys):
    write(os.path.join(root, "raw", "x.csv"), "1")
    os.symlink("loop2", os.path.join(root, "raw", "loop1"))
    os.symlink("loop1", os.path.join(root, "raw", "loop2"))
    assert build(LoopFolder(root), ReadLoopFolder(root))
    assert sorted(ran(root)) == ["LoopFolder", "ReadLoopFolder"]
    files = {item[0]: item[1] for item in listing_of(os.path.join(root, "looped"))}
    assert files == {"a": "link:b", "b": "link:a", "file.txt": hashlib.sha256(b"x").hexdigest()}
    assert build(LoopFolder(root), ReadLoopFolder(root))
    assert ran(root) == []
    code, out, _ = cli_main(["verify", root], capsys)
    assert code == 0 and out.startswith("2 outputs: 2 ok"), out
    # Pointing a looped link elsewhere changes its name, and so the digest.
    os.remove(os.path.join(root, "raw", "loop2"))
    os.symlink("nowhere", os.path.join(root, "raw", "loop2"))
    code, out, _ = cli_main(["verify", root], capsys)
    assert code == 1 and "stale" in out and "listing.txt" in out, out
    code, out, _ = cli_main(["accept", os.path.join(root, "listing.txt")], capsys)
    assert code == 0 and "accepted" in out, out
    assert build(LoopFolder(root), ReadLoopFolder(root))
    assert ran(root) == []


###############################################################################
# Code fingerprints ###########################################################
###############################################################################


CODE = '''
import os
import luigi
from luigi_hashcheck import HashCheckingTask


def helper(text):
    return text + "HELPER"


class Step(HashCheckingTask):
    """Docstring."""

    root = luigi.Parameter()
    code_version = None
    code_dependencies = (helper,)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "step.txt"))

    def run(self):
        with open(os.path.join(self.root, "runs.log"), "a") as f:
            f.write("Step\\n")
        with self.output().open("w") as f:
            f.write(helper("BODY"))
'''


@pytest.mark.parametrize(
    "old, new, reruns",
    [
        ('"""Docstring."""', '"""Another docstring, longer."""', False),
        ("    def run(self):", "    # a comment\n\n    def run(self):", False),
        ("f.write(helper(\"BODY\"))", "f.write(  helper( \"BODY\" )  )  # spaced", False),
        ('f.write(helper("BODY"))', 'f.write(helper("BODY2"))', True),
        ("code_version = None", "code_version = 2", True),
        ('return text + "HELPER"', 'return text + "HELPER2"', True),
    ],
    ids=["docstring", "comment", "formatting", "code", "code_version", "code_dependency"],
)
def test_code_fingerprint(root, old, new, reruns):
    first = load_module(root, CODE)
    assert build(first.Step(root))
    assert ran(root) == ["Step"]
    assert old in CODE
    second = load_module(root, CODE.replace(old, new))
    assert build(second.Step(root))
    assert ran(root) == (["Step"] if reruns else [])


def test_fingerprint_includes_bases_up_to_hashcheckingtask(root):
    base = CODE.replace("class Step(HashCheckingTask):", "class Base(HashCheckingTask):\n    x = 1\n\n\nclass Step(Base):")
    assert build(load_module(root, base).Step(root))
    assert build(load_module(root, base).Step(root))
    assert ran(root) == ["Step"]
    assert build(load_module(root, base.replace("x = 1", "x = 2")).Step(root))
    assert ran(root) == ["Step"]


def test_a_mixin_after_hashcheckingtask_is_in_the_fingerprint(root):
    source = CODE.replace("class Step(HashCheckingTask):", "class Helpers:\n    x = 1\n\n\nclass Step(HashCheckingTask, Helpers):")
    # private: fingerprints compared class to class; a build only compares one with a record.
    first = hc._fingerprint(load_module(root, source).Step)
    assert first == hc._fingerprint(load_module(root, source).Step)
    assert first != hc._fingerprint(load_module(root, source.replace("x = 1", "x = 2")).Step)


def test_fingerprint_ignores_python_version_details():
    tree = hc.ast.parse("def f(a: int = 1):\n    '''doc'''\n    return a")
    text = hc._ast_text(tree)  # private: the normalised text a fingerprint is taken of
    assert "doc" not in text and "lineno" not in text and "type_params" not in text
    assert text == hc._ast_text(hc.ast.parse("def f(a:int=1):  # comment\n\n    return a"))


def test_a_syntax_tree_too_deep_to_walk_falls_back(root):
    branches = "".join(f"        elif x == {i}:\n            pass\n" for i in range(400))
    source = CODE.replace("    def output(self):", f"    def deep(self, x):\n        if x:\n            pass\n{branches}\n    def output(self):", 1)
    module = load_module(root, source)
    assert build(module.Step(root))
    assert module.Step(root).complete()


def test_the_fingerprint_is_taken_when_the_class_is_defined(root):
    module = load_module(root, CODE, name="fingerprint_at_import")
    path = module.__file__
    write(path, CODE.replace('f.write(helper("BODY"))', 'f.write(helper("EDITED"))'))  # edited after import
    assert build(module.Step(root))
    recorded = record_of(os.path.join(root, "step.txt"))["code"]
    write(path, CODE)
    # private: the fingerprint of the class as defined, to compare with the record's.
    assert recorded == hc._fingerprint(load_module(root, CODE).Step)  # the code that ran


TRICKY_CLASSES = """
import luigi
from luigi_hashcheck import HashCheckingTask


def mark(cls):
    return cls


if True:
    if True:
        class Twice:  # found first, though deeper than the second
            x = 1


class Twice:
    x = 2


@mark
@mark
class Decorated(HashCheckingTask):
    class Inner:
        class Deepest:
            y = 3

    def run(self):
        class InMethod:
            pass


def factory():
    class Local(HashCheckingTask):
        z = 4
    return Local


async def coroutine():
    class InCoroutine:
        pass
"""


def test_a_class_fingerprint_reads_the_source_inspect_gives(root):
    module = load_module(root, TRICKY_CLASSES)
    classes = [module.Decorated, module.Decorated.Inner, module.Decorated.Inner.Deepest, module.factory()]
    for cls in classes:
        # private: the source a class's fingerprint is taken of, found with one parse per file.
        assert hc._getsource(cls) == inspect.getsource(cls), cls
    # A name defined twice, with no function to tell which ran: before Python 3.13, when
    # inspect takes the first, deepest or not, both count; 3.13 finds the one defined.
    twice = hc._getsource(module.Twice)
    assert "x = 2" in twice and ("x = 1" in twice) == (sys.version_info < (3, 13))
    assert hc._getsource(module.Decorated).startswith("@mark\n@mark\nclass Decorated")


TWO_BRANCHES = """
import luigi
from luigi_hashcheck import HashCheckingTask

if False:
    class Chosen(HashCheckingTask):
        def run(self):
            return "the branch not taken"
else:
    class Chosen(HashCheckingTask):
        def run(self):
            return "RESULT"
"""


def test_a_class_defined_in_two_branches_is_fingerprinted_by_the_one_that_runs(root):
    # Before Python 3.13 inspect.getsource gives the first class of a name, here the branch
    # not taken: an edit to the class that runs went unseen, and its stale output passed.
    first = load_module(root, TWO_BRANCHES).Chosen
    edited = load_module(root, TWO_BRANCHES.replace("RESULT", "EDITED")).Chosen
    assert '"RESULT"' in hc._getsource(first) and "not taken" not in hc._getsource(first)
    assert hc._fingerprint(first) != hc._fingerprint(edited)
    # With no function of its own to tell the branches apart, both count.
    plain = TWO_BRANCHES.replace("def run(self):\n            return", "size =")
    assert "def run" not in plain
    assert hc._fingerprint(load_module(root, plain).Chosen) != hc._fingerprint(load_module(root, plain.replace("RESULT", "EDITED")).Chosen)


def test_a_module_of_many_task_classes_is_parsed_once_on_import(root, monkeypatch):
    source = CODE + "".join(f"\n\nclass Many{i}(HashCheckingTask):\n    n = luigi.IntParameter(default={i})\n" for i in range(60))
    whole, parse = [], ast.parse

    def counted(text, *args, **kwargs):
        if len(text) >= len(source):
            whole.append(text)
        return parse(text, *args, **kwargs)

    monkeypatch.setattr(ast, "parse", counted)
    module = load_module(root, source)
    # inspect.getsource parsed the whole file once per class before Python 3.13: 61 parses,
    # and seconds to import a big pipeline module; 3.13 finds classes without a parse.
    assert len(whole) <= 1, len(whole)
    assert module.Many59().n == 59 and hc._fingerprint(module.Many3) != hc._fingerprint(module.Many4)


def test_no_source_falls_back_to_a_stable_fingerprint(tmp_path):
    script = textwrap.dedent(
        """
        import json, os, luigi
        from luigi_hashcheck import HashCheckingTask
        class Inline(HashCheckingTask):
            def output(self):
                return luigi.LocalTarget("inline.txt")
            def run(self):
                with self.output().open("w") as f:
                    f.write("x")
        assert luigi.build([Inline()], local_scheduler=True, log_level="INFO")
        print(json.load(open(".luigi_hashes/inline.txt.json"))["code"])
        """
    )
    first = run_python(["-c", script], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "no source for Inline" in first.stderr
    os.remove(tmp_path / "inline.txt")
    second = run_python(["-c", script], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert first.stdout.split()[-1] == second.stdout.split()[-1]


def test_no_source_fingerprint_sees_an_edit_to_run(tmp_path):
    script = textwrap.dedent(
        """
        import json, luigi
        from luigi_hashcheck import _fingerprint, HashCheckingTask  # private: no output to build
        class Inline(HashCheckingTask):
            def output(self):
                return luigi.LocalTarget("inline.txt")
            def run(self):
                print("BODY")
        print(_fingerprint(Inline))
        """
    )
    first = run_python(["-c", script], cwd=tmp_path)
    again = run_python(["-c", script], cwd=tmp_path)
    edited = run_python(["-c", script.replace('"BODY"', '"EDITED"')], cwd=tmp_path)
    assert first.returncode == again.returncode == edited.returncode == 0, first.stderr
    assert first.stdout == again.stdout != edited.stdout


def test_no_source_fingerprint_is_stable_across_hash_seeds_and_sees_attributes(tmp_path):
    script = textwrap.dedent(
        """
        import luigi
        from luigi_hashcheck import _fingerprint, HashCheckingTask  # private: no output to build
        class Inline(HashCheckingTask):
            COLUMNS = ["a", "b"]
            def output(self):
                return luigi.LocalTarget("inline.txt")
            def run(self):
                return {"x", "y", "z", "w"}
        print(_fingerprint(Inline))
        """
    )
    seeds = {run_python(["-c", script], cwd=tmp_path, env={"PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(seeds) == 1
    edited = run_python(["-c", script.replace('["a", "b"]', '["a", "c"]')], cwd=tmp_path, env={"PYTHONHASHSEED": "1"})
    assert edited.stdout not in seeds


def fallback_fingerprint(source):
    """The fingerprint of class A in ``source``, compiled with no file behind it."""
    namespace = {"HashCheckingTask": HashCheckingTask}
    exec(compile(textwrap.dedent(source), "<no file>", "exec"), namespace)  # noqa: S102 - test code
    return hc._fingerprint(namespace["A"])  # private: a class with no file and no output to build


def test_no_source_fingerprint_sees_attribute_values_and_defaults():
    dated = "import datetime\nclass A(HashCheckingTask):\n    cutoff = datetime.date({})\n"
    assert fallback_fingerprint(dated.format("2024, 1, 1")) != fallback_fingerprint(dated.format("2025, 6, 30"))
    keyed = "class A(HashCheckingTask):\n    def run(self, key=lambda x: x{}):\n        pass\n"
    assert fallback_fingerprint(keyed.format("")) == fallback_fingerprint(keyed.format(""))
    assert fallback_fingerprint(keyed.format("")) != fallback_fingerprint(keyed.format(" + 1"))


def test_code_dependencies_are_the_union_over_the_mro(root):
    source = """
        import luigi
        from luigi_hashcheck import HashCheckingTask

        def first(text):
            return text + "FIRST"

        def second(text):
            return text + "SECOND"

        class Parent(HashCheckingTask):
            code_dependencies = (first,)

        class Child(Parent):
            code_dependencies = (second,)
    """
    before = load_module(root, source)
    after = load_module(root, source.replace('"FIRST"', '"FIRST2"'))
    # private: Parent and Child have no outputs, so only their fingerprints can be compared.
    assert hc._fingerprint(before.Child) != hc._fingerprint(after.Child)
    assert hc._fingerprint(before.Child) == hc._fingerprint(load_module(root, source).Child)


HELPED = """
import os
import luigi
from luigi_hashcheck import HashCheckingTask
import {helper}


class Helped(HashCheckingTask):
    root = luigi.Parameter()
    code_dependencies = ({helper},)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "helped.txt"))

    def run(self):
        with open(os.path.join(self.root, "runs.log"), "a") as f:
            f.write("Helped\\n")
        with self.output().open("w") as f:
            f.write({helper}.clean(" Text "))
"""


@pytest.fixture
def helped(root, monkeypatch):
    """A pipeline whose Helped task lists a helper module in code_dependencies."""
    name = f"helper_{uuid.uuid4().hex[:8]}"
    write(os.path.join(root, name + ".py"), "def clean(text):\n    return text.strip()\n")
    monkeypatch.syspath_prepend(root)
    pipeline = load_module(root, HELPED.format(helper=name))
    return pipeline, sys.modules[name]


def test_a_reloaded_helper_module_reruns_in_the_same_process(root, helped):
    import importlib

    pipeline, helper = helped
    task = pipeline.Helped(root)
    assert build(task)
    assert ran(root) == ["Helped"]
    # Edited on disk but not reloaded: the code that runs is still the old one.
    write(helper.__file__, "def clean(text):\n    return text.strip().lower()\n")
    assert build(task)
    assert ran(root) == []
    importlib.reload(helper)
    assert build(task)
    assert ran(root) == ["Helped"]
    assert read(os.path.join(root, "helped.txt")) == "text"
    assert build(task)
    assert ran(root) == []


def test_a_reloaded_helper_module_changes_the_fingerprint(root, monkeypatch):
    import importlib

    helper_name = f"helpers_{uuid.uuid4().hex[:8]}"
    write(os.path.join(root, helper_name + ".py"), "def clean(text):\n    return text.strip()\n")
    monkeypatch.syspath_prepend(root)
    helper = importlib.import_module(helper_name)
    pipeline = CODE.replace("code_dependencies = (helper,)", f"code_dependencies = (__import__({helper_name!r}),)")
    # private: two definitions of Step in one process, compared without a build (Luigi
    # would call a family defined twice ambiguous).
    first = hc._fingerprint(load_module(root, pipeline).Step)
    write(helper.__file__, "def clean(text):\n    return text.strip().lower()\n")
    importlib.reload(helper)  # as a notebook user would, then run the cell defining Step again
    assert hc._fingerprint(load_module(root, pipeline).Step) != first


def test_code_version_changed_at_run_time_reruns(root, helped):
    pipeline, _helper = helped
    task = pipeline.Helped(root)
    assert build(task)
    pipeline.Helped.code_version = "2"
    assert build(task)
    assert build(task)
    assert ran(root) == ["Helped", "Helped"]


def test_a_module_reloaded_under_from_import_reruns_in_the_next_process(root, monkeypatch):
    # After importlib.reload(), run() may still call a function bound before it (from helpers
    # import f): records written then must not vouch for the new code in a fresh process.
    import importlib

    name = f"helpers_{uuid.uuid4().hex[:8]}"
    write(os.path.join(root, name + ".py"), "def f(x):\n    return x + 'v1'\n")
    monkeypatch.syspath_prepend(root)
    source = f"""
        import os, luigi, {name}
        from {name} import f
        from luigi_hashcheck import HashCheckingTask

        class Bound(HashCheckingTask):
            root = luigi.Parameter()
            code_dependencies = [{name}]

            def output(self):
                return luigi.LocalTarget(os.path.join(self.root, "bound.txt"))

            def run(self):
                with self.output().open("w") as out:
                    out.write(f("x"))
    """
    pipeline = load_module(root, source, name=f"bound_{uuid.uuid4().hex[:8]}")
    assert build(pipeline.Bound(root))
    write(os.path.join(root, name + ".py"), "def f(x):\n    return x + 'v2'\n")
    importlib.invalidate_caches()
    importlib.reload(sys.modules[name])
    assert build(pipeline.Bound(root))
    assert read(os.path.join(root, "bound.txt")) == "xv1"  # the process still runs the old f
    assert build(pipeline.Bound(root))  # and in this process, once is enough
    script = f"import luigi, {pipeline.__name__} as p; assert luigi.build([p.Bound({root!r})], local_scheduler=True)"
    result = run_python(["-c", script], cwd=root)
    assert result.returncode == 0, result.stderr
    assert read(os.path.join(root, "bound.txt")) == "xv2"  # a fresh process, all new code


def test_a_function_in_code_dependencies_counts_again_after_its_module_is_reloaded(root, monkeypatch):
    import importlib

    name = f"helpers_{uuid.uuid4().hex[:8]}"
    write(os.path.join(root, name + ".py"), "def f(x):\n    return x + '1'\n")
    monkeypatch.syspath_prepend(root)
    source = f"""
        import os, luigi, {name}
        from luigi_hashcheck import HashCheckingTask

        class Listed(HashCheckingTask):
            root = luigi.Parameter()
            code_dependencies = [{name}.f]

            def output(self):
                return luigi.LocalTarget(os.path.join(self.root, "listed.txt"))

            def run(self):
                with open(os.path.join(self.root, "runs.log"), "a") as log:
                    log.write("Listed\\n")
                with self.output().open("w") as out:
                    out.write({name}.f("x"))
    """
    pipeline = load_module(root, source, name=f"listed_{uuid.uuid4().hex[:8]}")
    assert build(pipeline.Listed(root))
    write(os.path.join(root, name + ".py"), "def f(x):\n    return x + '2'\n")
    importlib.invalidate_caches()
    importlib.reload(sys.modules[name])
    assert build(pipeline.Listed(root))
    assert build(pipeline.Listed(root))
    assert ran(root) == ["Listed", "Listed"]
    assert read(os.path.join(root, "listed.txt")) == "x2"


###############################################################################
# Records #####################################################################
###############################################################################


class LongName(HashCheckingTask):
    """Upper's text under an output name of its own; ``writer`` says who writes the file."""

    root = luigi.Parameter()
    name = luigi.Parameter()
    writer = luigi.ChoiceParameter(choices=["open", "run"])

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, self.name))

    def run(self):
        note_run(self.root, "LongName")
        text = read(self.input().path).upper()
        if self.writer == "open":  # through Luigi's -luigi-tmp- file, which limits the name to 234
            with self.output().open("w") as dst:
                dst.write(text)
        else:
            write(self.output().path, text)


def long_name(length, char="n"):
    """An output name of ``length`` characters, one of them ``x``, the rest ``char``."""
    return "x" + char * (length - 5) + ".txt"


LONG_NAMES = [(215, "n", "open"), (234, "n", "open"), (240, "n", "run"), (251, "n", "run"), (255, "n", "run"), (126, "é", "run")]


@pytest.mark.parametrize("length, char, writer", LONG_NAMES)
def test_long_output_names_get_shortened_records(root, capsys, length, char, writer):
    name = long_name(length, char)
    assert len(name.encode()) <= 255
    task = LongName(root, name, writer)
    assert build(task)
    assert ran(root) == ["LongName"]
    assert build(task)
    assert ran(root) == []
    records = os.listdir(os.path.join(root, ".luigi_hashes"))
    assert all(len(n.encode()) <= hc._NAME_LIMIT for n in records)  # private: the module's own limit
    (record_name,) = [n for n in records if n.endswith(".json")]
    record_path = os.path.join(root, ".luigi_hashes", record_name)
    assert json.loads(read(record_path))["output"]["path"] == name  # the full name lives inside
    assert verified([root], capsys) == (0, {os.path.join(root, name): ("ok", "")})
    write(os.path.join(root, "seed.txt"), "world")
    assert build(task)
    assert ran(root) == ["LongName"]
    assert read(os.path.join(root, name)) == "WORLD"


def test_shortened_record_names_keep_long_names_apart(tmp_path):
    a, b = long_name(250) + "a", long_name(250) + "b"
    # private: where an output's record lives has no public view but a build of each name.
    paths = {hc._record_path(str(tmp_path / n)) for n in (a, b)}
    assert len(paths) == 2 and all(len(os.path.basename(p).encode()) <= hc._NAME_LIMIT for p in paths)
    assert hc._record_path(str(tmp_path / "short.txt")).endswith(os.path.join(".luigi_hashes", "short.txt.json"))


def test_a_shortened_record_cannot_point_at_another_output(root, capsys):
    task = LongName(root, long_name(240), "run")
    assert build(task)
    (record_path,) = [os.path.join(root, ".luigi_hashes", n) for n in os.listdir(os.path.join(root, ".luigi_hashes")) if n.endswith(".json")]
    record = json.loads(read(record_path))
    record["output"]["path"] = "seed.txt"
    write(record_path, json.dumps(record))
    _code, statuses = verified([root], capsys)
    assert os.path.join(root, "seed.txt") not in statuses and len(statuses) == 1, statuses


DAMAGE = {
    "empty": lambda text: "",
    "truncated": lambda text: text[: len(text) // 2],
    "not JSON": lambda text: "this is not json",
    "not an object": lambda text: "[1, 2, 3]",
    "unknown format": lambda text: text.replace('"format": 1', '"format": 99'),
    "missing key": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "output"}),
    "mistyped key": lambda text: json.dumps(dict(json.loads(text), created_ns="yesterday")),
    "mistyped entry": lambda text: json.dumps(dict(json.loads(text), inputs=[{"path": 1}])),
    "unknown algorithm": lambda text: text.replace('"sha256"', '"rot13"'),
    "huge number": lambda text: json.dumps(dict(json.loads(text), format=10**400)),
    "mistyped files of an input": lambda text: json.dumps(dict(json.loads(text), inputs=[dict(json.loads(text)["inputs"][0], files=[1, 2])])),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_record_means_rebuild_with_one_warning(root, damage, caplog):
    assert build(Count(root))
    ran(root)
    path = os.path.join(root, ".luigi_hashes", "head.txt.json")
    write(path, DAMAGE[damage](read(path)))
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert not Count(root).complete()
        assert build(Count(root))
    warned = [r for r in caplog.records if "damaged record" in r.getMessage()]
    assert len(warned) == 1 and path in warned[0].getMessage()
    assert ran(root) == ["Head"]
    assert record_of(os.path.join(root, "head.txt"))["format"] == 1


def test_a_record_that_is_a_directory_or_a_symlink_is_damaged(root, capsys):
    assert build(Upper(root))
    path = os.path.join(root, ".luigi_hashes", "upper.txt.json")
    output = os.path.join(root, "upper.txt")
    os.remove(path)
    os.mkdir(path)
    code, statuses = verified([output], capsys)
    assert code == 1 and statuses[output][0] == "corrupt", statuses
    os.rmdir(path)
    os.symlink(os.path.join(root, "seed.txt"), path)
    code, statuses = verified([output], capsys)
    assert code == 1 and statuses[output][0] == "corrupt" and "symbolic link" in statuses[output][1], statuses
    assert not Upper(root).complete()


@pytest.mark.parametrize("excluded", [[1], "MANIFEST", ["a\0b"]])
def test_a_mistyped_excluded_list_means_a_damaged_record(root, capsys, excluded):
    write(os.path.join(root, "raw", "x.csv"), "1")
    assert build(Manifest(root))
    path = os.path.join(root, "raw", ".luigi_hashes", "MANIFEST.json")
    record = record_of(os.path.join(root, "raw", "MANIFEST"))
    record["inputs"][0]["later"] = record["later"] = "a key a later version may add"
    write(path, json.dumps(record))
    # private: the record as the module reads it, the unknown keys kept; verify and builds
    # only say whether it is valid.
    assert hc._read_record(path) == record and Manifest(root).complete()
    record["inputs"][0]["excluded"] = excluded
    write(path, json.dumps(record))
    code, statuses = verified([os.path.join(root, "raw", "MANIFEST")], capsys)
    status, reason = statuses[os.path.join(root, "raw", "MANIFEST")]
    assert code == 1 and status == "corrupt" and "excluded" in reason, reason
    assert not Manifest(root).complete()


ENTRY = {"path": "a", "kind": "file", "digest": "d", "size": 1, "mtime_ns": 2, "inode": None, "hashed_ns": 3}


@pytest.mark.parametrize(
    "kind, value, ok",
    [
        ("str", "a b", True),
        ("str", "a\0b", False),  # would become a path
        ("str", b"a", False),
        ("int", 5, True),
        ("int", True, False),  # JSON true is not a number
        ("int", 5.0, False),
        ("int", None, False),
        ("int?", None, True),
        ("params", {"a": "1", "b": "\0"}, True),  # values are data, not paths
        ("params", {"a": 1}, False),
        ("params", ["a"], False),
        ("entry", ENTRY, True),
        ("entry", {k: v for k, v in ENTRY.items() if k != "hashed_ns"}, False),
        ("entry", dict(ENTRY, size="1"), False),
        ("entry", dict(ENTRY, kind="dir", files=[["f", "d", 1, 2, 3, 4]]), True),
        ("entry", dict(ENTRY, kind="dir", files=[["f", "d", 1, 2, 3]]), False),
        ("entry", dict(ENTRY, kind="dir", files=[["f\0", "d", 1, 2, 3, 4]]), False),
        ("entry", dict(ENTRY, kind="dir", files={}), False),
        ("entries", [ENTRY, ENTRY], True),
        ("entries", [ENTRY, dict(ENTRY, path=None)], False),
        ("entries", ENTRY, False),
        ("task", {"family": "T", "params": {}}, True),
        ("task", {"family": "T"}, False),
        ("dynamic", [{"family": "T", "params": {"x": "1"}, "outputs": [ENTRY]}], True),
        ("dynamic", [{"family": "T", "params": {"x": "1"}, "outputs": [dict(ENTRY, digest=7)]}], False),
    ],
)
def test_record_field_kinds(kind, value, ok):
    problem = hc._problem(value, kind)  # private: the schema's own check, kind by kind
    assert (problem is None) == ok, problem


@pytest.fixture
def built(tmp_path):
    """A built Seed -> Upper -> Head -> Count, and the path of Head's record."""
    root = str(tmp_path)
    write(tmp_path / "seed.txt", "hello")
    assert build(Count(root))
    ran(root)
    record_path = os.path.join(root, ".luigi_hashes", "head.txt.json")
    built_records[record_path] = read(record_path)
    return root, record_path


built_records = {}  # record path -> the record as first written


def settle(root, record_path, data):
    """Write ``data`` as Head's record; return what complete() and verify say."""
    with open(record_path, "wb") as f:
        f.write(data)
    answer = Count(root).complete()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        hc.main(["verify", "--json", os.path.join(root, "head.txt")])
    status = json.loads(out.getvalue())["outputs"][0]["status"]
    return answer, status


@pytest.mark.stress
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_fuzzed_bytes_mean_rebuild(built, data):
    root, record_path = built
    assert settle(root, record_path, data) == (False, "corrupt")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats(allow_nan=False)
    | st.text(st.characters(codec="utf-8"), max_size=20) | st.just("\ud800") | st.just("\x00"),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


# Where each kind of field lives in a record, by the kind luigi_hashcheck expects there;
# private: read from the schema's own tables, so a field added there is fuzzed too.
FIELDS = [((key,), kind) for key, kind in hc._RECORD_FIELDS.items()]
FIELDS += [(("task", "family"), "str"), (("task", "params"), "params")]
FIELDS += [((where, *index, key), kind) for where, index in (("output", ()), ("inputs", (0,))) for key, kind in hc._ENTRY_FIELDS.items()]


KIND_OF = {"str": str, "int": int, "int?": int, "params": dict, "task": dict, "entry": dict, "entries": list, "dynamic": list}


def place(record, path):
    """Return (container, key) of ``path`` inside ``record``."""
    for step in path[:-1]:
        record = record[step]
    return record, path[-1]


@pytest.mark.stress
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_records_with_a_missing_or_mistyped_key_mean_rebuild(built, data):
    root, record_path = built
    record = json.loads(built_records[record_path])
    path, kind = data.draw(st.sampled_from(FIELDS))
    container, key = place(record, path)
    if data.draw(st.booleans()):
        del container[key]
    else:
        container[key] = data.draw(JSON_VALUES.filter(lambda value: hc._problem(value, kind) is not None))  # private: see above
    assert settle(root, record_path, json.dumps(record).encode()) == (False, "corrupt")


@pytest.mark.stress
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_values_of_the_right_type_never_raise(built, data):
    root, record_path = built
    record = json.loads(built_records[record_path])
    path, kind = data.draw(st.sampled_from([f for f in FIELDS if f[1] in ("str", "int", "int?")]))
    container, key = place(record, path)
    if kind == "str":
        container[key] = data.draw(st.text(st.characters(codec="utf-8"), max_size=30) | st.just("\ud800\udfff") | st.just("../" * 50))
    else:
        container[key] = data.draw(st.integers(min_value=-(10**40), max_value=10**40))
    answer, status = settle(root, record_path, json.dumps(record).encode())
    assert isinstance(answer, bool) and status in hc._STATUSES  # private: the statuses verify knows
    if answer:  # a record only vouches for what is really on disk
        assert status == "ok"
    assert build(Count(root))  # and a build always ends well


def test_an_oserror_propagates_and_nothing_is_deleted(root, monkeypatch):
    assert build(Count(root))
    ran(root)
    before = sorted(os.listdir(root)) + sorted(os.listdir(os.path.join(root, ".luigi_hashes")))

    def flaky(path, *args):
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(hc, "_read_record", flaky)  # private: no portable way to make a read fail
    with pytest.raises(OSError, match="Input/output"):
        Count(root).complete()
    assert not build(Count(root))
    monkeypatch.undo()
    assert ran(root) == []
    assert sorted(os.listdir(root)) + sorted(os.listdir(os.path.join(root, ".luigi_hashes"))) == before
    assert build(Count(root)) and ran(root) == []


def test_a_write_that_fails_names_the_record_and_leaves_nothing_half_written(root, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hc.os, "fsync", full_disk)  # Luigi's own writes never fsync
    failures = failures_of(Upper, Upper(root))
    monkeypatch.undo()
    assert "upper.txt.json" in str(failures[0]) and "No space left" in str(failures[0])
    assert os.listdir(os.path.join(root, ".luigi_hashes")) == [".lock"]
    assert build(Upper(root))


def failing(error, when):
    """A stand-in for an os call that fails with ``error`` when ``when(path)`` holds."""

    def wrap(real):
        def call(path, *args, **kwargs):
            if when(path if isinstance(path, int) else os.fspath(path), *args):
                raise OSError(error, os.strerror(error), path)
            return real(path, *args, **kwargs)

        return call

    return wrap


@pytest.mark.parametrize(
    "name, error, when",
    [
        ("open", errno.EROFS, lambda path, flags, *mode: ".luigi_hashes" in path and flags & os.O_CREAT),
        ("mkdir", errno.EACCES, lambda path, *mode: path.endswith(".luigi_hashes")),
        ("fsync", errno.ENOSPC, lambda fd: True),
    ],
    ids=["read-only filesystem", "permission denied", "disk full"],
)
def test_an_unwritable_records_folder_fails_the_task_naming_the_record(root, monkeypatch, name, error, when):
    monkeypatch.setattr(hc.os, name, failing(error, when)(getattr(os, name)))
    failures = failures_of(Upper, Upper(root))
    monkeypatch.undo()
    assert os.path.join(root, ".luigi_hashes", "upper.txt.json") in str(failures[0])
    assert os.strerror(error) in str(failures[0])
    records = os.path.join(root, ".luigi_hashes")
    assert not os.path.exists(records) or [n for n in os.listdir(records) if n != ".lock"] == []
    assert build(Upper(root))  # and all is well once the disk is
    assert ran(root) == ["Upper", "Upper"]


def test_a_refresh_never_overwrites_a_newer_record(root):
    assert build(Upper(root))
    path = os.path.join(root, ".luigi_hashes", "upper.txt.json")
    newer = read(path)
    older = dict(json.loads(newer), created_ns=1)
    # private: the race a refresh loses, to a newer record written meanwhile, cannot be
    # staged through a build.
    assert not hc._write_record(path, dict(older, code="x"), hc._settings(), replacing=older)
    assert read(path) == newer


def test_inputs_made_by_a_hashcheckingtask_are_marked_recorded_and_stay_so(root):
    assert build(Count(root))
    assert "recorded" not in record_of(os.path.join(root, "upper.txt"))["inputs"][0]  # Seed is raw data
    assert record_of(os.path.join(root, "count.txt"))["inputs"][0]["recorded"] is True
    before = record_of(os.path.join(root, "count.txt"))
    age(root)  # the next check re-hashes, finds the same digests and refreshes the stat fields
    assert build(Count(root))
    after = record_of(os.path.join(root, "count.txt"))
    assert after["inputs"][0]["mtime_ns"] != before["inputs"][0]["mtime_ns"]
    assert after["inputs"][0]["recorded"] is True


class Relative(HashCheckingTask):
    """Paths relative to the working folder, so a whole tree can move."""

    def requires(self):
        return Seed("data")

    def output(self):
        return luigi.LocalTarget("out/relative.txt")

    def run(self):
        note_run(".", "Relative")
        write(self.output().path, read(self.input().path))


def test_a_copied_tree_stays_valid(tmp_path, monkeypatch):
    write(tmp_path / "a" / "data" / "seed.txt", "hello")
    monkeypatch.chdir(tmp_path / "a")
    assert build(Relative())
    assert record_of("out/relative.txt")["inputs"][0]["path"] == "../data/seed.txt"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    ran(".")
    assert build(Relative())
    assert ran(".") == []


class InProject(HashCheckingTask):
    """Reads one file outside the project, by absolute path, and one inside it."""

    project = luigi.Parameter()
    shared = luigi.Parameter()

    def requires(self):
        return [Seed(os.path.dirname(self.shared), os.path.basename(self.shared)), Seed(self.project, os.path.join("data", "in.txt"))]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.project, "out", "report.txt"))

    def run(self):
        note_run(self.project, "InProject")
        write(self.output().path, "".join(read(t.path) for t in self.input()))


def in_project(tmp_path):
    """A project with a luigi.cfg, and data outside it; return the task and the shared file."""
    project, shared = tmp_path / "project", tmp_path / "shared" / "raw" / "x.csv"
    write(project / "luigi.cfg", "[core]\n")
    write(project / "data" / "in.txt", "in")
    write(shared, "x")
    return InProject(str(project), str(shared)), str(shared)


def test_an_input_outside_the_project_is_named_absolute_so_the_project_can_move(tmp_path):
    task, shared = in_project(tmp_path)
    assert build(task)
    assert ran(task.project) == ["InProject"]
    report = os.path.join(task.project, "out", "report.txt")
    assert [e["path"] for e in record_of(report)["inputs"]] == [shared, "../data/in.txt"]
    looked = []
    real_isfile = os.path.isfile
    with pytest.MonkeyPatch.context() as patch:  # the project root is looked up once per folder and process
        patch.setattr(os.path, "isfile", lambda path: looked.append(path) or real_isfile(path))
        assert build(task)
    assert ran(task.project) == [] and not [p for p in looked if str(p).endswith("luigi.cfg")]
    moved = tmp_path / "elsewhere" / "deeper" / "project"
    os.makedirs(moved.parent)
    os.rename(task.project, moved)
    assert hc.main(["verify", "--quiet", str(moved)]) == 0


def test_the_project_root_can_be_configured(tmp_path, config):
    task, _shared = in_project(tmp_path)
    config("hashcheck", "root", str(tmp_path))
    assert build(task)
    assert [e["path"] for e in record_of(os.path.join(task.project, "out", "report.txt"))["inputs"]] == ["../../shared/raw/x.csv", "../data/in.txt"]


def test_a_record_naming_inputs_the_old_way_stays_valid(tmp_path):
    task, shared = in_project(tmp_path)
    assert build(task)
    ran(task.project)
    report = os.path.join(task.project, "out", "report.txt")
    record = record_of(report)
    record["inputs"][0]["path"] = "../../shared/raw/x.csv"  # as every input was named before project roots
    # private: an old record must carry a valid input hash, which only the module computes.
    pairs = hc._pairs(record["inputs"], record["dynamic"])
    record["input_hash"] = hc._input_hash(record["algorithm"], record["task"]["family"], record["task"]["params"], record["code"], pairs)
    write(os.path.join(task.project, "out", ".luigi_hashes", "report.txt.json"), json.dumps(record))
    assert build(task)
    assert ran(task.project) == []
    write(shared, "y")
    assert build(task)
    assert ran(task.project) == ["InProject"]


###############################################################################
# Targets #####################################################################
###############################################################################


class MemoryTarget(HashableTarget):
    """A third-party target that implements only the three methods (and exists)."""

    store: typing.ClassVar[dict] = {}

    def __init__(self, key):
        self.key = key

    def exists(self):
        return self.key in self.store

    def write(self, data):
        self.store[self.key] = data

    def hash_content(self):
        return hashlib.sha256(self.store[self.key].encode()).hexdigest()

    def get_current_input_hash(self):
        return self.store.get(self.key + "#input_hash")

    def store_input_hash(self, input_hash):
        self.store[self.key + "#input_hash"] = input_hash


def make_local(tmp_path, name):
    target = HashableLocalTarget(os.path.join(str(tmp_path), name))
    target.write = lambda data: write(target.path, data)
    return target


def make_memory(tmp_path, name):
    return MemoryTarget(f"{tmp_path}/{name}")


def test_hashable_target_has_three_methods_of_which_two_are_abstract():
    own = HashableTarget.__abstractmethods__ - luigi.Target.__abstractmethods__
    # hash_content() is one of the three, but not abstract (issue 15): a target written for
    # the proof of concept may lack it, and fails only when used as an input.
    assert own == {"get_current_input_hash", "store_input_hash"}
    assert HashableTarget.hash_content is not luigi.Target.__dict__.get("hash_content")
    assert issubclass(HashableLocalTarget, luigi.LocalTarget)


@pytest.mark.parametrize("make", [make_local, make_memory], ids=["local", "memory"])
def test_hashable_target_contract(tmp_path, make):
    target = make(tmp_path, "t.txt")
    target.write("one")
    first = target.hash_content()
    assert isinstance(first, str) and first == make(tmp_path, "t.txt").hash_content()
    target.write("two")
    assert target.hash_content() != first
    assert target.get_current_input_hash() is None
    target.store_input_hash("abc123")
    assert target.get_current_input_hash() == "abc123"


class ToMemory(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Upper(self.root)

    def output(self):
        return MemoryTarget(self.root + "/memory")

    def run(self):
        note_run(self.root, "ToMemory")
        self.output().write(read(self.input().path))


def test_a_third_party_target_gets_the_input_hash_check_only(root):
    assert build(ToMemory(root))
    assert ran(root) == ["Upper", "ToMemory"]
    assert build(ToMemory(root))
    assert ran(root) == []
    MemoryTarget(root + "/memory").write("edited by hand")  # no output-digest check
    assert build(ToMemory(root))
    assert ran(root) == []
    write(os.path.join(root, "seed.txt"), "world")
    assert build(ToMemory(root))
    assert ran(root) == ["Upper", "ToMemory"]


###############################################################################
# Deciding ####################################################################
###############################################################################


def test_first_build_runs_everything_and_second_nothing(root):
    assert build(Count(root))
    assert ran(root) == ["Upper", "Head", "Count"]
    assert build(Count(root))
    assert ran(root) == []
    assert Count(root).complete()


def test_touch_or_identical_rewrite_runs_nothing(root):
    assert build(Count(root))
    ran(root)
    os.utime(os.path.join(root, "seed.txt"))
    assert build(Count(root))
    assert ran(root) == []
    write(os.path.join(root, "seed.txt"), "hello")
    assert build(Count(root))
    assert ran(root) == []


def test_edit_two_levels_up_is_seen_from_the_top(root):
    assert build(Count(root))
    ran(root)
    write(os.path.join(root, "seed.txt"), "world")
    # Luigi asks only Count; only the recursion into Upper can see the edit.
    assert not Count(root).complete()
    assert build(Count(root))
    assert ran(root) == ["Upper", "Head", "Count"]
    assert read(os.path.join(root, "count.txt")) == "3"


def test_early_cutoff_spares_tasks_below_an_unchanged_output(root, caplog):
    assert build(Count(root))
    ran(root)
    write(os.path.join(root, "seed.txt"), "help!")  # Upper changes, Head stays "HEL"
    with caplog.at_level(logging.INFO, logger="luigi-interface"):
        assert build(Count(root))
    assert ran(root) == ["Upper", "Head"]
    assert any("skipping run()" in r.getMessage() and "Count" in r.getMessage() for r in caplog.records)
    assert build(Count(root))
    assert ran(root) == []


def test_output_edited_by_hand_is_rebuilt(root):
    assert build(Count(root))
    ran(root)
    write(os.path.join(root, "head.txt"), "XYZ")
    assert not Head(root).complete()
    assert build(Count(root))
    # Head is rebuilt to its old bytes, so Count, recorded against those, is spared.
    assert ran(root) == ["Head"]
    assert read(os.path.join(root, "head.txt")) == "HEL"


def test_output_deleted_is_rebuilt(root):
    assert build(Count(root))
    ran(root)
    os.remove(os.path.join(root, "upper.txt"))
    assert build(Count(root))
    assert ran(root) == ["Upper"]


class Param(HashCheckingTask):
    root = luigi.Parameter()
    n = luigi.IntParameter(default=1)
    note = luigi.Parameter(default="", significant=False)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "param.txt"))

    def run(self):
        note_run(self.root, f"Param{self.n}")
        with self.output().open("w") as f:
            f.write("same bytes for every n")


def test_significant_parameters_count_and_insignificant_do_not(root):
    assert build(Param(root, n=1))
    assert build(Param(root, n=1))
    assert ran(root) == ["Param1"]
    assert build(Param(root, n=2))
    assert ran(root) == ["Param2"]
    assert build(Param(root, n=2, note="only a note"))
    assert ran(root) == []
    assert record_of(os.path.join(root, "param.txt"))["task"]["params"] == {"root": root, "n": "2"}


def test_a_task_without_outputs_is_never_complete(root):
    class NoOutput(HashCheckingTask):
        def run(self):
            pass

    with pytest.warns(UserWarning, match="without outputs"):
        assert not NoOutput().complete()


def test_missing_record_reruns_with_a_hint_to_adopt(root, caplog):
    write(os.path.join(root, "upper.txt"), "HELLO")  # made before the conversion
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert not Upper(root).complete()
        assert not Upper(root).complete()
    hints = [r for r in caplog.records if "adopt" in r.getMessage()]
    assert len(hints) == 1 and "upper.txt" in hints[0].getMessage()
    assert build(Upper(root))
    assert ran(root) == ["Upper"]


LEFTOVERS = {
    "none": None,
    "Luigi's": "upper.txt-luigi-tmp-0123456789",
    "ours": os.path.join(".luigi_hashes", ".upper.txt.json~elsewhere~1~aaaaaaaaaaaa.tmp"),
    "another output's": "head.txt-luigi-tmp-0123456789",
}


@pytest.mark.parametrize("leftover", list(LEFTOVERS))
def test_the_missing_record_warning_names_both_cases(root, caplog, leftover):
    write(os.path.join(root, "upper.txt"), "HEL")  # a run() wrote it, then raised; or plain Luigi made it
    if LEFTOVERS[leftover]:
        write(os.path.join(root, LEFTOVERS[leftover]), "half")
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert not Upper(root).complete()
    (message,) = [r.getMessage() for r in caplog.records if "has no record" in r.getMessage()]
    if leftover in ("none", "another output's"):
        assert "built before luigi_hashcheck" in message and "adopt" in message and "a run that failed left it" in message
    else:
        assert "probably a run that failed left it" in message and "adopt" not in message
    assert build(Upper(root))
    assert read(os.path.join(root, "upper.txt")) == "HELLO"


class RawChecked(HashCheckingTask, luigi.ExternalTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "seed.txt"))


class CheckedRaw(luigi.ExternalTask, HashCheckingTask):
    """The same, with the bases the other way round."""

    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "seed.txt"))


class OverExternal(HashCheckingTask):
    root = luigi.Parameter()
    external = luigi.TaskParameter()

    def requires(self):
        return self.external(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"over-{self.external.__name__}.txt"))

    def run(self):
        note_run(self.root, "OverExternal")
        write(self.output().path, read(self.input().path).upper())


@pytest.mark.parametrize("external", [RawChecked, CheckedRaw])
def test_a_hashcheckingtask_that_is_an_external_task_is_external_data(root, external):
    assert external(root).complete()  # its output exists, and external data has no record
    assert build(OverExternal(root, external))
    assert build(OverExternal(root, external))
    assert ran(root) == ["OverExternal"]
    write(os.path.join(root, "seed.txt"), "world")  # hashed as an input downstream
    assert build(OverExternal(root, external))
    assert ran(root) == ["OverExternal"]
    os.remove(os.path.join(root, "seed.txt"))
    assert not external(root).complete()


ORDER = ["a", "b", "c"]


class Reads(HashCheckingTask):
    """Its inputs in the order ORDER gives, as a requires() built from a set would be."""

    root = luigi.Parameter()

    def requires(self):
        return [Seed(self.root, f"{name}.src") for name in ORDER]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "reads.txt"))

    def run(self):
        note_run(self.root, "Reads")
        write(self.output().path, "".join(read(t.path) for t in self.input()))


def test_inputs_in_another_order_rerun_with_a_hint_to_sort_them(root, monkeypatch, caplog, capsys):
    for name in ORDER:
        write(os.path.join(root, f"{name}.src"), name)
    assert build(Reads(root))
    monkeypatch.setattr(sys.modules[__name__], "ORDER", ["c", "a", "b"])
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert hc.main(["explain", "--module", __name__, "Reads", "--root", root]) == 1
    assert "Reads(" in capsys.readouterr().out.split("inputs reordered")[0]
    assert "in another order" in caplog.text and "sort it" in caplog.text
    assert build(Reads(root))
    assert ran(root) == ["Reads", "Reads"]
    assert read(os.path.join(root, "reads.txt")) == "cab"


class Pair(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return {"a": luigi.LocalTarget(os.path.join(self.root, "a.txt")), "b": luigi.LocalTarget(os.path.join(self.root, "b.txt"))}

    def run(self):
        note_run(self.root, "Pair")
        for key, target in self.output().items():
            with target.open("w") as f:
                f.write(key * 3)


class UsePair(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return [Upper(self.root), {"pair": Pair(self.root)}]

    def output(self):
        return [luigi.LocalTarget(os.path.join(self.root, "x.txt")), luigi.LocalTarget(os.path.join(self.root, "y.txt"))]

    def run(self):
        note_run(self.root, "UsePair")
        upper, pair = self.input()
        for target in self.output():
            with target.open("w") as f:
                f.write(read(upper.path) + read(pair["pair"]["b"].path))


def test_dict_and_list_inputs_and_outputs(root):
    assert build(UsePair(root))
    assert sorted(ran(root)) == ["Pair", "Upper", "UsePair"]
    record = record_of(os.path.join(root, "y.txt"))
    assert [e["path"] for e in record["inputs"]] == ["upper.txt", "a.txt", "b.txt"]
    write(os.path.join(root, "b.txt"), "edited")
    assert build(UsePair(root))
    assert ran(root) == ["Pair"]  # b.txt restored byte-identical: UsePair spared
    write(os.path.join(root, "seed.txt"), "world")
    assert build(UsePair(root))
    assert ran(root) == ["Upper", "UsePair"]


class Counted(HashCheckingTask):
    """A chain whose requires() counts its calls and returns a dict, as input() must too."""

    root = luigi.Parameter()
    i = luigi.IntParameter()
    calls: typing.ClassVar[dict] = {}

    def requires(self):
        Counted.calls[self.i] = Counted.calls.get(self.i, 0) + 1
        return {"before": Counted(self.root, self.i - 1) if self.i else Seed(self.root)}

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"counted-{self.i}.txt"))

    def run(self):
        note_run(self.root, f"Counted{self.i}")
        write(self.output().path, read(self.input()["before"].path) + "!")


def test_requires_is_called_once_per_task_and_build(root):
    Counted.calls.clear()
    assert build(Counted(root, 3))  # Luigi alone calls it three times per task run
    assert Counted.calls == {0: 1, 1: 1, 2: 1, 3: 1}
    assert read(os.path.join(root, "counted-3.txt")) == "hello!!!!"
    Counted.calls.clear()
    assert build(Counted(root, 3))
    assert Counted.calls == {0: 1, 1: 1, 2: 1, 3: 1}
    assert ran(root) == ["Counted0", "Counted1", "Counted2", "Counted3"]
    Counted.calls.clear()
    assert Counted(root, 3).input()["before"].path == os.path.join(root, "counted-2.txt")  # outside a build
    assert Counted(root, 3).deps() == [Counted(root, 2)]
    assert Counted.calls == {3: 2}


class OwnDeps(HashCheckingTask):
    """Defines deps() and input() of its own, both through super()."""

    root = luigi.Parameter()

    def requires(self):
        return Upper(self.root)

    def deps(self):
        return super().deps() + [Seed(self.root, "extra.txt")]

    def input(self):
        return [super().input()]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "own-deps.txt"))

    def run(self):
        note_run(self.root, "OwnDeps")
        write(self.output().path, read(self.input()[0].path))


def test_a_task_with_deps_and_input_of_its_own_gets_what_it_defines(root):
    build(OwnDeps(root))
    assert ran(root) == ["Upper"]  # extra.txt, a dependency that is no input, is missing
    write(os.path.join(root, "extra.txt"), "extra")
    assert build(OwnDeps(root))
    assert build(OwnDeps(root))
    assert ran(root) == ["OwnDeps"]
    assert [e["path"] for e in record_of(os.path.join(root, "own-deps.txt"))["inputs"]] == ["upper.txt"]
    write(os.path.join(root, "seed.txt"), "world")
    assert build(OwnDeps(root))
    assert ran(root) == ["Upper", "OwnDeps"]
    assert read(os.path.join(root, "own-deps.txt")) == "WORLD"


class Parts(HashCheckingTask):
    """requires() holds a one-shot iterator below the top level."""

    root = luigi.Parameter()

    def requires(self):
        return {"parts": (Seed(self.root, f"part{n}.txt") for n in range(3))}

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "joined.txt"))

    def run(self):
        write(self.output().path, "".join(read(t.path) for t in self.input()["parts"]))


def test_an_iterator_inside_requires_still_reaches_run(root):
    for n in range(3):
        write(os.path.join(root, f"part{n}.txt"), str(n))
    assert build(Parts(root))
    assert read(os.path.join(root, "joined.txt")) == "012"
    assert len(record_of(os.path.join(root, "joined.txt"))["inputs"]) == 3


class InputFromDeps(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def input(self):
        return [dep.output() for dep in self.deps()]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "input-from-deps.txt"))

    def run(self):
        write(self.output().path, read(self.input()[0].path))


class DepsFromInput(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def deps(self):
        assert self.input().exists()
        return super().deps()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "deps-from-input.txt"))

    def run(self):
        write(self.output().path, read(self.input().path))


@pytest.mark.parametrize("task", [InputFromDeps, DepsFromInput])
def test_deps_and_input_of_its_own_may_call_each_other(root, task):
    assert build(task(root))  # no RecursionError
    assert read(task(root).output().path) == "hello"
    assert build(task(root))
    assert task(root).complete()


class ExtraDependency(HashCheckingTask):
    """A dependency through _requires() that is not an input, as luigi.util.requires allows."""

    root = luigi.Parameter()

    def requires(self):
        return Upper(self.root)

    def _requires(self):
        return luigi.task.flatten(self.requires()) + [Param(self.root)]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "extra.txt"))

    def run(self):
        note_run(self.root, "ExtraDependency")
        write(self.output().path, read(self.input().path))


def test_inputs_are_what_input_returns_even_with_extra_dependencies(root):
    assert build(ExtraDependency(root))
    assert [e["path"] for e in record_of(os.path.join(root, "extra.txt"))["inputs"]] == ["upper.txt"]
    assert build(ExtraDependency(root))
    assert ran(root).count("ExtraDependency") == 1


class Plain(luigi.Task):
    """A task not yet converted, between two that are."""

    root = luigi.Parameter()

    def requires(self):
        return Upper(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "plain.txt"))

    def run(self):
        write(self.output().path, read(self.input().path))


class AbovePlain(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Plain(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "above.txt"))

    def run(self):
        write(self.output().path, read(self.input().path))


def test_a_plain_task_in_between_does_not_hide_a_stale_one(root, caplog):
    assert build(AbovePlain(root))
    assert AbovePlain(root).complete()
    write(os.path.join(root, "seed.txt"), "world")
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert not AbovePlain(root).complete()
    assert any("Plain" in r.getMessage() and "not a HashCheckingTask" in r.getMessage() for r in caplog.records)


class Manifest(HashCheckingTask):
    """Writes a listing of the folder it reads into that very folder."""

    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root, "raw")

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "raw", "MANIFEST"))

    def run(self):
        note_run(self.root, "Manifest")
        names = sorted(set(os.listdir(self.input().path)) - {"MANIFEST", ".luigi_hashes"})
        write(self.output().path, "\n".join(names))


def test_an_output_inside_its_own_input_folder_is_left_out_of_its_digest(root, capsys):
    write(os.path.join(root, "raw", "x.csv"), "1")
    assert build(Manifest(root))
    assert ran(root) == ["Manifest"]
    entry = record_of(os.path.join(root, "raw", "MANIFEST"))["inputs"][0]
    assert entry["excluded"] == ["MANIFEST"] and [item[0] for item in listing_of(os.path.join(root, "raw", "MANIFEST"), entry, os.path.join(root, "raw"))] == ["x.csv"]
    assert build(Manifest(root))
    assert ran(root) == []
    code, out, _ = cli_main(["verify", root], capsys)
    assert code == 0 and out.startswith("1 outputs: 1 ok"), out
    write(os.path.join(root, "raw", "x.csv"), "2")  # a real file in raw/ still counts
    code, out, _ = cli_main(["verify", root], capsys)
    assert code == 1 and "stale" in out, out
    assert build(Manifest(root))
    assert ran(root) == ["Manifest"]
    write(os.path.join(root, "raw", "y.csv"), "3")
    code, out, _ = cli_main(["accept", os.path.join(root, "raw", "MANIFEST")], capsys)
    assert code == 0 and "accepted" in out, out
    assert record_of(os.path.join(root, "raw", "MANIFEST"))["inputs"][0]["excluded"] == ["MANIFEST"]
    assert build(Manifest(root))
    assert ran(root) == []
    os.remove(os.path.join(root, "raw", ".luigi_hashes", "MANIFEST.json"))  # adopt leaves it out too
    assert cli_main(["adopt", "--module", __name__, "Manifest", "--root", root], capsys)[0] == 0
    assert build(Manifest(root))
    assert ran(root) == []


class TwoOutputs(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return [luigi.LocalTarget(os.path.join(self.root, name)) for name in ("a.txt", "b.txt")]

    def run(self):
        for target in self.output():
            write(target.path, "x")


def test_a_stale_task_gets_no_record_refreshed(root):
    assert build(TwoOutputs(root))
    age(root)  # both outputs touched: same bytes, a stat their records could take
    os.remove(os.path.join(root, "b.txt"))
    before = read(os.path.join(root, ".luigi_hashes", "a.txt.json"))
    assert not TwoOutputs(root).complete()
    assert read(os.path.join(root, ".luigi_hashes", "a.txt.json")) == before


def test_a_no_op_build_writes_nothing_when_records_saw_a_file_at_different_times(root):
    assert build(Count(root))
    age(root)
    assert build(Count(root))  # the records take the aged stat fields
    # Head's record saw upper.txt hashed at another moment than Upper's did, as when Head
    # last ran in another process: both still vouch for the file.
    head_record = os.path.join(root, ".luigi_hashes", "head.txt.json")
    record = json.loads(read(head_record))
    record["inputs"][0]["hashed_ns"] += 1
    write(head_record, json.dumps(record))
    records = {name: read(os.path.join(root, ".luigi_hashes", name)) for name in os.listdir(os.path.join(root, ".luigi_hashes")) if name.endswith(".json")}
    for _ in range(2):
        as_new_process()
        assert build(Count(root))
        assert {name: read(os.path.join(root, ".luigi_hashes", name)) for name in records} == records
    assert ran(root) == ["Upper", "Head", "Count"]


class Chain(HashCheckingTask):
    root = luigi.Parameter()
    i = luigi.IntParameter()

    def requires(self):
        return Chain(self.root, self.i - 1) if self.i else Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "chain", f"{self.i}.txt"))

    def run(self):
        with self.input().open() as src, self.output().open("w") as dst:
            dst.write(src.read()[:5])


def test_a_chain_1000_deep_needs_no_python_recursion(root):
    top = Chain(root, 999)
    assert build(top)
    assert len(os.listdir(os.path.join(root, "chain"))) == 1001  # 1000 outputs and .luigi_hashes
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # far below the depth: a recursive walk would fail
    try:
        counters.clear()
        assert top.complete()
        assert counters["record_checks"] == 1000
        write(os.path.join(root, "seed.txt"), "other")
        assert not top.complete()
    finally:
        sys.setrecursionlimit(limit)


def count_build(task, **kwargs):
    as_new_process()
    assert build(task, **kwargs)
    return counters["record_checks"], counters["reads"]


def test_one_check_looks_at_each_file_once(tmp_path):
    module = load_lattice(tmp_path, 4, 5)
    assert build(module.Top(str(tmp_path)))
    counters.clear()
    assert module.Node(str(tmp_path), 4, 0).complete()
    # It reaches 1 + 3 + 4 + 4 + 4 tasks; each output is also the input of up to 3 of them.
    assert counters["record_checks"] == 16
    assert counters["looks"] == 16 + 4  # their outputs, and the seeds


@pytest.mark.stress
def test_cost_grows_linearly_with_the_lattice(tmp_path, monkeypatch):
    # Every file counts as written under _TICK_NS ago, as on a fast machine: on a loaded one a
    # build of 80 tasks outlasts two seconds, its first outputs are then trusted by their stat,
    # and the reads counted would measure the machine's speed, not the cost's growth.
    monkeypatch.setattr(hc, "_TICK_NS", 10**18)
    costs = {}
    for depth in (5, 10, 20):
        root = tmp_path / f"d{depth}"
        root.mkdir()
        module = load_lattice(root, 4, depth)
        top = module.Top(str(root))
        full = count_build(top)
        assert len(ran(str(root))) == 4 * depth
        noop = count_build(top)
        assert ran(str(root)) == []
        costs[depth] = (full, noop)
    for depth, ((full_checks, full_reads), (noop_checks, noop_reads)) in costs.items():
        tasks = 4 * depth
        assert noop_checks == tasks  # each task's records looked at once per build
        assert full_checks <= 5 * tasks  # schedule, 3 dependents' pre-run checks, its own run
        # A full build hashes each output when it is recorded and again after each run() that
        # read it (3 here), plus the seeds before the first layer runs. A no-op build hashes
        # the files written under two seconds ago (all here) at every look (see _TICK_NS).
        assert full_reads <= 4 * tasks + 4 and noop_reads <= 4 * tasks + 4
    # Linear: each added task costs the same, whatever the size of the graph.
    for phase in (0, 1):
        for kind in (0, 1):
            small = (costs[10][phase][kind] - costs[5][phase][kind]) / 20
            large = (costs[20][phase][kind] - costs[10][phase][kind]) / 40
            assert abs(large - small) <= 0.2 * small + 0.01


def counting_checks(monkeypatch, log):
    """Count the judgements of tasks in this process and in forked workers, through a file."""
    real = hc._judge  # private: no public way to count judgements in forked workers

    def counted(task, settings, cache):
        with open(log, "a") as f:
            f.write("x")
        return real(task, settings, cache)

    monkeypatch.setattr(hc, "_judge", counted)


@pytest.mark.stress
def test_early_cutoff_with_forked_workers_stays_linear(tmp_path, monkeypatch):
    checks = {}
    for depth in (20, 40):
        root = tmp_path / f"chain{depth}"
        write(root / "seed.txt", "abcde-1")
        assert build(Chain(str(root), depth - 1), workers=2)
        write(root / "seed.txt", "abcde-2")  # Chain(0) reruns with the same first 5 bytes
        log = tmp_path / f"checks{depth}"
        with monkeypatch.context() as patch:
            counting_checks(patch, log)
            assert build(Chain(str(root), depth - 1), workers=2)
        checks[depth] = len(read(log))
        assert Chain(str(root), depth - 1).complete()
    assert checks[40] <= 2.5 * checks[20], checks


class Leaves(HashCheckingTask, luigi.WrapperTask):
    """A HashCheckingTask with WrapperTask mixed in: no outputs of its own."""

    root = luigi.Parameter()

    def requires(self):
        return [Upper(self.root), Head(self.root)]


def test_a_wrapper_task_mixed_into_a_hashcheckingtask_is_complete_when_what_it_wraps_is(root):
    assert build(Leaves(root))
    assert Leaves(root).complete()
    write(os.path.join(root, "seed.txt"), "world")
    assert not Leaves(root).complete()


###############################################################################
# The task ####################################################################
###############################################################################


class Temporary(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "temporary.txt"))

    def run(self):
        note_run(self.root, "Temporary")
        with self.output().temporary_path() as tmp:
            write(tmp, read(self.input().path) + "!")


def test_rerun_through_temporary_path(root):
    assert build(Temporary(root))
    write(os.path.join(root, "seed.txt"), "world")
    assert build(Temporary(root))  # the stale output was removed first
    assert ran(root) == ["Temporary", "Temporary"]
    assert read(os.path.join(root, "temporary.txt")) == "world!"


def test_check_complete_on_run(root, config):
    config("worker", "check_complete_on_run", "true")
    assert build(Count(root))
    write(os.path.join(root, "seed.txt"), "world")
    assert build(Count(root))
    assert build(Count(root))
    assert ran(root) == ["Upper", "Head", "Count"] * 2


class HalfWritten(luigi.Task):
    """Writes only the first of its two outputs; ``base`` picks plain Luigi or ours."""

    root = luigi.Parameter()

    def output(self):
        return [luigi.LocalTarget(os.path.join(self.root, f"{type(self).__name__}-{n}.txt")) for n in (1, 2)]

    def run(self):
        note_run(self.root, type(self).__name__)
        write(self.output()[0].path, "one")


class HalfWrittenChecked(HashCheckingTask, HalfWritten):
    pass


def test_check_complete_on_run_fails_a_task_that_left_an_output_unwritten(root, config, caplog):
    config("worker", "check_complete_on_run", "true")
    assert not build(HalfWritten(root))  # plain Luigi: "complete() is still returning false"
    assert not build(HalfWrittenChecked(root))
    assert ran(root) == ["HalfWritten", "HalfWrittenChecked"]
    assert "without writing its output" in caplog.text


class Failing(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "failing.txt"))

    def run(self):
        note_run(self.root, "Failing")
        write(self.output().path, "half")
        if os.path.exists(os.path.join(self.root, "fail")):
            raise RuntimeError("boom")


def test_a_failed_run_leaves_no_record(root):
    write(os.path.join(root, "fail"), "")
    assert not build(Failing(root))
    assert os.path.exists(os.path.join(root, "failing.txt"))
    assert not os.path.exists(os.path.join(root, ".luigi_hashes", "failing.txt.json"))
    assert not Failing(root).complete()
    os.remove(os.path.join(root, "fail"))
    assert build(Failing(root))
    assert build(Failing(root))
    assert ran(root) == ["Failing", "Failing"]


class Editor(HashCheckingTask):
    """Edits its own input while it runs, as a second user might."""

    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "edited.txt"))

    def run(self):
        note_run(self.root, "Editor")
        text = read(self.input().path)
        if os.path.exists(os.path.join(self.root, "edit-during-run")):
            os.remove(os.path.join(self.root, "edit-during-run"))
            write(self.input().path, text + " and more")
        write(self.output().path, text)


def test_an_input_edited_during_run_fails_the_task_and_records_nothing(root):
    write(os.path.join(root, "edit-during-run"), "")
    failures = failures_of(Editor, Editor(root))
    assert isinstance(failures[0], hc.InputChangedError)
    assert "seed.txt" in str(failures[0])
    assert not os.path.exists(os.path.join(root, ".luigi_hashes", "edited.txt.json"))
    assert not Editor(root).complete()
    assert build(Editor(root))
    assert ran(root) == ["Editor", "Editor"]
    assert read(os.path.join(root, "edited.txt")) == "hello and more"


class SameStatEditor(HashCheckingTask):
    """Rewrites its input, made moments ago in the same build, without changing its stat."""

    root = luigi.Parameter()

    def requires(self):
        return Upper(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "same-stat.txt"))

    def run(self):
        note_run(self.root, "SameStatEditor")
        path = self.input().path
        text = read(path)
        st = os.stat(path)
        with open(path, "r+") as f:  # same size, same inode
            f.write(text.lower())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
        write(self.output().path, text)


def test_an_input_rewritten_during_run_with_the_same_stat_is_caught(root):
    # Before run() the input's digest may come from when Upper recorded it; only hashing
    # it again after run() can tell that it changed.
    failures = failures_of(SameStatEditor, SameStatEditor(root))
    assert isinstance(failures[0], hc.InputChangedError)
    assert "upper.txt" in str(failures[0])
    assert not os.path.exists(os.path.join(root, ".luigi_hashes", "same-stat.txt.json"))


def lattice_output(path, root):
    """What a lattice node's output must hold, computed from its inputs' current bytes."""
    name = os.path.basename(path)[1:-4]
    layer, i = (int(x) for x in name.split("-"))
    width = len([n for n in os.listdir(root) if n.startswith("seed-")])
    if layer == 0:
        sources = [os.path.join(root, f"seed-{i}.txt")]
    else:
        sources = [os.path.join(root, f"n{layer - 1}-{(i + k) % width}.txt") for k in range(3)]
    text = "".join(read(p) for p in sources)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_records_are_true(root):
    """Every record parses, and none vouches for an output its inputs did not make."""
    records = os.path.join(root, ".luigi_hashes")
    if not os.path.isdir(records):
        return  # killed before its first record: a slow machine, nothing to check
    # private: each record's own verdict, without the upstream rule verify adds, so that
    # every record that vouches for its output is checked.
    checker = hc._Verification(trust_mtime=False)
    for name in os.listdir(records):
        if not name.endswith(".json") or name.startswith("."):
            continue
        record_path = os.path.join(records, name)
        assert hc._read_record(record_path) is not None
        status, _reason, _ = checker.own(record_path)
        output = hc._output_of(record_path)
        if status == "ok":
            assert read(output) == lattice_output(output, root), f"{output} recorded as made from inputs it was not made from"


def crash_rounds(tmp_path, rounds, seed):
    """Kill 3-worker builds at random moments, checking after each that no record lies."""
    import random
    import signal

    rng = random.Random(seed)
    module = load_lattice(tmp_path, 4, 5, pause=0.3)  # a build takes some seconds
    killed = 0
    for _ in range(rounds):
        for i in rng.sample(range(4), 2):  # make much of the graph stale again
            write(tmp_path / f"seed-{i}.txt", f"seed {i} {rng.random()}")
        process = start_build(tmp_path, module, workers=3)
        time.sleep(rng.uniform(0.5, 2.5))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        killed += process.wait(timeout=30) == -signal.SIGKILL
        process.stderr.close()
        check_records_are_true(str(tmp_path))
    assert killed, "no build was killed before it finished"
    process = start_build(tmp_path, module, workers=3)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()
    check_records_are_true(str(tmp_path))
    assert hc.main(["verify", "--quiet", str(tmp_path)]) == 0


@pytest.mark.stress
def test_builds_killed_at_random_moments_never_leave_a_false_record(tmp_path):
    crash_rounds(tmp_path, rounds=5, seed=2024)


@pytest.mark.slow
def test_fifty_kills(tmp_path):
    crash_rounds(tmp_path, rounds=50, seed=7)


class Leaf(HashCheckingTask):
    root = luigi.Parameter()
    name = luigi.Parameter()

    def requires(self):
        return Seed(self.root, f"{self.name}.src")

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"leaf-{self.name}.txt"))

    def run(self):
        note_run(self.root, f"Leaf-{self.name}")
        write(self.output().path, read(self.input().path).upper())


class Dynamic(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "dynamic.txt"))

    def run(self):
        leaves = yield [Leaf(self.root, "a"), Leaf(self.root, "b")]
        note_run(self.root, "Dynamic")
        write(self.output().path, "".join(read(t.path) for t in leaves))


def test_dynamic_dependencies_are_recorded_and_checked(root):
    write(os.path.join(root, "a.src"), "a")
    write(os.path.join(root, "b.src"), "b")
    assert build(Dynamic(root))
    assert sorted(ran(root)) == ["Dynamic", "Leaf-a", "Leaf-b"]
    record = record_of(os.path.join(root, "dynamic.txt"))
    assert [(d["family"], d["params"]["name"]) for d in record["dynamic"]] == [("Leaf", "a"), ("Leaf", "b")]
    assert build(Dynamic(root))
    assert ran(root) == []
    # An edit upstream of a dynamic dependency: only the recorded dependency can reveal it.
    write(os.path.join(root, "b.src"), "B2")
    assert not Dynamic(root).complete()
    assert build(Dynamic(root))
    assert ran(root) == ["Leaf-b", "Dynamic"]
    assert read(os.path.join(root, "dynamic.txt")) == "AB2"
    # A dynamic dependency's output edited by hand. Luigi cannot see Leaf-a until Dynamic
    # yields it again, so Dynamic runs, and its stale output goes first.
    write(os.path.join(root, "leaf-a.txt"), "hand")
    assert build(Dynamic(root))
    assert ran(root) == ["Leaf-a", "Dynamic"]
    assert build(Dynamic(root))
    assert ran(root) == []


class IteratorDynamic(HashCheckingTask):
    """Yields its dynamic dependencies in the shape ``shape`` names, iterators included."""

    root = luigi.Parameter()
    shape = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"iter-{self.shape}.txt"))

    def run(self):
        names = ["a", "b"]
        shapes = {
            "generator": lambda: (Leaf(self.root, n) for n in names),
            "map": lambda: map(functools.partial(Leaf, self.root), names),
            "nested": lambda: [map(functools.partial(Leaf, self.root), names)],
            "dict": lambda: {"leaves": (Leaf(self.root, n) for n in names)},
            "requirements": lambda: luigi.DynamicRequirements(Leaf(self.root, n) for n in names),
        }
        got = yield shapes[self.shape]()
        note_run(self.root, "IteratorDynamic")
        targets = luigi.task.flatten(got)
        write(self.output().path, "".join(read(t.path) for t in targets))


@pytest.mark.parametrize(
    "shape",
    ["generator", "map", "nested", "dict",
     pytest.param("requirements", marks=pytest.mark.skipif(not hasattr(luigi, "DynamicRequirements"), reason="Luigi < 3.2.0 has none"))],
)
def test_dynamic_dependencies_yielded_as_iterators_are_recorded(root, shape):
    write(os.path.join(root, "a.src"), "a")
    write(os.path.join(root, "b.src"), "b")
    assert build(IteratorDynamic(root, shape))
    # run() gets the real paths back, where plain Luigi would send [] for a spent iterator.
    assert read(os.path.join(root, f"iter-{shape}.txt")) == "AB"
    record = record_of(os.path.join(root, f"iter-{shape}.txt"))
    assert [d["params"]["name"] for d in record["dynamic"]] == ["a", "b"]
    ran(root)
    write(os.path.join(root, "b.src"), "B2")
    assert build(IteratorDynamic(root, shape))
    assert ran(root) == ["Leaf-b", "IteratorDynamic"]
    assert read(os.path.join(root, f"iter-{shape}.txt")) == "AB2"
    assert build(IteratorDynamic(root, shape))
    assert ran(root) == []


class Configured(HashCheckingTask):
    """Only ever a dynamic dependency; its ``k`` comes from luigi.cfg."""

    root = luigi.Parameter()
    k = luigi.IntParameter(default=0)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"configured-{self.k}.txt"))

    def run(self):
        note_run(self.root, f"Configured-{self.k}")
        write(self.output().path, str(self.k))


class YieldsConfigured(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "yields-configured.txt"))

    def run(self):
        got = yield Configured(self.root)
        note_run(self.root, "YieldsConfigured")
        write(self.output().path, read(got.path))


def test_a_dynamic_dependency_whose_default_changes_in_luigi_cfg_reruns(root, config):
    # The differential test found it: made again from its parent's record with the old value,
    # the dependency matched its own old record, and nothing reran.
    assert build(YieldsConfigured(root))
    assert record_of(os.path.join(root, "yields-configured.txt"))["dynamic"][0]["defaulted"] == ["k"]
    config("Configured", "k", "1")
    assert not YieldsConfigured(root).complete()
    assert build(YieldsConfigured(root))
    assert build(YieldsConfigured(root))
    assert ran(root) == ["Configured-0", "YieldsConfigured", "Configured-1", "YieldsConfigured"]
    assert read(os.path.join(root, "yields-configured.txt")) == "1"


class HiddenLeaf(HashCheckingTask):
    root = luigi.Parameter()
    token = luigi.Parameter(visibility=luigi.parameter.ParameterVisibility.HIDDEN)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "hidden-leaf.txt"))

    def run(self):
        write(self.output().path, self.token)


class HiddenTop(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "hidden-top.txt"))

    def run(self):
        leaf = yield HiddenLeaf(self.root, token="t1")
        note_run(self.root, "HiddenTop")
        write(self.output().path, read(leaf.path))


def test_a_dynamic_dependency_with_a_hidden_parameter_can_be_rebuilt(root):
    assert build(HiddenTop(root))
    assert build(HiddenTop(root))
    assert ran(root) == ["HiddenTop"]


class InFolder(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Folder(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "folder", "inside.txt"))

    def run(self):
        write(self.output().path, "inside")


def test_output_inside_a_directory_output_is_an_error(root):
    failures = failures_of(InFolder, InFolder(root))
    assert not os.path.exists(os.path.join(root, "folder", ".luigi_hashes"))
    assert isinstance(failures[0], hc.HashCheckError) and "inside" in str(failures[0]), failures


class Beside(HashCheckingTask):
    """Writes into a folder output without requiring its task."""

    root = luigi.Parameter()
    name = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "folder", self.name))

    def run(self):
        note_run(self.root, self.name)
        write(self.output().path, "beside")


def test_every_output_inside_a_directory_output_is_an_error(root):
    assert build(Folder(root))
    # The check is made once per folder and build: a refused folder must stay refused.
    assert not build(Beside(root, "a.txt"), Beside(root, "b.txt"))
    assert sorted(ran(root)) == ["Folder", "a.txt", "b.txt"]
    assert not os.path.exists(os.path.join(root, "folder", ".luigi_hashes"))


class FileAndFolder(HashCheckingTask):
    """A file inside its own folder output, listed first."""

    root = luigi.Parameter()

    def output(self):
        return [luigi.LocalTarget(os.path.join(self.root, "folder", "x.txt")), luigi.LocalTarget(os.path.join(self.root, "folder"))]

    def run(self):
        write(os.path.join(self.root, "folder", "x.txt"), "x")


class Between(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return FileAndFolder(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "between.txt"))

    def run(self):
        write(self.output().path, "between")


class BesideLater(Beside):
    def requires(self):
        return Between(self.root)


def test_an_output_inside_a_folder_output_written_in_the_same_build_is_an_error(root):
    # The folder was found to hold no folder output's files when x.txt got its record; then
    # it got a record as a folder output itself, and y.txt, later in the build, lies inside it.
    assert not build(BesideLater(root, "y.txt"))
    assert ran(root) == ["y.txt"]
    assert record_of(os.path.join(root, "folder"))["output"]["kind"] == "dir"
    assert not os.path.exists(os.path.join(root, "folder", ".luigi_hashes", "y.txt.json"))


class ManifestOfFolder(Manifest):
    """Writes into the folder output of another task it reads."""

    def requires(self):
        return Folder(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "folder", "MANIFEST"))


def test_an_output_inside_an_input_that_is_another_tasks_folder_output_is_an_error(root):
    failures = failures_of(ManifestOfFolder, ManifestOfFolder(root))
    assert len(failures) == 1 and "lies inside" in str(failures[0]), failures
    assert not os.path.exists(os.path.join(root, "folder", ".luigi_hashes"))


class FolderThenFile(FileAndFolder):
    """FileAndFolder's outputs, the folder listed first."""

    def output(self):
        return super().output()[::-1]


@pytest.mark.parametrize("cls", [FileAndFolder, FolderThenFile])
def test_an_output_inside_a_folder_output_of_its_own_task_is_an_error_that_says_so(root, cls):
    # Listed first, x.txt gets its record before the folder has one, and its record is found
    # inside the folder when the task reruns; listed second, x.txt is found inside the folder
    # just recorded.
    assert build(cls(root)) is (cls is FileAndFolder)
    os.remove(os.path.join(root, "folder", "x.txt"))
    failures = failures_of(cls, cls(root))
    message = str(failures[0])
    assert len(failures) == 1 and "lies inside" in message and "same task" in message, message
    assert "another task" not in message and "forget" not in message, message


class Shelf(HashCheckingTask):
    """A folder output without a name, a file inside that folder with one."""

    root = luigi.Parameter()
    name = luigi.Parameter(default="")

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "shelf", self.name))

    def run(self):
        note_run(self.root, f"Shelf({self.name})")
        if self.name:
            write(self.output().path, self.name)
        else:
            write(os.path.join(self.output().path, "one.txt"), "1")


@pytest.mark.parametrize("cls, args, folder", [(Beside, ("a.txt",), "folder"), (Shelf, ("a.txt",), "shelf")])
def test_an_output_inside_another_tasks_folder_output_names_its_record_and_forget(root, capsys, cls, args, folder):
    assert build(Folder(root) if folder == "folder" else Shelf(root))
    ran(root)
    failures = failures_of(cls, cls(root, *args))
    assert ran(root) == ["a.txt" if cls is Beside else "Shelf(a.txt)"]
    message = str(failures[0])
    record = os.path.join(root, ".luigi_hashes", folder + ".json")
    assert len(failures) == 1 and record in message, message
    command = message.split("`")[1]
    assert command == f"python -m luigi_hashcheck forget {os.path.join(root, folder)}"
    assert os.path.exists(record)  # another task's record: never removed by a build
    assert cli_main(command.split()[3:], capsys)[0] == 0
    assert build(cls(root, *args))
    assert os.path.exists(os.path.join(root, folder, ".luigi_hashes", "a.txt.json"))


@pytest.mark.parametrize("cls, args", [(Beside, ("a.txt",)), (Shelf, ("a.txt",))])
def test_a_folder_output_holding_another_tasks_record_names_it_and_forget(root, capsys, cls, args):
    # The file output's task, cls(root, "a.txt"), is another task than the folder's:
    # another family (Beside, Folder) or other parameters (Shelf).
    folder_task = Folder(root) if cls is Beside else cls(root)
    assert build(cls(root, *args))
    ran(root)
    failures = failures_of(type(folder_task), folder_task)
    assert ran(root) == []
    message = str(failures[0])
    record = os.path.join(root, "folder" if cls is Beside else "shelf", ".luigi_hashes", "a.txt.json")
    assert len(failures) == 1 and record in message, message
    command = message.split("`")[1]
    assert command == f"python -m luigi_hashcheck forget {os.path.join(os.path.dirname(os.path.dirname(record)), 'a.txt')}"
    assert os.path.exists(record)  # another task's record: never removed by a build
    assert cli_main(command.split()[3:], capsys)[0] == 0
    assert build(folder_task)
    assert ran(root) == ["Folder" if cls is Beside else "Shelf()"]


class Inner(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "outer", "inner.txt"))

    def run(self):
        write(self.output().path, "inner")


class Outer(HashCheckingTask):
    """A folder output that would swallow the output of a task it requires."""

    root = luigi.Parameter()

    def requires(self):
        return Inner(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "outer"))

    def run(self):
        write(os.path.join(self.output().path, "more.txt"), "more")


def test_a_folder_output_holding_another_output_is_refused_before_anything_is_removed(root):
    failures = failures_of(Outer, Outer(root))
    assert "inner.txt" in str(failures[0]) and "folder output of Outer" in str(failures[0])
    assert read(os.path.join(root, "outer", "inner.txt")) == "inner"
    assert Inner(root).complete()


FEATURES_V1 = """
import os
import luigi
from luigi_hashcheck import HashCheckingTask


class Features(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "data", "features"))

    def run(self):
        with open(os.path.join(self.root, "runs.log"), "a") as log:
            log.write("Features\\n")
        os.makedirs(self.output().path)
        with open(os.path.join(self.output().path, "all.csv"), "w") as f:
            f.write("v1")
"""


FEATURES_V2 = FEATURES_V1.replace('"features"))', '"features", "regions.csv"))').replace(
    """        os.makedirs(self.output().path)
        with open(os.path.join(self.output().path, "all.csv"), "w") as f:
            f.write("v1")""",
    """        with self.output().open("w") as f:
            f.write("v2")""",
)


def test_a_folder_output_that_became_a_file_inside_it_drops_its_stale_record(tmp_path):
    assert FEATURES_V2 != FEATURES_V1
    ns = f"features{uuid.uuid4().hex[:8]}"
    script = f"import luigi, {ns}; print(luigi.build([{ns}.Features({str(tmp_path)!r})], local_scheduler=True, log_level='WARNING'))"
    old_record = tmp_path / "data" / ".luigi_hashes" / "features.json"
    for source, expected in ((FEATURES_V1, ["Features"]), (FEATURES_V2, ["Features"]), (FEATURES_V2, [])):
        write(tmp_path / f"{ns}.py", source)
        result = run_python(["-c", script], cwd=tmp_path)  # a fresh interpreter for each version
        assert result.stdout.split() == ["True"], result.stderr
        assert ran(str(tmp_path)) == expected
    assert not old_record.exists()  # the record only: the files v1 wrote stay
    assert read(tmp_path / "data" / "features" / "all.csv") == "v1"
    assert record_of(tmp_path / "data" / "features" / "regions.csv")["output"]["digest"] == hashlib.sha256(b"v2").hexdigest()
    assert hc.main(["verify", str(tmp_path)]) == 0


def features_build(tmp_path, ns, source):
    """Write the Features module ``ns`` as ``source`` and build it in a fresh interpreter;
    return the tasks that ran."""
    write(tmp_path / f"{ns}.py", source)
    script = f"import luigi, {ns}; print(luigi.build([{ns}.Features({str(tmp_path)!r})], local_scheduler=True, log_level='WARNING'))"
    result = run_python(["-c", script], cwd=tmp_path)
    assert result.stdout.split() == ["True"], result.stderr
    return ran(str(tmp_path))


@pytest.mark.parametrize("versions", [(FEATURES_V2, FEATURES_V1), (FEATURES_V1, FEATURES_V2, FEATURES_V1)], ids=["file-folder", "folder-file-folder"])
def test_a_file_output_whose_folder_became_the_output_drops_its_stale_record(tmp_path, versions):
    # regions.csv's record lies inside the new folder output: this task's own, for an
    # output it no longer has, so it goes with the folder's stale contents.
    ns = f"features{uuid.uuid4().hex[:8]}"
    for source in versions:
        assert features_build(tmp_path, ns, source) == ["Features"]
        assert features_build(tmp_path, ns, source) == []  # and the next build is a no-op
    assert sorted(os.listdir(tmp_path / "data" / "features")) == ["all.csv"]
    assert record_of(tmp_path / "data" / "features")["output"]["kind"] == "dir"
    assert hc.main(["verify", str(tmp_path)]) == 0


class RunsInAMixin:
    def run(self):
        note_run(self.root, "Mixed")
        write(self.output().path, read(self.input().path))


class Mixed(RunsInAMixin, HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "mixed.txt"))


def test_a_run_inherited_from_a_mixin_is_recorded(root):
    assert build(Mixed(root))
    assert build(Mixed(root))
    assert ran(root) == ["Mixed"]
    assert record_of(os.path.join(root, "mixed.txt"))["inputs"][0]["path"] == "seed.txt"


def test_batch_method_parameters_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):

        class Batched(HashCheckingTask):
            day = luigi.Parameter(batch_method=",".join)

    assert any("batch_method" in r.getMessage() and "Batched" in r.getMessage() for r in caplog.records)


class ForgetsMemory(HashCheckingTask):
    """A third-party HashableTarget output its run() never writes."""

    root = luigi.Parameter()

    def output(self):
        return MemoryTarget(f"forgotten-{self.root}")

    def run(self):
        note_run(self.root, "ForgetsMemory")


def test_check_complete_on_run_fails_a_task_that_left_a_third_party_output_unwritten(root, config, caplog):
    config("worker", "check_complete_on_run", "true")
    assert not build(ForgetsMemory(root))
    assert "no input hash stored" in caplog.text


###############################################################################
# Command line ################################################################
###############################################################################


def test_verify_all_ok(cli, capsys):
    code, out, _ = cli_main(["verify"], capsys)
    assert code == 0
    assert out.strip() == "3 outputs: 3 ok, 0 stale, 0 modified, 0 missing, 0 corrupt, 0 unrecorded"


def test_verify_every_status_and_propagation_along_the_chain(cli, capsys):
    write("raw.txt", "world")  # A stale; B and C stale through it
    code, out, _ = cli_main(["verify"], capsys)
    assert code == 1
    lines = out.splitlines()
    assert any(line.startswith("stale") and "a.txt: input raw.txt changed" in line for line in lines)
    assert any(line.startswith("stale") and os.path.join("sub", "b.txt") + ": upstream a.txt is stale" in line for line in lines)
    assert any(line.startswith("stale") and "c.txt: upstream " + os.path.join("sub", "b.txt") + " is stale" in line for line in lines)
    write("raw.txt", "hello")
    write("sub/b.txt", "edited")  # modified outranks nothing; C is stale through B
    os.remove("c.txt")  # missing outranks the upstream problem
    write(".luigi_hashes/a.txt.json", "{")  # corrupt
    code, out, _ = cli_main(["verify", "--json"], capsys)
    assert code == 1
    entries = {entry["path"]: entry for entry in json.loads(out)["outputs"]}
    assert entries["a.txt"]["status"] == "corrupt" and "not JSON" in entries["a.txt"]["reason"]
    assert entries[os.path.join("sub", "b.txt")]["status"] == "modified"
    assert entries["c.txt"]["status"] == "missing"
    assert json.loads(out)["counts"] == {"ok": 0, "stale": 0, "modified": 1, "missing": 1, "corrupt": 1, "unrecorded": 0}


def test_verify_a_single_output_and_a_directory_output(cli, capsys, tmp_path):
    code, out, _ = cli_main(["verify", "sub/b.txt"], capsys)
    assert code == 0 and out.startswith("1 outputs")
    assert build(Folder(str(tmp_path)))
    code, out, _ = cli_main(["verify", "--json", "folder"], capsys)  # the folder is one output
    assert code == 0 and [e["path"] for e in json.loads(out)["outputs"]] == ["folder"]
    write("folder/one.txt", "changed")
    code, out, _ = cli_main(["verify", "folder/"], capsys)
    assert code == 1 and out.startswith("modified  folder")


def test_verify_no_trust_mtime_sees_a_same_tick_rewrite_only_when_asked(cli, capsys):
    age(".")
    cli_main(["accept", "."], capsys)  # records now vouch for the aged stat fields
    st = os.stat("a.txt")
    with open("a.txt", "r+") as f:
        f.write("J")  # same size, inode and mtime: only a hash can tell
    os.utime("a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cli_main(["verify", "a.txt"], capsys)[0] == 0
    code, out, _ = cli_main(["verify", "--no-trust-mtime", "a.txt"], capsys)
    assert code == 1 and out.startswith("modified")


def test_verify_follows_trust_mtime_in_luigi_cfg(cli, capsys, config):
    age(".")
    cli_main(["accept", "."], capsys)
    st = os.stat("a.txt")
    with open("a.txt", "r+") as f:
        f.write("J")
    os.utime("a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    config("hashcheck", "trust_mtime", "false")
    code, out, _ = cli_main(["verify", "a.txt"], capsys)
    assert code == 1 and out.startswith("modified")


def test_verify_usage_errors_exit_2(cli, capsys):
    code, _, err = cli_main(["verify", "no-such-path"], capsys)
    assert code == 2 and "no-such-path" in err
    code, _, err = cli_main(["verify", "raw.txt"], capsys)
    assert code == 2 and "has no record" in err
    assert cli_main(["verify", "--bogus"], capsys)[0] == 2
    assert cli_main(["frobnicate"], capsys)[0] == 2
    assert cli_main([], capsys)[0] == 2
    code, out, _ = cli_main(["verify", "--help"], capsys)
    assert code == 0 and "--no-trust-mtime" in out


def test_verify_ignores_leftover_temporary_files(cli, capsys):
    write(".luigi_hashes/.a.txt.json~host~99999~0123456789ab.tmp", "{half")
    assert cli_main(["verify"], capsys)[0] == 0


def test_verify_needs_no_pipeline_code_and_writes_nothing(cli, tmp_path_factory):
    root = os.getcwd()
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    os.remove(f"{cli.__name__}.py")  # the pipeline cannot be imported at all
    before = snapshot(root)
    env = {"PYTHONPATH": HERE}
    result = subprocess.run([sys.executable, "-m", "luigi_hashcheck", "verify", root], cwd=elsewhere,
                            capture_output=True, text=True, env=dict(os.environ, **env), check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "3 ok" in result.stdout
    write(os.path.join(root, "raw.txt"), "changed")
    result = subprocess.run([sys.executable, "-m", "luigi_hashcheck", "verify", "--quiet", root], cwd=elsewhere,
                            capture_output=True, text=True, env=dict(os.environ, **env), check=False, timeout=60)
    assert result.returncode == 1 and "stale" in result.stdout
    after = snapshot(root)
    assert {k: v for k, v in after.items() if not k.endswith("raw.txt")} == {k: v for k, v in before.items() if not k.endswith("raw.txt")}


def test_verify_calls_an_input_whose_record_is_gone_unrecorded(cli, capsys):
    assert cli_main(["accept", "c.txt"], capsys)[0] == 0
    assert record_of("c.txt")["inputs"][0]["recorded"] is True  # accept keeps the key
    os.remove(os.path.join("sub", ".luigi_hashes", "b.txt.json"))
    code, out, _ = cli_main(["verify"], capsys)
    assert code == 1
    b = os.path.join("sub", "b.txt")
    assert f"unrecorded {b}: no record, though c.txt reads it as a HashCheckingTask's output" in out
    assert f"stale     c.txt: upstream {b} is unrecorded" in out
    assert out.splitlines()[-1] == "3 outputs: 1 ok, 1 stale, 0 modified, 0 missing, 0 corrupt, 1 unrecorded"
    code, out, _ = cli_main(["verify", "--json", "c.txt"], capsys)
    document = json.loads(out)
    assert code == 1 and document["counts"]["unrecorded"] == 1
    assert [(e["path"], e["status"]) for e in document["outputs"]] == [("c.txt", "stale"), (b, "unrecorded")]
    # A record written before the key existed says nothing of its inputs' records.
    record_path = os.path.join(".luigi_hashes", "c.txt.json")
    record = json.loads(read(record_path))
    del record["inputs"][0]["recorded"]
    write(record_path, json.dumps(record))
    assert cli_main(["verify"], capsys)[:2] == (0, "2 outputs: 2 ok, 0 stale, 0 modified, 0 missing, 0 corrupt, 0 unrecorded\n")


def test_verify_of_a_tree_without_records_exits_1(tmp_path, monkeypatch, capsys):
    write(tmp_path / "plain" / "out.txt", "built by plain Luigi")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli_main(["verify"], capsys)
    assert code == 1 and "no records under ." in err and out.startswith("0 outputs")
    code, out, err = cli_main(["verify", "--json", "plain"], capsys)
    assert code == 1 and "no records under plain" in err and json.loads(out)["outputs"] == []


def test_verify_forget_and_accept_find_shortened_records(cli, capsys):
    name = long_name(255)
    write("seed.txt", "hello")
    assert build(LongName(".", name, "run"))
    code, out, _ = cli_main(["verify", "--json"], capsys)
    statuses = {entry["path"]: entry["status"] for entry in json.loads(out)["outputs"]}
    assert code == 0 and statuses[name] == "ok"
    write("seed.txt", "world")  # a harmless change, say
    code, out, _ = cli_main(["verify"], capsys)
    assert code == 1 and f"stale     {name}: input seed.txt changed" in out
    code, out, _ = cli_main(["accept", "."], capsys)
    assert code == 0 and f"accepted {name}: seed.txt" in out
    assert cli_main(["verify", name], capsys)[0] == 0
    code, out, _ = cli_main(["forget", name], capsys)
    assert code == 0 and out.startswith(f"forgot {name}\n")
    assert [n for n in os.listdir(".luigi_hashes") if n.startswith("x")] == []


class Marker(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, ".done"))

    def run(self):
        write(self.output().path, "done")


def test_verify_and_forget_find_outputs_whose_names_start_with_a_dot(root, capsys):
    assert build(Marker(root))
    code, out, _ = cli_main(["verify", root], capsys)
    assert code == 0 and out.startswith("1 outputs")
    write(os.path.join(root, ".done"), "changed")
    assert cli_main(["verify", root], capsys)[0] == 1
    cli_main(["forget", root], capsys)
    assert not os.path.exists(os.path.join(root, ".luigi_hashes", ".done.json"))


def test_verify_shows_progress_only_on_a_terminal(monkeypatch, capsys):
    clock = itertools.count()
    monkeypatch.setattr(hc.time, "monotonic", lambda: next(clock) * 0.5)
    monkeypatch.setattr(hc.sys.stderr, "isatty", lambda: True, raising=False)
    report = hc._progress(10)  # private: a verify slow enough to report progress would take minutes
    for done in range(1, 6):
        report(done)
    assert "checked 5 records" in capsys.readouterr().err
    monkeypatch.setattr(hc.sys.stderr, "isatty", lambda: False, raising=False)
    assert hc._progress(10) is None


def test_show_keeps_a_path_on_another_drive(monkeypatch):
    def other_drive(path, start=None):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(hc.os.path, "relpath", other_drive)
    assert hc._show("/data/x") == "/data/x"  # private: two drives exist only on Windows


def test_hostile_records_cannot_hang_or_reach_outside(tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("tree")
    outside = tmp_path_factory.mktemp("outside")
    write(outside / "precious.txt", "keep me")
    write(root / "out.txt", "output")
    os.mkfifo(root / "fifo")
    os.symlink(outside / "precious.txt", root / "link")
    records = root / ".luigi_hashes"
    records.mkdir()
    entry = {"kind": "file", "digest": "0" * 64, "size": 1, "mtime_ns": 1, "inode": 1, "hashed_ns": 1}
    hostile = [str(outside / "precious.txt"), "../" * 30 + "dev/zero", "/dev/zero", "link", "fifo", "../" + outside.name + "/precious.txt"]
    record = {
        "format": 1, "algorithm": "sha256", "created_ns": 1, "task": {"family": "X", "params": {}}, "code": "c",
        "input_hash": "h", "output": dict(entry, path="out.txt"),
        "inputs": [dict(entry, path=p) for p in hostile],
        "dynamic": [{"family": "os.system", "params": {"command": "touch /tmp/pwned"}, "outputs": [dict(entry, path="/dev/zero")]}],
    }
    write(records / "out.txt.json", json.dumps(record))
    os.symlink(outside / "precious.txt", records / "evil.json")  # a record that is a link
    before_outside = snapshot(outside)
    outputs_before = {p: read(root / p) for p in ("out.txt",)}
    # Each command in a fresh interpreter with a timeout: a hang fails the test, not CI.
    for command in (["verify", str(root)], ["accept", str(root)], ["verify", "--no-trust-mtime", str(root)], ["forget", str(root)]):
        result = run_python(["-m", "luigi_hashcheck", *command], cwd=root, timeout=60)
        assert result.returncode in (0, 1), result.stderr
    assert snapshot(outside) == before_outside
    assert {p: read(root / p) for p in outputs_before} == outputs_before
    assert os.path.exists(root / "fifo") and os.path.islink(root / "link")
    assert not os.path.exists("/tmp/pwned") or os.path.getmtime("/tmp/pwned") < time.time() - 60
    assert sorted(os.listdir(records)) == [".lock"]  # forget removed both records, links only


def test_explain_says_why_and_writes_nothing(cli, capsys):
    code, out, _ = cli_main(["explain", *cli.task("C")], capsys)
    assert code == 0 and "4 tasks: 4 ok" in out
    write("raw.txt", "world")
    before = snapshot(".")
    code, out, _ = cli_main(["explain", *cli.task("C")], capsys)
    assert snapshot(".") == before
    assert code == 1
    lines = out.splitlines()
    assert "upstream task" in lines[0] and "will run" in lines[0]
    assert any("input raw.txt changed" in line for line in lines)
    assert any(line.strip().startswith("ok") and "Raw" in line for line in lines)
    assert ran(".") == []


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda: os.remove("c.txt"), "output missing"),
        (lambda: write("c.txt", "x"), "output modified"),
        (lambda: os.remove(".luigi_hashes/c.txt.json"), "no record"),
    ],
    ids=["missing", "modified", "no record"],
)
def test_explain_reasons(cli, capsys, change, reason):
    change()
    code, out, _ = cli_main(["explain", *cli.task("C")], capsys)
    assert code == 1 and reason in out.splitlines()[0]


def test_explain_parameters_and_code_changed(cli, capsys, tmp_path):
    record = json.loads(read(".luigi_hashes/c.txt.json"))
    write(".luigi_hashes/c.txt.json", json.dumps(dict(record, code="0" * 64)))
    assert "code changed" in cli_main(["explain", *cli.task("C")], capsys)[1]
    write(".luigi_hashes/c.txt.json", json.dumps(dict(record, task={"family": record["task"]["family"], "params": {"root": "elsewhere"}})))
    assert "parameters changed" in cli_main(["explain", *cli.task("C")], capsys)[1]


def test_explain_bad_task_exits_2(cli, capsys):
    code, _, err = cli_main(["explain", "--module", "no_such_module_here", "X"], capsys)
    assert code == 2 and "no_such_module_here" in err
    assert cli_main(["explain", *cli.task("C"), "--no-such-flag", "1"], capsys)[0] == 2
    code, _, err = cli_main(["explain"], capsys)
    assert code == 2 and "needs a task" in err
    code, _, err = cli_main(["explain", "--module", cli.__name__, f"{cli.__name__}.C"], capsys)  # --root missing
    assert code == 2 and "root" in err
    code, out, _ = cli_main(["explain", "--help"], capsys)
    assert code == 0 and "--module" in out


def test_explain_under_a_wrapper_task_writes_nothing(tmp_path, capsys, monkeypatch):
    module = load_lattice(tmp_path, 3, 3)
    assert build(module.Top(str(tmp_path)))
    age(tmp_path)  # every record's stat fields are now out of date: a check would refresh them
    monkeypatch.syspath_prepend(str(tmp_path))
    before = snapshot(tmp_path)
    args = ["--module", module.__name__, f"{module.__name__}.Top", "--root", str(tmp_path)]
    assert cli_main(["explain", *args], capsys)[0] == 0
    assert cli_main(["adopt", "--dry-run", *args], capsys)[0] == 0
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", [["--hashcheck-algorithm", "sha257"], ["--hashcheck-lock-timeout", "soon"], ["--hashcheck-trust-mtime", "maybe"]])
def test_bad_configuration_on_the_command_line_exits_2(cli, capsys, flag):
    code, _, err = cli_main(["explain", *cli.task("C"), *flag], capsys)
    assert code == 2 and err.startswith("luigi-hashcheck:")


def test_adopt_a_tree_built_by_plain_luigi_then_nothing_runs(tmp_path, monkeypatch, capsys):
    ns = f"plain{uuid.uuid4().hex[:8]}"
    write(tmp_path / "raw.txt", "hello")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    plain = load_module(tmp_path, CLI_PIPELINE.format(base="luigi.Task", ns=ns + "p"), name=ns + "p")
    assert build(plain.C("."))
    assert ran(".") == ["A", "B", "C"]
    os.remove("a.txt")  # one output lost: its task is left alone, and named
    converted = load_module(tmp_path, CLI_PIPELINE.format(base="HashCheckingTask", ns=ns), name=ns)
    args = ["adopt", "--module", ns, f"{ns}.C", "--root", "."]
    before = snapshot(".")
    code, out, _ = cli_main([args[0], "--dry-run", *args[1:]], capsys)
    assert snapshot(".") == before
    assert code == 1 and "left alone" in out and "a.txt" in out and "would record" in out
    assert build(converted.A("."))
    ran(".")
    code, out, _ = cli_main(args, capsys)
    assert code == 0 and "recorded" in out and "b.txt" in out and "c.txt" in out
    assert build(converted.C("."))
    assert ran(".") == []


def test_adopt_accepts_a_harmless_code_change(cli, capsys, tmp_path):
    # A real change to C's code that does not alter its output.
    edited = CLI_PIPELINE.format(base="HashCheckingTask", ns=cli.__name__).replace('dst.write(src.read() + "?")', 'dst.write((src.read() + "?").strip())')
    module = load_module(tmp_path, edited, name=cli.__name__)
    assert not module.C(".").complete()
    # A fresh process, as a user would run it: this one now holds two classes named C.
    result = run_python(["-m", "luigi_hashcheck", "adopt", *cli.task("C")], cwd=os.getcwd())
    assert result.returncode == 0, result.stderr
    assert f"recorded {cli.__name__}.C" in result.stdout and "recorded" not in result.stdout.replace(f"recorded {cli.__name__}.C", "")
    assert build(module.C("."))
    assert ran(".") == []


DYNAMIC_PIPELINE = """
import os
import luigi
from luigi_hashcheck import HashCheckingTask

BASE = {base}


class Leaf(BASE):
    task_namespace = "{ns}"
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "leaf.txt"))

    def run(self):
        with self.output().open("w") as f:
            f.write("leaf")


class Top(BASE):
    task_namespace = "{ns}"
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "top.txt"))

    def run(self):
        leaf = yield Leaf(self.root)
        with leaf.open() as src, self.output().open("w") as dst:
            dst.write(src.read() + "!")
"""


def test_adopt_leaves_a_task_with_dynamic_dependencies_alone(tmp_path, monkeypatch, capsys):
    ns = f"dyn{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    plain = load_module(tmp_path, DYNAMIC_PIPELINE.format(base="luigi.Task", ns=ns + "p"), name=ns + "p")
    assert build(plain.Top("."))
    converted = load_module(tmp_path, DYNAMIC_PIPELINE.format(base="HashCheckingTask", ns=ns), name=ns)
    code, out, _ = cli_main(["adopt", "--module", ns, f"{ns}.Top", "--root", "."], capsys)
    assert code == 1 and "yields dynamic dependencies" in out
    assert not os.path.exists(".luigi_hashes/top.txt.json")
    assert build(converted.Top("."))  # a run records what it yields
    assert len(record_of("top.txt")["dynamic"]) == 1
    write(".luigi_hashes/ignored", "")
    code, out, _ = cli_main(["adopt", "--module", ns, f"{ns}.Top", "--root", "."], capsys)
    assert code == 0  # now everything is recorded


def test_forget_removes_records_and_leaves_outputs(cli, capsys):
    outputs = {p: read(p) for p in ("a.txt", "sub/b.txt", "c.txt", "raw.txt")}
    code, out, _ = cli_main(["forget", "sub/b.txt"], capsys)
    assert code == 0 and "forgot" in out
    assert not os.path.exists("sub/.luigi_hashes/b.txt.json") and os.path.exists(".luigi_hashes/a.txt.json")
    code, _, _ = cli_main(["forget", "."], capsys)
    assert code == 0
    assert not os.path.exists(".luigi_hashes/a.txt.json") and not os.path.exists(".luigi_hashes/c.txt.json")
    assert {p: read(p) for p in outputs} == outputs
    assert cli_main(["forget", "nowhere"], capsys)[0] == 2
    assert cli_main(["forget"], capsys)[0] == 2


def test_forget_reports_a_folder_named_like_a_record(cli, capsys):
    os.mkdir(".luigi_hashes/odd.json")
    code, out, _ = cli_main(["forget", "."], capsys)
    assert code == 1 and "is a folder" in out
    assert os.path.isdir(".luigi_hashes/odd.json") and not os.path.exists(".luigi_hashes/a.txt.json")


def test_accept_a_harmless_change_then_nothing_runs(cli, capsys):
    write("raw.txt", "hello ")  # a change the user knows is harmless to A
    code, out, _ = cli_main(["accept", "a.txt"], capsys)
    assert code == 0 and "accepted a.txt: raw.txt" in out
    assert cli_main(["verify"], capsys)[0] == 0
    assert build(cli.C("."))
    assert ran(".") == []
    os.remove("a.txt")
    code, out, _ = cli_main(["accept", "a.txt"], capsys)
    assert code == 1 and "cannot accept" in out


def test_python_dash_m_keeps_hashcheck_flags(cli):
    # python -m runs the file as __main__; without the hand-off, a second hashcheck Config
    # would make Luigi drop --hashcheck-algorithm ("unrecognized arguments").
    os.remove(".luigi_hashes/a.txt.json")
    result = run_python(["-m", "luigi_hashcheck", "adopt", *cli.task("C"), "--hashcheck-algorithm", "md5"], cwd=os.getcwd())
    assert result.returncode == 0, result.stderr
    assert json.loads(read(".luigi_hashes/a.txt.json"))["algorithm"] == "md5"


def test_explain_adopt_forget_and_accept_as_subprocesses(cli):
    write("raw.txt", "world")
    result = run_python(["-m", "luigi_hashcheck", "explain", *cli.task("C")], cwd=os.getcwd())
    assert result.returncode == 1 and "input raw.txt changed" in result.stdout, result.stderr
    result = run_python(["-m", "luigi_hashcheck", "accept", "a.txt"], cwd=os.getcwd())
    assert result.returncode == 0 and "accepted a.txt" in result.stdout, result.stderr
    result = run_python(["-m", "luigi_hashcheck", "explain", *cli.task("C")], cwd=os.getcwd())
    assert result.returncode == 0, result.stdout
    result = run_python(["-m", "luigi_hashcheck", "forget", "c.txt"], cwd=os.getcwd())
    assert result.returncode == 0 and "forgot c.txt" in result.stdout
    result = run_python(["-m", "luigi_hashcheck", "adopt", *cli.task("C")], cwd=os.getcwd())
    assert result.returncode == 0 and "recorded" in result.stdout and "c.txt" in result.stdout, result.stderr
    result = run_python(["-m", "luigi_hashcheck", "verify", "--json"], cwd=os.getcwd())
    assert result.returncode == 0 and json.loads(result.stdout)["counts"]["ok"] == 3


def test_console_script_is_the_same_entry_point(cli):
    script = shutil.which("luigi-hashcheck", path=os.path.dirname(sys.executable)) or shutil.which("luigi-hashcheck")
    if script is None:
        pytest.skip("luigi-hashcheck is not installed here (pip install -e . installs it)")
    result = subprocess.run([script, "verify"], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0 and "3 ok" in result.stdout
    result = subprocess.run([script, "verify", "nowhere"], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2 and "nowhere" in result.stderr


def test_explain_and_adopt_reach_the_dynamic_dependencies_of_a_stale_task(tmp_path):
    write(tmp_path / "luigi.cfg", "[core]\nautoload_range = false\n")
    write(tmp_path / "raw" / "x", "x")
    source = textwrap.dedent('''
        import luigi
        from luigi_hashcheck import HashCheckingTask
        def note(name):
            open("runs.log", "a").write(name + "\\n")
        class Raw(luigi.ExternalTask):
            def output(self):
                return luigi.LocalTarget("raw/x")
        class D(HashCheckingTask):
            def requires(self):
                return Raw()
            def output(self):
                return luigi.LocalTarget("out/d")
            def run(self):
                note("D")
                value = self.input().open().read()  # EDIT
                with self.output().open("w") as f:
                    f.write(value)
        class P(HashCheckingTask):
            def output(self):
                return luigi.LocalTarget("out/p")
            def run(self):
                note("P")
                dep = yield D()  # EDIT
                with self.output().open("w") as f:
                    f.write(dep.open().read())
    ''')
    ns = f"dyn_{uuid.uuid4().hex[:8]}"
    write(tmp_path / f"{ns}.py", source)
    build_p = ["-c", f"import luigi, {ns}; assert luigi.build([{ns}.P()], local_scheduler=True)"]
    assert run_python(build_p, cwd=tmp_path).returncode == 0
    ran(str(tmp_path))
    write(tmp_path / f"{ns}.py", source.replace("# EDIT", "; _unused = 0  # EDIT"))  # a harmless refactor of both
    explained = run_python(["-m", "luigi_hashcheck", "explain", "--module", ns, "P"], cwd=tmp_path)
    assert explained.returncode == 1 and "D(): code changed" in explained.stdout, explained.stdout
    adopted = run_python(["-m", "luigi_hashcheck", "adopt", "--module", ns, "P"], cwd=tmp_path)
    assert adopted.returncode == 0 and "recorded D()" in adopted.stdout and "recorded P()" in adopted.stdout, adopted.stdout
    assert run_python(["-m", "luigi_hashcheck", "explain", "--module", ns, "P"], cwd=tmp_path).returncode == 0
    assert run_python(build_p, cwd=tmp_path).returncode == 0
    assert ran(str(tmp_path)) == []


###############################################################################
# Platform ####################################################################
###############################################################################


class FakeMsvcrt:
    """A stand-in for Windows' msvcrt: byte-range locks kept in a table, by file."""

    LK_UNLCK, LK_NBLCK = 0, 2

    def __init__(self):
        self.held = {}
        self.calls = []

    def locking(self, fd, mode, nbytes):
        key = os.fstat(fd).st_ino
        self.calls.append((mode, os.lseek(fd, 0, os.SEEK_CUR), nbytes))
        if mode == self.LK_NBLCK:
            if key in self.held and self.held[key] != fd:
                raise PermissionError(errno.EACCES, "Permission denied")
            self.held[key] = fd
        else:
            self.held.pop(key, None)


def windows_lock_functions(fake):
    """Compile the module's own Windows branch against the stand-in msvcrt."""
    tree = hc.ast.parse(read(hc.__file__))
    branch = next(
        node for node in tree.body
        if isinstance(node, hc.ast.If) and "os.name" in hc.ast.unparse(node.test) and "nt" in hc.ast.unparse(node.test)
    )
    namespace = {"os": os, "errno": errno}
    saved = sys.modules.get("msvcrt")
    sys.modules["msvcrt"] = fake
    try:
        exec(compile(  # noqa: S102 - the module's own source, to test a branch this OS skips
hc.ast.Module(body=branch.body, type_ignores=[]), hc.__file__, "exec"), namespace)
    finally:
        if saved is None:
            del sys.modules["msvcrt"]
        else:
            sys.modules["msvcrt"] = saved
    return namespace


def test_windows_locks_with_a_stand_in_msvcrt(root, monkeypatch):
    fake = FakeMsvcrt()
    namespace = windows_lock_functions(fake)
    # private: the platform's lock functions, swapped for the Windows ones this OS skips,
    # and the records folder's lock they serve.
    monkeypatch.setattr(hc, "_try_lock", namespace["_try_lock"])
    monkeypatch.setattr(hc, "_unlock", namespace["_unlock"])
    monkeypatch.setattr(hc, "_pid_alive", namespace["_pid_alive"])
    assert build(Count(root))
    assert (FakeMsvcrt.LK_NBLCK, 0, 1) in fake.calls and (FakeMsvcrt.LK_UNLCK, 0, 1) in fake.calls
    assert all(position == 0 for _, position, _ in fake.calls)  # msvcrt locks from the current position
    folder = os.path.join(root, ".luigi_hashes")
    other = os.open(os.path.join(folder, ".lock"), os.O_RDWR)
    try:
        assert namespace["_try_lock"](other)  # another holder
        with pytest.raises(hc.LockTimeout, match=".lock"), hc._locked(folder, 0.1):
            pass
    finally:
        namespace["_unlock"](other)
        os.close(other)
    with hc._locked(folder, 1):
        pass


###############################################################################
# Differential test ###########################################################
###############################################################################


# Edit kinds today's code is known to get wrong (issue 10): dynamic dependencies yielded as
# iterators are recorded as empty (finding 1), and a reloaded helper module or a code_version
# changed at run time goes unseen in the same process (finding 3). Each is left out of the
# random pipelines and edits while it is listed here, so the rest runs green. REMOVE each one
# when its fix lands; the test covers all of them once this set is empty.
_KNOWN_BUGS: set[str] = set()


# "dynamic_dependency_parameter" is not in issue 10; this test found it. A task that is only
# ever a dynamic dependency, and whose parameter changes from outside its parent ([T] k in
# luigi.cfg, --T-k), is rebuilt from the parent's record with the old value, which matches its
# old record, so neither it nor the parent reruns. While listed, the task with the parameter
# is never a dynamic dependency.

# How a task turns its inputs' text into its output. The last three keep the output
# byte-identical for many input edits, so early cutoff is exercised.
_DIFF_FUNCTIONS = {
    "upper": "text = text.upper()",
    "reverse": "text = text[::-1]",
    "count": "text = str(len(text.splitlines())) + '\\n'",
    "first": "text = (text.splitlines(True) or ['\\n'])[0]",
    "sorted": "text = ''.join(sorted(set(text.splitlines(True))))",
}


# How run() yields its dynamic dependencies (the list ``dynamic``); the last three are iterators.
_DIFF_YIELDS = {
    "list": ["yield dynamic"],
    "tuple": ["yield tuple(dynamic)"],
    "dict": ["yield {str(i): d for i, d in enumerate(dynamic)}"],
    "one_by_one": ["yield dynamic[0]", "yield dynamic[1:]"],
    "generator": ["yield (d for d in dynamic)"],
    "map": ["yield map(_same, dynamic)"],
    "nested_map": ["yield [map(_same, dynamic)]"],
}


_DIFF_ITERATOR_YIELDS = {"generator", "map", "nested_map"}


_DIFF_PREAMBLE = '''
import os

import luigi
from luigi.task import flatten

from luigi_hashcheck import HashCheckingTask

import {helper} as helper

NS = {namespace!r}


def _note(task):
    with open(os.path.join(task.root, "runs.log"), "a") as f:
        f.write(type(task).__name__ + "\\n")


def _same(task):
    return task


def _read(targets):
    """The text of files and folders (their files, in sorted order), concatenated."""
    parts = []
    for target in targets:
        if not os.path.isdir(target.path):
            parts.append(open(target.path).read())
            continue
        for folder, dirs, files in os.walk(target.path):
            dirs.sort()
            parts += [open(os.path.join(folder, name)).read() for name in sorted(files)]
    return "".join(parts)


def _emit(target, text, folder):
    if not folder:
        with target.open("w") as f:
            f.write(text)
        return
    lines = text.splitlines(True)
    os.makedirs(os.path.join(target.path, "sub"))
    with open(os.path.join(target.path, "a.txt"), "w") as f:
        f.write("".join(lines[: len(lines) // 2]))
    with open(os.path.join(target.path, "sub", "b.txt"), "w") as f:
        f.write("".join(lines[len(lines) // 2 :]))


class Raw(luigi.ExternalTask):
    task_namespace = NS
    root = luigi.Parameter()
    name = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "raw", self.name))
'''


def _diff_spec(rng):
    """A random pipeline: raw files and 5-10 tasks reading them and each other."""
    raws = {f"r{i}.txt": "".join(f"{rng.choice('abcde')}{rng.randint(0, 9)}\n" for _ in range(rng.randint(1, 4))) for i in range(rng.randint(2, 4))}
    tasks = []
    for i in range(rng.randint(5, 10)):
        sources = [("raw", name) for name in raws] + [("task", j) for j in range(i)]
        picked = rng.sample(sources, min(len(sources), rng.randint(1, 4)))
        cut = rng.randint(0, len(picked)) if rng.random() < 0.4 else len(picked)
        dynamic = picked[cut:]
        style = rng.choice(sorted(_DIFF_YIELDS))
        if "iterator_dynamic" in _KNOWN_BUGS and style in _DIFF_ITERATOR_YIELDS:
            style = "list"
        static = picked[:cut]
        shapes = ["list", "dict", "nested"] + (["one"] if len(static) == 1 else [])
        tasks.append(
            {
                "static": static,
                "shape": rng.choice(shapes),
                "dynamic": dynamic,
                "style": style,
                "function": rng.choice(sorted(_DIFF_FUNCTIONS)),
                "folder": rng.random() < 0.3,
                "helper": rng.random() < 0.4,
                "salt": 0,
                "version": rng.choice([None, 1]),
            }
        )
    tasks[rng.randrange(len(tasks))]["helper"] = True
    param = rng.randrange(len(tasks))
    if "dynamic_dependency_parameter" in _KNOWN_BUGS:
        for task in tasks:
            if ("task", param) in task["dynamic"]:
                task["dynamic"].remove(("task", param))
                task["static"].append(("task", param))
                task["shape"] = "list" if task["shape"] == "one" else task["shape"]
    return {"raws": raws, "tasks": tasks, "param": param, "k": 0, "helper": 0}


def _diff_source_of(source):
    kind, name = source
    return f"Raw(root=self.root, name={name!r})" if kind == "raw" else f"T{name}(root=self.root)"


def _diff_module(spec, namespace, helper):
    """The source text of the pipeline module ``spec`` describes."""
    lines = [_DIFF_PREAMBLE.format(helper=helper, namespace=namespace)]
    for i, task in enumerate(spec["tasks"]):
        deps = [_diff_source_of(s) for s in task["static"]]
        if task["shape"] == "one":
            requires = deps[0]
        elif task["shape"] == "dict":
            requires = "{" + ", ".join(f"'in{n}': {d}" for n, d in enumerate(deps)) + "}"
        elif task["shape"] == "nested":
            requires = "{'head': [" + ", ".join(deps[:1]) + "], 'rest': (" + "".join(d + ", " for d in deps[1:]) + ")}"
        else:
            requires = "[" + ", ".join(deps) + "]"
        name = f"T{i}" if task["folder"] else f"T{i}.txt"
        body = [
            "",
            "",
            f"class T{i}(HashCheckingTask):",
            "    task_namespace = NS",
            "    root = luigi.Parameter()",
            *(["    k = luigi.IntParameter(default=0)"] if spec["param"] == i else []),
            f"    code_version = {task['version']!r}",
            *(["    code_dependencies = (helper,)"] if task["helper"] else []),
            "",
            "    def requires(self):",
            f"        return {requires}",
            "",
            "    def output(self):",
            f"        return luigi.LocalTarget(os.path.join(self.root, 'out', {name!r}))",
            "",
            "    def run(self):",
            "        _note(self)",
            "        dynamic = [" + ", ".join(_diff_source_of(s) for s in task["dynamic"]) + "]",
            *(f"        {line}" for line in (_DIFF_YIELDS[task["style"]] if task["dynamic"] else [])),
            # Read the dynamic dependencies' outputs from the tasks, not from what Luigi sends
            # back, so a dependency the records lost still changes the output.
            "        text = _read(flatten(self.input()) + [d.output() for d in dynamic])",
            f"        {_DIFF_FUNCTIONS[task['function']]}",
            f"        text += '~salt {task['salt']}\\n'",
            *(["        text += '~k %d\\n' % self.k"] if spec["param"] == i else []),
            "        text += '~version %s\\n' % self.code_version",
            *(["        text = helper.mark(text)"] if task["helper"] else []),
            f"        _emit(self.output(), text, {task['folder']!r})",
        ]
        lines += body
    sinks = set(range(len(spec["tasks"]))) - {s[1] for t in spec["tasks"] for s in t["static"] + t["dynamic"] if s[0] == "task"}
    lines += ["", "", "def sinks(root):", "    return [" + ", ".join(f"T{i}(root=root)" for i in sorted(sinks)) + "]", ""]
    return "\n".join(lines)


def _diff_helper(spec):
    return f"def mark(text):\n    return text + '#helper {spec['helper']}\\n'\n"


def _diff_outputs(root):
    """Every file under ``root``/out but the records: {relative path: bytes}."""
    found = {}
    out = os.path.join(root, "out")
    for folder, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if d != hc.RECORD_DIR]
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, out)] = f.read()
    return found


def _diff_owner(relative):
    """The task index whose output holds the file ``relative`` (to out/)."""
    return int(relative.split(os.sep)[0].split(".")[0][1:])


# Edits, each with the modes it runs in: "in" builds in this process with the same task
# instances (as a notebook would), "fresh" in a new interpreter for each build.
_DIFF_IN_PROCESS_BUGS = {"helper": "inprocess_reload", "code_version": "inprocess_code_version"}


_DIFF_EDITS = {
    "raw_changed": {"in", "fresh"},
    "raw_same_bytes": {"in", "fresh"},
    "raw_touched": {"in", "fresh"},
    "output_edited": {"in", "fresh"},
    "output_deleted": {"in", "fresh"},
    "record_deleted": {"in", "fresh"},
    "record_damaged": {"in", "fresh"},
    "parameter": {"in", "fresh"},
    "code_version": {"in", "fresh"},
    "helper": {"in", "fresh"},
    "code": {"fresh"},  # redefining a class in one process makes Luigi call its family ambiguous
}


class _Differential:
    """One seeded random pipeline, built after each of a series of random edits; each
    incremental build is checked against a clean build of the same sources."""

    def __init__(self, seed, mode, folder, set_option, monkeypatch):
        import random

        self.seed, self.mode, self.folder, self.set_option = seed, mode, str(folder), set_option
        self.rng = random.Random(f"{seed}-{mode}")
        self.spec = _diff_spec(self.rng)
        self.history = []
        self.tag = f"d{seed}_{mode}_{uuid.uuid4().hex[:8]}"
        self.namespace = self.tag
        self.src = os.path.join(self.folder, "src")
        self.root = os.path.join(self.folder, "build")
        self.cleans = 0
        # Python would take an edited file of the same size, in the same second, from its
        # stale bytecode cache, so never write one.
        monkeypatch.setattr(sys, "dont_write_bytecode", True)
        monkeypatch.syspath_prepend(self.src)
        self.helper_name = f"helper_{self.tag}"
        self.module_name = f"pipe_{self.tag}"
        write(os.path.join(self.src, self.helper_name + ".py"), _diff_helper(self.spec))
        write(os.path.join(self.src, self.module_name + ".py"), self.source())
        self.options = [("worker", "wait_interval", "0.01"), ("worker", "wait_jitter", "0")]
        for option in self.options:
            set_option(*option)
        self.set_parameter()
        if mode == "in":
            self.helper = importlib.import_module(self.helper_name)
            self.module = load_module(self.src, self.source(), self.module_name)
        self.write_raws(self.root)
        self.snapshot = None  # {task index: its output's files} after the last clean build

    def source(self):
        return _diff_module(self.spec, self.namespace, self.helper_name)

    def set_parameter(self):
        self.parameter = (f"{self.namespace}.T{self.spec['param']}", "k", str(self.spec["k"]))
        self.set_option(*self.parameter)

    def write_raws(self, root):
        for name, text in self.spec["raws"].items():
            write(os.path.join(root, "raw", name), text)

    # -- the graph ------------------------------------------------------------

    def downstream(self, tasks, raws=()):
        """``tasks`` and every task that reads one of them or one of ``raws``, however far."""
        cone = set(tasks)
        for i, task in enumerate(self.spec["tasks"]):
            for kind, name in task["static"] + task["dynamic"]:
                if (kind == "raw" and name in raws) or (kind == "task" and name in cone):
                    cone.add(i)
        return cone

    def task_of(self, i):
        return f"T{i}"

    # -- building -------------------------------------------------------------

    def builds(self, jobs):
        """Build the sinks for each (root, workers) in ``jobs``, in order, in this process or
        in one fresh interpreter; return the set of tasks whose run() each build entered."""
        if self.mode == "in":
            runs = []
            for root, workers in jobs:
                if not build(*self.module.sinks(root), workers=workers):
                    self.fail(f"luigi.build returned False for {root}")
                runs.append(ran(root))
        else:
            job = {"module": self.module_name, "config": [*self.options, self.parameter], "jobs": jobs}
            result = run_python(["-c", _DIFF_DRIVER, json.dumps(job)], cwd=self.src, env={"PYTHONDONTWRITEBYTECODE": "1"})
            if result.returncode != 0:
                self.fail(f"a build in a fresh interpreter failed:\n{result.stderr[-3000:]}")
            runs = [ran(os.path.join(root, str(n))) for n, (root, _workers) in enumerate(jobs)]
        # A generator run() is entered again after Luigi abandons it for new dependencies.
        return [{int(name[1:]) for name in names} for names in runs]

    def fail(self, message):
        pytest.fail(
            f"differential test, seed {self.seed}, mode {self.mode!r} (_KNOWN_BUGS={sorted(_KNOWN_BUGS)}): {message}\n"
            f"edits so far:\n  " + "\n  ".join(self.history or ["(first build)"]) + f"\nmodule:\n{self.source()}",
            pytrace=False,
        )

    def step(self, touched, last=False):
        """Build incrementally and from clean, then check the three promises.

        :param touched: the tasks the edit changed directly, or None for the first build.
        """
        workers = self.rng.choice([1, 1, 1, 2])
        self.cleans += 1
        clean = os.path.join(self.folder, f"clean{self.cleans}")
        self.write_raws(clean)
        runs, _, again = self.builds([(self.root, workers), (clean, 1), (self.root, 1)])
        expected, got = _diff_outputs(clean), _diff_outputs(self.root)
        if got != expected:
            wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            self.fail(
                "outputs differ from a clean build: "
                + "; ".join(f"{k}: got {got.get(k)!r}, clean build made {expected.get(k)!r}" for k in wrong)
            )
        if again:
            self.fail(f"a second build ran {sorted(again)}")
        # In fresh mode the second build shares the first one's interpreter; now and then,
        # and after the last edit, a third one has an interpreter of its own.
        if self.mode == "fresh" and (last or self.rng.random() < 0.25):
            (again,) = self.builds([(self.root, 1)])
            if again:
                self.fail(f"a build in another fresh interpreter ran {sorted(again)}")
        snapshot = {}
        for relative, data in expected.items():
            snapshot.setdefault(_diff_owner(relative), {})[relative] = data
        every = set(range(len(self.spec["tasks"])))
        if touched is None:
            if runs != every:
                self.fail(f"the first build ran {sorted(runs)}, not every task")
        else:
            direct, raws = touched
            cone = self.downstream(direct, raws)
            if runs - cone:
                self.fail(f"ran {sorted(runs)}: {sorted(runs - cone)} outside the downstream cone {sorted(cone)} of the edit")
            # Tighter: only a task touched directly, one whose inputs changed, or one with a
            # dynamic dependency in the cone (it must yield again to see it) may run.
            changed_raws = set(raws)
            needed = set(direct)
            for i, task in enumerate(self.spec["tasks"]):
                for kind, name in task["static"] + task["dynamic"]:
                    if kind == "raw" and name in changed_raws:
                        needed.add(i)
                    if kind == "task" and snapshot.get(name) != self.snapshot.get(name):
                        needed.add(i)
                    if kind == "task" and (kind, name) in task["dynamic"] and name in cone:
                        needed.add(i)
            if runs - needed:
                self.fail(f"ran {sorted(runs)}: {sorted(runs - needed)} though their inputs, parameters and code did not change (early cutoff)")
        self.snapshot = snapshot
        shutil.rmtree(clean)

    # -- edits ----------------------------------------------------------------

    def edit(self):
        """Make one random edit; return (tasks it touched directly, raw files whose bytes changed)."""
        rng, spec = self.rng, self.spec
        kinds = sorted(k for k, modes in _DIFF_EDITS.items() if self.mode in modes)
        if self.mode == "in":
            kinds = [k for k in kinds if _DIFF_IN_PROCESS_BUGS.get(k) not in _KNOWN_BUGS]
        kind = rng.choice(kinds)
        n = len(spec["tasks"])
        i = rng.randrange(n)
        raw = rng.choice(sorted(spec["raws"]))
        raw_path = os.path.join(self.root, "raw", raw)
        output = os.path.join(self.root, "out", f"T{i}" if spec["tasks"][i]["folder"] else f"T{i}.txt")
        record = os.path.join(self.root, "out", hc.RECORD_DIR, os.path.basename(output) + ".json")
        direct, raws, what = set(), set(), ""
        if kind == "raw_changed":
            lines = spec["raws"][raw].splitlines(True)
            how = rng.choice(["append", "last", "first", "duplicate"])
            if how == "append":
                lines.append(f"z{rng.randint(0, 99)}\n")
            elif how == "duplicate":
                lines.append(rng.choice(lines))
            else:
                at = -1 if how == "last" else 0
                lines[at] = lines[at].rstrip("\n") + "x\n"
            spec["raws"][raw] = "".join(lines)
            write(raw_path, spec["raws"][raw])
            raws, what = {raw}, f"{raw}: {how} -> {spec['raws'][raw]!r}"
        elif kind == "raw_same_bytes":
            write(raw_path, spec["raws"][raw])
            what = raw
        elif kind == "raw_touched":
            later = time.time() + rng.choice([0, 5])
            os.utime(raw_path, (later, later))
            what = raw
        elif kind == "output_edited":
            if spec["tasks"][i]["folder"]:
                how = rng.choice(["a.txt", os.path.join("sub", "b.txt"), "extra.txt"])
                write(os.path.join(output, how), "by hand\n")
                what = f"T{i}/{how}"
            else:
                write(output, "by hand\n")
                what = f"T{i}"
            direct = {i}
        elif kind == "output_deleted":
            if spec["tasks"][i]["folder"]:
                shutil.rmtree(output)
            else:
                os.remove(output)
            direct, what = {i}, f"T{i}"
        elif kind == "record_deleted":
            os.remove(record)
            direct, what = {i}, f"T{i}"
        elif kind == "record_damaged":
            data = read(record)
            how = rng.choice(["truncated", "empty", "not json"])
            write(record, {"truncated": data[: len(data) // 2], "empty": "", "not json": "{]"}[how])
            direct, what = {i}, f"T{i}: {how}"
        elif kind == "parameter":
            i = spec["param"]
            spec["k"] += 1
            self.set_parameter()
            direct, what = {i}, f"T{i}.k = {spec['k']}"
        elif kind == "code_version":
            task = spec["tasks"][i]
            task["version"] = (task["version"] or 0) + 1
            if self.mode == "in":
                getattr(self.module, f"T{i}").code_version = task["version"]  # as a notebook would, at run time
            direct, what = {i}, f"T{i}.code_version = {task['version']}"
        elif kind == "helper":
            spec["helper"] += 1
            write(os.path.join(self.src, self.helper_name + ".py"), _diff_helper(spec))
            if self.mode == "in":
                importlib.reload(self.helper)
            direct = {j for j, task in enumerate(spec["tasks"]) if task["helper"]}
            what = f"mark() now adds '#helper {spec['helper']}', used by {sorted(direct)}"
        elif kind == "code":
            spec["tasks"][i]["salt"] += 1
            direct, what = {i}, f"T{i}.run() now adds '~salt {spec['tasks'][i]['salt']}'"
        if self.mode == "fresh":
            write(os.path.join(self.src, self.module_name + ".py"), self.source())
        self.history.append(f"{kind} {what}".rstrip())
        return direct, raws

    def run(self, edits):
        self.step(None)
        for n in range(edits):
            self.step(self.edit(), last=n == edits - 1)


# Runs the builds of one step in a fresh interpreter; each build's run log is kept as
# runs.log in a folder named by its place in the job, for the test to read.
_DIFF_DRIVER = """
import importlib, json, os, sys
import luigi, luigi.configuration
job = json.loads(sys.argv[1])
parser = luigi.configuration.get_config()
for section, key, value in job["config"]:
    if not parser.has_section(section):
        parser.add_section(section)
    parser.set(section, key, value)
module = importlib.import_module(job["module"])
for n, (root, workers) in enumerate(job["jobs"]):
    if not luigi.build(module.sinks(root), local_scheduler=True, log_level="WARNING", workers=workers):
        sys.exit("luigi.build returned False for " + root)
    os.makedirs(os.path.join(root, str(n)), exist_ok=True)
    if os.path.exists(os.path.join(root, "runs.log")):
        os.replace(os.path.join(root, "runs.log"), os.path.join(root, str(n), "runs.log"))
"""


@pytest.mark.stress
@pytest.mark.parametrize("seed", range(20))
def test_differential_in_process(tmp_path, config, monkeypatch, seed):
    _Differential(seed, "in", tmp_path, config, monkeypatch).run(edits=8)


@pytest.mark.stress
@pytest.mark.parametrize("seed", range(2))
def test_differential_fresh_interpreters(tmp_path, config, monkeypatch, seed):
    _Differential(seed, "fresh", tmp_path, config, monkeypatch).run(edits=8)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20, 520))
def test_differential_in_process_many_seeds(tmp_path, config, monkeypatch, seed):
    _Differential(seed, "in", tmp_path, config, monkeypatch).run(edits=8)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 102))
def test_differential_fresh_interpreters_many_seeds(tmp_path, config, monkeypatch, seed):
    _Differential(seed, "fresh", tmp_path, config, monkeypatch).run(edits=8)


###############################################################################
# Seeing why ##################################################################
###############################################################################


class WhyRaw(luigi.ExternalTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "raw<b>.txt"))  # the visualiser reads HTML


class WhyClean(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return WhyRaw(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "clean.txt"))

    def run(self):
        note_run(self.root, "WhyClean")
        write(self.output().path, read(self.input().path).upper())


class WhyHead(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return WhyClean(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "head.txt"))

    def run(self):
        note_run(self.root, "WhyHead")
        write(self.output().path, read(self.input().path)[:3])


class WhyCount(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return WhyHead(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "count.txt"))

    def run(self):
        note_run(self.root, "WhyCount")
        write(self.output().path, str(len(read(self.input().path))))


class WhyTalks(HashCheckingTask):
    """Sets a status message of its own, which must win over ours."""

    root = luigi.Parameter()

    def requires(self):
        return WhyClean(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "talks.txt"))

    def run(self):
        note_run(self.root, "WhyTalks")
        self.set_status_message("mine: <ok>")
        write(self.output().path, read(self.input().path))


class WhyAll(luigi.WrapperTask):
    root = luigi.Parameter()

    def requires(self):
        return [WhyCount(self.root), WhyTalks(self.root)]


def short(text):
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def luigid_api(port, method, **data):
    import urllib.parse
    import urllib.request

    url = f"http://127.0.0.1:{port}/api/{method}?data={urllib.parse.quote(json.dumps(data))}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())["response"]


def status_message(port, task):
    return luigid_api(port, "get_task_status_message", task_id=task.task_id)["statusMessage"]


def test_luigid_shows_each_task_why_it_ran(tmp_path, luigid):
    import html

    root = str(tmp_path)
    remote = {"local_scheduler": False, "scheduler_host": "127.0.0.1", "scheduler_port": luigid}
    write(tmp_path / "raw<b>.txt", "hello")
    assert build(WhyAll(root), **remote)
    assert sorted(ran(root)) == ["WhyClean", "WhyCount", "WhyHead", "WhyTalks"]
    assert status_message(luigid, WhyClean(root)) == "luigi_hashcheck: running because output missing"
    write(tmp_path / "raw<b>.txt", "help!")  # clean.txt changes, head.txt stays "HEL"
    assert build(WhyAll(root), workers=2, **remote)  # forked children report to luigid over HTTP
    assert sorted(ran(root)) == ["WhyClean", "WhyHead", "WhyTalks"]
    messages = {task.task_family: status_message(luigid, task) for task in (WhyClean(root), WhyHead(root), WhyCount(root), WhyTalks(root))}
    changed = f"({short('hello')} -> {short('help!')})"
    assert messages["WhyClean"] == html.escape(f"luigi_hashcheck: running because input raw<b>.txt changed {changed}")
    assert "&lt;b&gt;" in messages["WhyClean"] and "<" not in messages["WhyClean"]
    # Below a rerun, the task's own run-time check finds its input changed, and says so.
    assert messages["WhyHead"] == html.escape(f"luigi_hashcheck: running because input clean.txt changed ({short('HELLO')} -> {short('HELP!')})")
    assert messages["WhyCount"].startswith("luigi_hashcheck: run() skipped by early cutoff")
    assert messages["WhyTalks"] == "mine: <ok>"  # the user's own call came later, and won
    listed = luigid_api(luigid, "task_list", status="DONE", upstream_status="", search="WhyClean")
    assert listed[WhyClean(root).task_id]["status_message"] == messages["WhyClean"]


class Big(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root, "big.bin")

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "big-copy.bin"))

    def run(self):
        shutil.copyfile(self.input().path, self.output().path)


def test_hashing_a_large_file_inside_run_reports_progress_to_luigid(tmp_path, luigid, monkeypatch):
    monkeypatch.setattr(hc, "_PROGRESS_BYTES", 2 << 20)  # rather than writing 256 MiB
    root = str(tmp_path)
    write(tmp_path / "big.bin", "x" * (3 << 20))
    assert build(Big(root), local_scheduler=False, scheduler_host="127.0.0.1", scheduler_port=luigid)
    # The last hash inside run() is of the output, after the user's run(): it got to 100%.
    assert luigid_api(luigid, "get_task_progress_percentage", task_id=Big(root).task_id)["progressPercentage"] == 100


def test_large_hashes_report_rising_percentages_and_none_outside_a_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(hc, "_PROGRESS_BYTES", 2 << 20)
    root = str(tmp_path)
    write(tmp_path / "big.bin", "x" * (5 << 20))
    seen = []
    token = hc._reporting_to.set(seen.append)
    try:
        hc._digest(hc._norm(tmp_path / "big.bin"), "sha256", trust_mtime=False)
    finally:
        hc._reporting_to.reset(token)
    assert seen == sorted(seen) and len(seen) > 3 and seen[-1] == 100
    # Scheduling-time checks, and a run() called by hand, have no callbacks: no failure.
    task = Big(root)
    assert task.set_progress_percentage is None and task.set_status_message is None
    assert not task.complete()
    task.run()
    assert task.complete()


def summaries(caplog):
    return [r for r in caplog.records if r.name == "luigi-interface" and r.getMessage().startswith("luigi_hashcheck: ") and " ran, " in r.getMessage()]


@pytest.mark.parametrize("workers", [1, 4])
def test_each_build_ends_with_one_summary_beside_luigis(tmp_path, caplog, workers):
    root = str(tmp_path)
    write(tmp_path / "raw<b>.txt", "hello")
    with caplog.at_level(logging.INFO, logger="luigi-interface"):
        assert build(WhyAll(root), workers=workers, log_level="INFO")
        first = summaries(caplog)
        caplog.clear()
        assert build(WhyAll(root), workers=workers, log_level="INFO")
        second = summaries(caplog)
        caplog.clear()
        write(tmp_path / "raw<b>.txt", "help!")
        assert build(WhyAll(root), workers=workers, log_level="INFO")
        third = summaries(caplog)
        texts = [r.getMessage() for r in caplog.records]
    assert [len(first), len(second), len(third)] == [1, 1, 1]
    assert first[0].levelno == logging.INFO
    assert first[0].getMessage().splitlines()[0] == "luigi_hashcheck: 4 ran, 0 up to date, 0 skipped by early cutoff"
    assert second[0].getMessage() == "luigi_hashcheck: 0 ran, 4 up to date, 0 skipped by early cutoff"
    changed = f"({short('hello')} -> {short('help!')})"
    lines = third[0].getMessage().splitlines()
    assert lines[:2] == ["luigi_hashcheck: 3 ran, 0 up to date, 1 skipped by early cutoff", f"  WhyClean(root={root}): input raw<b>.txt changed {changed}"]
    # Below a rerun, the reason is what the task's own run-time check found, even in a forked child.
    assert sorted(lines[2:4]) == [f"  {name}(root={root}): input clean.txt changed ({short('HELLO')} -> {short('HELP!')})" for name in ("WhyHead", "WhyTalks")]
    assert lines[4:] == [f"  WhyCount(root={root}): skipped by early cutoff, its inputs did not change"]
    # Beside Luigi's own execution summary, just before it, not inside it.
    ours = texts.index(third[0].getMessage())
    luigis = next(i for i, text in enumerate(texts) if "Luigi Execution Summary" in text)
    assert ours < luigis and "luigi_hashcheck" not in texts[luigis]


def test_the_summary_lists_20_tasks_then_a_count_and_can_be_turned_off(tmp_path, caplog, config):
    module = load_lattice(tmp_path, 5, 5)
    top = module.Top(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="luigi-interface"):
        assert build(top, log_level="INFO")
    lines = summaries(caplog)[0].getMessage().splitlines()
    total = len(ran(str(tmp_path)))
    assert lines[0].startswith(f"luigi_hashcheck: {total} ran, 0 up to date")
    assert len(lines) == 1 + 20 + 1 and lines[-1] == f"  ... and {total - 20} more"
    caplog.clear()
    config("hashcheck", "summary", "false")
    write(tmp_path / "seed-1.txt", "changed")
    with caplog.at_level(logging.INFO, logger="luigi-interface"):
        assert build(top, log_level="INFO")
    assert ran(str(tmp_path)) and summaries(caplog) == []


def test_the_summary_counts_what_did_not_run(root, caplog):
    write(os.path.join(root, "fail"), "")
    with caplog.at_level(logging.INFO, logger="luigi-interface"):
        assert not build(Failing(root), log_level="INFO")
    summary = summaries(caplog)[0].getMessage().splitlines()
    assert summary[0] == "luigi_hashcheck: 0 ran, 0 up to date, 0 skipped by early cutoff, 1 failed"  # it ran, and raised
    assert summary[1].startswith("  Failing(") and ": failed (" in summary[1]


def test_the_luigi_command_line_ends_with_the_summary(tmp_path, caplog, monkeypatch):
    import luigi.cmdline

    ns = f"why{uuid.uuid4().hex[:8]}"
    load_module(tmp_path, CLI_PIPELINE.format(base="HashCheckingTask", ns=ns), name=ns)
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path / "raw.txt", "hi")
    with caplog.at_level(logging.INFO, logger="luigi-interface"), pytest.raises(SystemExit) as exit_:
        luigi.cmdline.luigi_run(["--module", ns, f"{ns}.B", "--root", str(tmp_path), "--local-scheduler", "--workers", "2", "--no-lock"])
    assert exit_.value.code == 0
    found = summaries(caplog)
    assert len(found) == 1 and found[0].getMessage().splitlines()[0] == "luigi_hashcheck: 2 ran, 0 up to date, 0 skipped by early cutoff"


def why_cli(tmp_path, monkeypatch):
    """WhyAll built, then its raw input edited: WhyClean stale, the rest stale from upstream."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "raw<b>.txt", "hello")
    assert build(WhyAll(str(tmp_path)))
    ran(str(tmp_path))
    write(tmp_path / "raw<b>.txt", "help!")
    return ["--module", "test_luigi_hashcheck", "WhyAll", "--root", str(tmp_path)]


def dot_nodes(text):
    import re

    found = re.findall(r'^  (n\d+) \[label="((?:[^"\\]|\\.)*)", fillcolor="(#[0-9a-f]{6})"', text, re.MULTILINE)
    nodes = {node: label for node, label, _colour in found}
    colours = {node: colour for node, _label, colour in found}
    edges = re.findall(r"^  (n\d+) -> (n\d+)( \[style=dashed\])?;$", text, re.MULTILINE)
    return nodes, colours, edges


def svg_of(dot_text):
    if shutil.which("dot") is None:
        if os.environ.get("LUIGI_HASHCHECK_CI"):
            pytest.fail("Graphviz's dot is missing; .ci/run installs it")
        pytest.skip("Graphviz's dot is not installed")
    result = subprocess.run(["dot", "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return result.stdout


def svg_texts(svg):
    """The text of every label in an SVG, as a reader sees it (the XML parsed, entities undone)."""
    import xml.etree.ElementTree as ET

    return [element.text for element in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]


def test_explain_dot_is_the_walks_graph_and_graphviz_draws_it(tmp_path, monkeypatch, capsys):
    args = why_cli(tmp_path, monkeypatch)
    code, out, _ = cli_main(["explain", "--dot", *args], capsys)
    assert code == 1
    nodes, colours, edges = dot_nodes(out)
    assert len(nodes) == 6 and len(edges) == 6  # WhyRaw, four tasks and the wrapper; one edge per dependency
    ids = {label.split("(")[0]: node for node, label in nodes.items()}
    colour = {name: hc._GRAPH_KINDS[kind][1] for name, kind in (("ok", "ok"), ("run", "run"), ("up", "upstream"))}
    assert colours[ids["WhyRaw"]] == colour["ok"] and colours[ids["WhyClean"]] == colour["run"]
    assert {colours[ids[n]] for n in ("WhyHead", "WhyCount", "WhyTalks")} == {colour["up"]}
    assert colours[ids["WhyAll"]] == colour["run"]  # a WrapperTask: incomplete by its own rule
    assert nodes[ids["WhyClean"]].endswith(f"\\ninput raw<b>.txt changed ({short('hello')} -> {short('help!')})")
    assert (ids["WhyClean"], ids["WhyHead"], "") in edges and (ids["WhyRaw"], ids["WhyClean"], "") in edges
    texts = svg_texts(svg_of(out))
    assert f"WhyClean(root={tmp_path})" in texts and f"input raw<b>.txt changed ({short('hello')} -> {short('help!')})" in texts


def test_verify_dot_is_the_graph_of_records_and_graphviz_draws_it(tmp_path, monkeypatch, capsys):
    why_cli(tmp_path, monkeypatch)
    code, out, _ = cli_main(["verify", "--dot", "."], capsys)
    assert code == 1
    nodes, colours, edges = dot_nodes(out)
    by_output = {label.split("\\n")[0]: node for node, label in nodes.items()}
    assert set(by_output) == {"clean.txt", "head.txt", "count.txt", "talks.txt"} and len(edges) == 3
    assert nodes[by_output["clean.txt"]].startswith("clean.txt\\nstale: input raw<b>.txt changed")
    assert colours[by_output["count.txt"]] == hc._GRAPH_KINDS["upstream"][1]
    assert "clean.txt" in svg_texts(svg_of(out))


def test_dynamic_dependencies_are_dashed_edges(root, capsys, monkeypatch):
    write(os.path.join(root, "a.src"), "a")
    write(os.path.join(root, "b.src"), "b")
    assert build(Dynamic(root))
    monkeypatch.chdir(root)
    code, out, _ = cli_main(["explain", "--dot", "--module", "test_luigi_hashcheck", "Dynamic", "--root", root], capsys)
    assert code == 0
    _nodes, _colours, edges = dot_nodes(out)
    assert sorted(dashed for _a, _b, dashed in edges) == ["", "", " [style=dashed]", " [style=dashed]"]
    svg_of(out)


class Quoted(HashCheckingTask):
    root = luigi.Parameter()
    text = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "quoted.txt"))

    def run(self):
        write(self.output().path, self.text)


def test_explain_mermaid_is_a_flowchart_with_escaped_labels(root, capsys, monkeypatch):
    import re

    tricky = 'a"b#c<d>&e`f]'
    monkeypatch.chdir(root)
    code, out, _ = cli_main(["explain", "--mermaid", "--module", "test_luigi_hashcheck", "Quoted", "--root", root, "--text", tricky], capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "flowchart TD"
    node_lines = [line for line in lines if re.fullmatch(r'  n\d+\["[^"]*"\]:::(ok|run|upstream|missing)', line)]
    edge_lines = [line for line in lines if re.fullmatch(r"  n\d+ (-->|-\.->) n\d+", line)]
    classes = [line for line in lines if line.startswith("  classDef ")]
    assert len(node_lines) == 2 and edge_lines == ["  n0 --> n1"] and len(classes) == 4
    assert len(lines) == 1 + len(node_lines) + len(edge_lines) + len(classes)
    label = node_lines[1]
    assert "a#quot;b#35;c#lt;d#gt;#amp;e#96;f]" in label and label.endswith(":::run")
    assert "<br/>no record" in label or "<br/>output missing" in label


def test_past_200_nodes_families_all_up_to_date_fold_into_one(root, capsys, monkeypatch):
    assert build(Chain(root, 249))
    monkeypatch.chdir(root)
    args = ["explain", "--dot", "--module", "test_luigi_hashcheck", "Chain", "--root", root, "--i", "249"]
    nodes, _colours, edges = dot_nodes(cli_main(args, capsys)[1])
    assert sorted(nodes.values()) == ["Chain (250 tasks)", f"Seed(root={root}, name=seed.txt)"] and len(edges) == 1
    write(os.path.join(root, "seed.txt"), "other")  # now every Chain task will run: none folds
    nodes, _colours, edges = dot_nodes(cli_main(args, capsys)[1])
    assert len(nodes) == 251 and len(edges) == 250
    assert len(hc._fold({"a": (["A"], "ok", "F"), "b": (["B"], "ok", "F")}, [("a", "b", False)])[0]) == 2  # small graphs never fold


###############################################################################
# The seed's API ##############################################################
###############################################################################

# The proof of concept's own test flow (ngr-t/luigi_for_data_science, test/test_complete.py),
# written anew: an external input file per task, a SumupTask over it that always writes
# test/test_result.txt, one build of input1, then complete() asked of all three inputs.
# Only the import line differs from what its users have.
SEED_FLOW = """
import os
import luigi
{import_line}


class HashFileInputTask(luigi.ExternalTask):
    filename = luigi.Parameter()

    def output(self):
        return HashableLocalTarget(path=self.filename)


class SumupTask(TaskWithCheckingInputHash):
    filename = luigi.Parameter()
    result_fn = "test/test_result.txt"

    def output(self):
        return HashableLocalTarget(self.result_fn)

    def requires(self):
        yield HashFileInputTask(self.filename)

    def run(self):
        with open(self.input()[0].fn) as numbers:
            total = sum(int(line) for line in numbers)
        with open(self.output().fn, "wb") as out:
            out.write(str(total).encode())
        with open("runs.log", "a") as log:
            log.write("SumupTask\\n")


if os.path.exists(SumupTask.result_fn):
    os.remove(SumupTask.result_fn)
assert luigi.run(main_task_cls=SumupTask, cmdline_args=["--filename", "test/test_input1.csv"], local_scheduler=True)
print("complete", [SumupTask(filename=f"test/test_input{{n}}.csv").complete() for n in (1, 2, 3)])
print("result", open(SumupTask.result_fn).read())
"""


@pytest.mark.parametrize(
    "import_line",
    [
        "from luigi_hashcheck import HashableLocalTarget, TaskWithCheckingInputHash",
        "from hash_checking_tasks import HashableLocalTarget, TaskWithCheckingInputHash",
    ],
    ids=["our-name", "module-alias"],
)
def test_the_seeds_own_test_flow_runs_with_only_the_import_changed(tmp_path, import_line):
    for n, numbers in ((1, "1\n2\n3\n4\n5\n"), (2, "1\n2\n3\n4\n5\n"), (3, "1\n2\n3\n4\n")):
        write(tmp_path / "test" / f"test_input{n}.csv", numbers)
    # The vendored file, replaced by a one-line alias of ours, as its users would.
    write(tmp_path / "hash_checking_tasks.py", "from luigi_hashcheck import *  # noqa: F403\n")
    write(tmp_path / "seed_flow.py", SEED_FLOW.format(import_line=import_line))
    result = run_python(["seed_flow.py"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # input2 holds the same numbers under another parameter: not complete, as in the seed.
    assert "complete [True, False, False]" in result.stdout and "result 15" in result.stdout
    assert ran(tmp_path) == ["SumupTask"]
    assert record_of(tmp_path / "test" / "test_result.txt")["task"]["params"] == {"filename": "test/test_input1.csv"}


def test_every_name_the_seed_exported_is_importable_and_star_imports():
    # The seed's own __init__.py star-imports it, which gives exactly __all__.
    for name in ("HashableExternalFile", "HashableLocalTarget", "HashableTarget", "HashableTargetException", "TaskWithCheckingInputHash", "WrapperTask"):
        assert name in hc.__all__ and hasattr(hc, name)
    assert hc.TaskWithCheckingInputHash is HashCheckingTask
    assert issubclass(hc.HashableTargetException, hc.HashCheckError)
    assert issubclass(hc.ValidationError, hc.HashCheckError)
    assert issubclass(hc.WrapperTask, luigi.WrapperTask)
    external = hc.HashableExternalFile(fn="data/in.csv")
    assert isinstance(external, luigi.ExternalTask) and external.fn == "data/in.csv"
    assert isinstance(external.output(), HashableLocalTarget) and external.output().path == "data/in.csv"


class SumExternal(HashCheckingTask):
    """Reads a HashableExternalFile, as the seed's users wrote their pipelines."""

    root = luigi.Parameter()

    def requires(self):
        return hc.HashableExternalFile(fn=os.path.join(self.root, "seed.txt"))

    def output(self):
        return HashableLocalTarget(os.path.join(self.root, "sum-external.txt"))

    def run(self):
        note_run(self.root, "SumExternal")
        write(self.output().path, read(self.input().path).upper())


class Wrap(hc.WrapperTask):
    root = luigi.Parameter()
    depth = luigi.IntParameter(default=0)

    def requires(self):
        if self.depth:
            return Wrap(self.root, self.depth - 1)
        return [SumExternal(self.root), Upper(self.root)]


def test_a_wrapper_task_over_a_stale_leaf_builds_it(root):
    assert build(Wrap(root))
    assert sorted(ran(root)) == ["SumExternal", "Upper"]
    assert Wrap(root).complete()
    write(os.path.join(root, "seed.txt"), "edited")  # the HashableExternalFile changed
    assert not Wrap(root).complete()
    assert build(Wrap(root))
    assert sorted(ran(root)) == ["SumExternal", "Upper"]


def test_a_chain_of_wrappers_is_walked_without_recursion(root):
    assert build(Wrap(root))
    ran(root)
    top = Wrap(root, 3000)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(500)  # luigi.WrapperTask.complete() would recurse 3000 deep
    try:
        assert top.complete()
        write(os.path.join(root, "seed.txt"), "edited")
        assert not top.complete()
    finally:
        sys.setrecursionlimit(limit)


class PlainOverStale(luigi.Task):
    """A plain task over a HashCheckingTask: complete by Luigi's rule once its output exists."""

    root = luigi.Parameter()

    def requires(self):
        return Upper(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "plain-over.txt"))

    def run(self):
        note_run(self.root, "PlainOverStale")
        write(self.output().path, read(self.input().path))


class WrapPlain(hc.WrapperTask):
    root = luigi.Parameter()

    def requires(self):
        return PlainOverStale(self.root)


def test_a_wrapper_over_a_plain_task_judges_it_by_its_own_rule(root, config):
    config("worker", "check_complete_on_run", "true")
    assert build(WrapPlain(root))
    assert ran(root) == ["Upper", "PlainOverStale"]
    write(os.path.join(root, "seed.txt"), "edited")  # Upper is stale below the plain task
    assert not Upper(root).complete()
    # Our rule would call the plain task stale, which Luigi never reruns: the wrapper would
    # never complete, and with check_complete_on_run the build would fail.
    assert WrapPlain(root).complete()
    assert build(WrapPlain(root))
    assert ran(root) == []


class RaisingTarget(MemoryTarget):
    """A third-party target of the seed's kind: no record raises HashableTargetException."""

    def get_current_input_hash(self):
        if self.key + "#input_hash" not in self.store:
            raise hc.HashableTargetException(self.key)
        return self.store[self.key + "#input_hash"]


class ToRaising(ToMemory):
    def output(self):
        return RaisingTarget(self.root + "/raising")

    def run(self):
        note_run(self.root, "ToRaising")
        self.output().write(read(self.input().path))


def test_hashable_target_exception_means_no_usable_record(root):
    RaisingTarget(root + "/raising").write("made before")  # the output exists, unrecorded
    assert not ToRaising(root).complete()
    assert build(ToRaising(root))
    assert ran(root) == ["Upper", "ToRaising"]
    assert build(ToRaising(root))
    assert ran(root) == []


class SeedTarget(HashableTarget):
    """A target written for the seed: its HashableTarget asked for no hash_content()."""

    store: typing.ClassVar[dict] = {}

    def __init__(self, key):
        self.key = key

    def exists(self):
        return self.key in self.store

    def get_current_input_hash(self):
        return self.store.get(self.key + "#input_hash")

    def store_input_hash(self, input_hash):
        self.store[self.key + "#input_hash"] = input_hash


class ToSeedTarget(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Upper(self.root)

    def output(self):
        return SeedTarget(self.root + "/seed-target")

    def run(self):
        note_run(self.root, "ToSeedTarget")
        SeedTarget.store[self.output().key] = read(self.input().path)


class FromSeedTarget(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return ToSeedTarget(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "from-seed-target.txt"))

    def run(self):
        note_run(self.root, "FromSeedTarget")
        write(self.output().path, "x")


def test_a_seed_target_without_hash_content_is_an_output_but_no_input(root):
    assert build(ToSeedTarget(root))  # made, and an output, without hash_content()
    assert ran(root) == ["Upper", "ToSeedTarget"]
    assert build(ToSeedTarget(root))
    assert ran(root) == []
    with pytest.raises(hc.UnhashableTargetError, match=r"FromSeedTarget.*SeedTarget as an input.*no hash_content\(\)"):
        FromSeedTarget(root).complete()
    assert not build(FromSeedTarget(root))
    assert ran(root) == []


class Validated(HashCheckingTask):
    root = luigi.Parameter()
    verdict = luigi.Parameter(default="pass")

    def requires(self):
        return Upper(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"validated-{self.verdict}.txt"))

    def run(self):
        note_run(self.root, "Validated")
        write(self.output().path, read(self.input().path))

    def validate(self):
        note_run(self.root, "validate")
        assert os.path.exists(self.output().path)  # after run(), before the record
        assert not os.path.exists(os.path.join(self.root, ".luigi_hashes", os.path.basename(self.output().path) + ".json"))
        if self.verdict == "raise":
            raise ValueError("the output holds no rows")
        return self.verdict != "false"


class ValidatedGenerator(Validated):
    def run(self):
        yield Head(self.root)
        note_run(self.root, "Validated")
        write(self.output().path, "done")


@pytest.mark.parametrize("verdict, message", [("raise", "validate() failed: the output holds no rows"), ("false", "validate() failed: it returned False")])
def test_a_failing_validate_fails_the_task_and_records_nothing(root, verdict, message):
    failures = failures_of(Validated, Validated(root, verdict))
    assert len(failures) == 1 and isinstance(failures[0], hc.ValidationError) and message in str(failures[0])
    assert ran(root) == ["Upper", "Validated", "validate"]
    assert not os.path.exists(os.path.join(root, ".luigi_hashes", f"validated-{verdict}.txt.json"))
    assert not Validated(root, verdict).complete()


def test_a_passing_validate_is_called_once_after_run_and_before_the_record(root):
    assert build(Validated(root))
    assert ran(root) == ["Upper", "Validated", "validate"]
    assert record_of(os.path.join(root, "validated-pass.txt"))
    assert build(Validated(root))
    assert ran(root) == []  # never at a check, as the seed did


def test_validate_of_a_generator_run_is_called_once_it_is_exhausted(root):
    assert build(ValidatedGenerator(root))
    assert ran(root)[-2:] == ["Validated", "validate"]


def test_editing_validate_reruns_the_task(root):
    module = load_module(root, VALIDATED_MODULE.format(check="True"), name="validated_mod")
    assert build(module.V(root))
    assert ran(root) == ["V"]
    module = load_module(root, VALIDATED_MODULE.format(check="len(open(self.output().path).read()) > 0"), name="validated_mod")
    assert build(module.V(root))
    assert ran(root) == ["V"]


VALIDATED_MODULE = """
import os
import luigi
from luigi_hashcheck import HashCheckingTask


class V(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "v.txt"))

    def run(self):
        with open(os.path.join(self.root, "runs.log"), "a") as f:
            f.write("V\\n")
        with self.output().open("w") as f:
            f.write("v")

    def validate(self):
        return {check}
"""


class ValidateParameter(HashCheckingTask):
    root = luigi.Parameter()
    validate = luigi.BoolParameter(default=False)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "validate-parameter.txt"))

    def run(self):
        write(self.output().path, "x")


class ValidateWithArguments(HashCheckingTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "validate-arguments.txt"))

    def run(self):
        write(self.output().path, "x")

    def validate(self, strict):  # type: ignore[override]
        raise AssertionError("never called")


@pytest.mark.parametrize("cls, problem", [(ValidateParameter, "is a Parameter"), (ValidateWithArguments, "needs arguments")])
def test_a_validate_that_is_no_hook_gets_a_warning_and_is_not_called(root, caplog, cls, problem):
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert build(cls(root))
        assert build(cls(root))
    warned = [r.getMessage() for r in caplog.records if ".validate" in r.getMessage()]
    assert warned == [f"luigi_hashcheck: {cls.__name__}.validate {problem}, so it is not called; the hook is a method taking no arguments"]
    assert cls(root).complete()


ADOPT_VALIDATED = """
import os
import luigi
from luigi_hashcheck import HashCheckingTask


class Made(HashCheckingTask):
    task_namespace = "{ns}"
    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "made.txt"))

    def run(self):
        with self.output().open("w") as f:
            f.write("made")

    def validate(self):
        if open(self.output().path).read() != "made":
            raise ValueError("made.txt does not say made")
"""


@pytest.mark.parametrize("dry_run", [["--dry-run"], []], ids=["dry-run", "writing"])
def test_adopt_calls_validate_and_leaves_a_failing_task_alone(tmp_path, monkeypatch, capsys, dry_run):
    ns = f"adoptv{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    load_module(tmp_path, ADOPT_VALIDATED.format(ns=ns), name=ns)
    write(tmp_path / "made.txt", "something else")  # made before the conversion, and wrong
    code, out, _ = cli_main(["adopt", *dry_run, "--module", ns, f"{ns}.Made", "--root", "."], capsys)
    assert code == 1
    assert f"left alone {ns}.Made(root=.): validate() failed: made.txt does not say made" in out
    assert not os.path.exists(tmp_path / ".luigi_hashes" / "made.txt.json")
    write(tmp_path / "made.txt", "made")
    code, out, _ = cli_main(["adopt", *dry_run, "--module", ns, f"{ns}.Made", "--root", "."], capsys)
    assert code == 0 and ("would record" if dry_run else "recorded") in out
    assert os.path.exists(tmp_path / ".luigi_hashes" / "made.txt.json") != bool(dry_run)


# Messages that name things (issue 15).

PARAMS_MODULE = """
import os
import luigi
from luigi_hashcheck import HashCheckingTask


class P(HashCheckingTask):
    task_namespace = "{ns}"
    root = luigi.Parameter()
{params}

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "p.txt"))

    def run(self):
        with self.output().open("w") as f:
            f.write("p")
"""


def test_parameters_changed_names_each_parameter_old_and_new(tmp_path, monkeypatch, capsys):
    ns = f"params{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = load_module(tmp_path, PARAMS_MODULE.format(ns=ns, params="    n = luigi.Parameter()\n    gone = luigi.Parameter(default='g')"), name=ns)
    assert build(module.P(".", n="1"))
    explain = ["explain", "--module", ns, f"{ns}.P", "--root", "."]
    code, out, _ = cli_main([*explain, "--n", "2"], capsys)
    assert code == 1 and f"will run  {ns}.P(root=., n=2, gone=g): parameters changed: n: '1' -> '2'\n" in out
    long = "x" * 200
    code, out, _ = cli_main([*explain, "--n", long], capsys)
    assert f"parameters changed: n: '1' -> '{'x' * 76}...\n" in out
    # The class loses one parameter and gains another: a new process, as a user would run it.
    write(tmp_path / f"{ns}.py", textwrap.dedent(PARAMS_MODULE.format(ns=ns, params="    n = luigi.Parameter()\n    added = luigi.Parameter(default='a')")))
    result = run_python(["-m", "luigi_hashcheck", *explain, "--n", "1"], cwd=tmp_path)
    assert "parameters changed: gone: 'g' -> (none), added: (none) -> 'a'\n" in result.stdout, result.stderr


def test_adopt_names_the_missing_input_and_output(cli, capsys):
    os.remove(os.path.join("sub", "b.txt"))
    code, out, _ = cli_main(["adopt", *cli.task("C")], capsys)
    assert code == 1
    ns = cli.__name__
    assert f"left alone {ns}.B(root=.): output sub/b.txt is missing\n" in out
    assert f"left alone {ns}.C(root=.): input sub/b.txt is missing\n" in out


@pytest.mark.parametrize("dry_run", [["--dry-run"], []], ids=["dry-run", "writing"])
def test_adopt_with_nothing_to_do_says_so(cli, capsys, dry_run):
    code, out, _ = cli_main(["adopt", *dry_run, *cli.task("C")], capsys)
    assert (code, out) == (0, "nothing to record; 4 tasks: 4 ok\n")


def test_verify_and_explain_reasons_are_flat(cli, capsys):
    old = record_of("c.txt")["output"]["digest"][:8]
    write("c.txt", "x")
    new = hashlib.sha256(b"x").hexdigest()[:8]
    code, out, _ = cli_main(["verify"], capsys)
    assert code == 1 and f"modified  c.txt: output modified: {old} -> {new}\n" in out
    code, out, _ = cli_main(["explain", *cli.task("C")], capsys)
    assert f"C(root=.): output modified: {old} -> {new}\n" in out
    os.remove("raw.txt")
    os.mkfifo("raw.txt")  # not a regular file: flat too
    code, out, _ = cli_main(["verify"], capsys)
    assert "stale     a.txt: input raw.txt is not a regular file or directory\n" in out


def test_verify_says_once_on_stderr_what_it_cannot_see_and_never_in_json(cli, capsys):
    code, out, err = cli_main(["verify"], capsys)
    assert code == 0 and out.endswith("3 outputs: 3 ok, 0 stale, 0 modified, 0 missing, 0 corrupt, 0 unrecorded\n")
    assert err.count("cannot see code or parameter changes") == 1 and "explain" in err
    code, out, err = cli_main(["verify", "--json"], capsys)
    assert code == 0 and json.loads(out)["counts"]["ok"] == 3
    assert "cannot see" not in out + err


NO_OUTPUTS = """
import luigi
import luigi_hashcheck


class NoOutputs(luigi_hashcheck.HashCheckingTask):
    def run(self):
        pass


for _ in range({builds}):
    luigi.build([NoOutputs()], local_scheduler=True, log_level="ERROR")
"""


@pytest.mark.parametrize("builds", [1, 2])
def test_the_without_outputs_warning_is_printed_once_per_task_and_build(tmp_path, builds):
    write(tmp_path / "no_outputs.py", NO_OUTPUTS.format(builds=builds))
    result = run_python(["no_outputs.py"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Checked at scheduling and again before run(): it was printed twice per build. A second
    # build in the process repeats the same text from the same line, which Python's own
    # warnings filter shows only once.
    assert result.stderr.count("NoOutputs() without outputs is never complete") == 1


###############################################################################
# Failed reruns and undeclared reads ##########################################
###############################################################################


class Model(HashCheckingTask):
    """Upper-cases seed.txt into model.txt; while ``fail`` exists it writes half an output
    straight to the path, then raises."""

    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "model.txt"))

    def run(self):
        note_run(self.root, "Model")
        text = read(self.input().path).upper()
        if os.path.exists(os.path.join(self.root, "fail")):
            write(self.output().path, "PARTIAL")
            raise RuntimeError("training failed")
        with self.output().open("w") as dst:
            dst.write(text)


class ModelDir(HashCheckingTask):
    """A folder output; while ``fail`` exists it leaves a non-empty partial folder."""

    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "modeldir"))

    def run(self):
        note_run(self.root, "ModelDir")
        text = read(self.input().path)
        write(os.path.join(self.output().path, "part-0"), text)
        if os.path.exists(os.path.join(self.root, "fail")):
            write(os.path.join(self.output().path, "sub", "half"), "PARTIAL")
            raise RuntimeError("training failed")
        write(os.path.join(self.output().path, "part-1"), text[::-1])


def records_folder_names(root):
    return sorted(os.listdir(os.path.join(root, ".luigi_hashes")))


def test_a_failed_rerun_puts_the_old_output_and_record_back(root, caplog):
    assert build(Model(root))
    old = record_of(os.path.join(root, "model.txt"))
    write(os.path.join(root, "seed.txt"), "changed")
    write(os.path.join(root, "fail"), "")
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert not build(Model(root))
    assert read(os.path.join(root, "model.txt")) == "HELLO"
    assert record_of(os.path.join(root, "model.txt")) == old
    assert records_folder_names(root) == [".lock", "model.txt.json", "model.txt.stale-lock"]
    restored = [r.getMessage() for r in caplog.records if "were restored" in r.getMessage()]
    assert len(restored) == 1 and "model.txt" in restored[0] and "adopt" not in restored[0]
    # Put back with its own record, it is stale for its real reason and reruns.
    assert ran(root) == ["Model", "Model"]
    os.remove(os.path.join(root, "fail"))
    assert not Model(root).complete()
    assert build(Model(root))
    assert ran(root) == ["Model"]
    assert read(os.path.join(root, "model.txt")) == "CHANGED"
    # A successful rerun deletes the copies.
    assert records_folder_names(root) == [".lock", "model.txt.json", "model.txt.stale-lock"]


def test_a_failed_rerun_replaces_a_partial_folder_with_the_old_one(root):
    assert build(ModelDir(root))
    out = os.path.join(root, "modeldir")
    write(os.path.join(root, "seed.txt"), "changed")
    write(os.path.join(root, "fail"), "")
    assert not build(ModelDir(root))
    assert sorted(os.listdir(out)) == ["part-0", "part-1"]
    assert read(os.path.join(out, "part-0")) == "hello"
    assert not any(".stale-output" in name or ".stale-record" in name for name in records_folder_names(root))
    os.remove(os.path.join(root, "fail"))
    assert ran(root) == ["ModelDir", "ModelDir"]
    assert build(ModelDir(root))
    assert ran(root) == ["ModelDir"]
    assert read(os.path.join(out, "part-1")) == "degnahc"
    assert not any(".stale-output" in name for name in records_folder_names(root))


def test_keep_stale_false_deletes_the_stale_output_as_before(root, config):
    config("hashcheck", "keep_stale", "false")
    assert build(Model(root))
    write(os.path.join(root, "seed.txt"), "changed")
    write(os.path.join(root, "fail"), "")
    assert not build(Model(root))
    assert read(os.path.join(root, "model.txt")) == "PARTIAL"
    assert not os.path.exists(os.path.join(root, ".luigi_hashes", "model.txt.json"))
    assert "model.txt.stale-lock" not in records_folder_names(root)


SLOW_PIPELINE = """
    import os
    import time

    import luigi

    from luigi_hashcheck import HashCheckingTask


    class Raw(luigi.ExternalTask):
        root = luigi.Parameter()

        def output(self):
            return luigi.LocalTarget(os.path.join(self.root, "seed.txt"))


    class Slow(HashCheckingTask):
        root = luigi.Parameter()

        def requires(self):
            return Raw(self.root)

        def output(self):
            return luigi.LocalTarget(os.path.join(self.root, "slow.txt"))

        def run(self):
            with open(self.input().path) as f:
                text = f.read()
            with open(self.output().path, "w") as f:
                f.write("PARTIAL")
            with open(os.path.join(self.root, "started-%d" % os.getpid()), "w"):
                pass
            while not os.path.exists(os.path.join(self.root, "go")):
                time.sleep(0.02)
            with self.output().open("w") as dst:
                dst.write(text.upper())
"""

SLOW_BUILD = "import luigi, slowpipe, sys; sys.exit(0 if luigi.build([slowpipe.Slow(root=sys.argv[1])], local_scheduler=True, log_level='WARNING') else 1)"


def start_slow(root):
    """Start a build of Slow in another process; return it once its run() is under way."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, root]))
    process = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, root], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    flag = os.path.join(root, f"started-{process.pid}")
    deadline = time.monotonic() + 60
    while not os.path.exists(flag):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return process


def slow_setup(root):
    pipe = load_module(root, SLOW_PIPELINE, name="slowpipe")
    write(os.path.join(root, "go"), "")
    assert build(pipe.Slow(root))
    os.remove(os.path.join(root, "go"))
    write(os.path.join(root, "seed.txt"), "changed")
    return pipe


def test_a_rerun_killed_mid_run_loses_nothing_and_a_build_puts_it_back(root, capsys):
    pipe = slow_setup(root)
    out = os.path.join(root, "slow.txt")
    old = record_of(out)
    process = start_slow(root)
    copy = os.path.join(root, ".luigi_hashes", "slow.txt.stale-output")
    assert read(copy) == "HELLO" and read(out) == "PARTIAL"
    process.kill()
    process.wait()
    process.stderr.close()
    # explain and verify only report the copy.
    hc.main(["verify", root])
    assert "set aside " + hc._show(out) in capsys.readouterr().out
    with hc._inspection(hc._settings()) as memo:
        walk = hc._walk([pipe.Slow(root)], memo, explore=True)
    assert "set aside" in walk.verdicts[pipe.Slow(root).task_id].reason
    assert read(copy) == "HELLO"
    # A check that can take the lock puts it back, with its record, and it is still stale.
    assert not pipe.Slow(root).complete()
    assert read(out) == "HELLO" and record_of(out) == old
    assert not os.path.exists(copy)
    write(os.path.join(root, "go"), "")
    assert build(pipe.Slow(root))
    assert read(out) == "CHANGED"
    assert "slow.txt.stale-output" not in records_folder_names(root)


def test_a_rerun_killed_while_another_build_runs_the_task_is_left_to_that_build(root):
    pipe = slow_setup(root)
    out = os.path.join(root, "slow.txt")
    copy = os.path.join(root, ".luigi_hashes", "slow.txt.stale-output")
    first = start_slow(root)
    first.kill()
    first.wait()
    first.stderr.close()
    # The second build puts the dead one's copy back, sets it aside again and holds the lock.
    second = start_slow(root)
    assert read(copy) == "HELLO" and read(out) == "PARTIAL"
    # A check here cannot take the lock, so it leaves the live rerun's copy alone.
    assert not pipe.Slow(root).complete()
    assert read(copy) == "HELLO" and read(out) == "PARTIAL"
    write(os.path.join(root, "go"), "")
    assert second.wait(timeout=60) == 0, second.stderr.read().decode()
    second.stderr.close()
    assert read(out) == "CHANGED"
    assert not os.path.exists(copy)
    assert pipe.Slow(root).complete()


def test_copies_left_by_a_rerun_killed_after_it_recorded_go_at_the_next_record_written_beside(root, capsys, monkeypatch):
    # A rerun that recorded its new outputs, killed before it removed the copies it set
    # aside: its task is up to date, so no rerun removes them, and no check puts them back.
    assert build(Model(root))
    records = os.path.join(root, ".luigi_hashes")
    shutil.copy(os.path.join(records, "model.txt.json"), os.path.join(records, "model.txt.stale-record"))
    shutil.copy(os.path.join(root, "model.txt"), os.path.join(records, "model.txt.stale-output"))
    ran(root)
    as_new_process()
    assert build(Model(root)) and ran(root) == []  # up to date: nothing is written, nothing put back
    assert hc.main(["verify", root]) == 1
    out = capsys.readouterr().out.replace(root + os.sep, "")
    assert "set aside model.txt" in out and "the next record written beside it removes them" in out, out
    as_new_process()
    lock_free, real = [], hc._discard

    def discard(path):  # the copies go after their lock is let go: a rerun is not refused meanwhile
        if path.endswith(".tmp"):
            lock = os.path.join(records, "model.txt.stale-lock")
            lock_free.append(hc._take_stale_lock(lock))
            hc._release_stale_lock(lock)
        real(path)

    monkeypatch.setattr(hc, "_discard", discard)
    assert build(Folder(root)) and ran(root) == ["Folder"]  # another task's record, beside
    monkeypatch.undo()
    assert lock_free == [True, True]
    assert not any("stale-" in n and "lock" not in n or n.endswith(".tmp") for n in os.listdir(records)), os.listdir(records)
    assert read(os.path.join(root, "model.txt")) == "HELLO" and Model(root).complete()
    assert hc.main(["verify", root]) == 0


def test_forget_deletes_a_copy_and_the_record_search_never_takes_it_for_a_record(root, capsys):
    assert build(Model(root))
    records = os.path.join(root, ".luigi_hashes")
    os.replace(os.path.join(records, "model.txt.json"), os.path.join(records, "model.txt.stale-record"))
    os.replace(os.path.join(root, "model.txt"), os.path.join(records, "model.txt.stale-output"))
    assert hc._find_records([root]) == []
    assert hc.main(["verify", root]) == 1
    assert "set aside model.txt" in capsys.readouterr().out.replace(root + os.sep, "")
    assert hc.main(["forget", os.path.join(root, "model.txt")]) == 0
    assert "forgot the copy" in capsys.readouterr().out
    assert not any("stale-output" in n or "stale-record" in n for n in os.listdir(records))


class Gen(HashCheckingTask):
    """Writes half its output, then yields GenDep; on the second pass writes it whole."""

    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "gen.txt"))

    def run(self):
        note_run(self.root, "Gen")
        write(self.output().path, "PARTIAL")
        dep = yield GenDep(self.root)
        with self.output().open("w") as dst:
            dst.write(read(self.input().path) + read(dep.path))


class GenDep(HashCheckingTask):
    """Notes what it sees of Gen's output and its copy while Gen is abandoned."""

    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "gendep.txt"))

    def run(self):
        note_run(self.root, "GenDep")
        copy = os.path.join(self.root, ".luigi_hashes", "gen.txt.stale-output")
        seen = read(copy) if os.path.exists(copy) else "no copy"
        with self.output().open("w") as dst:
            dst.write(seen)


def test_a_generator_run_abandoned_for_new_dependencies_keeps_its_outputs_aside(root):
    assert build(Gen(root))
    assert ran(root) == ["Gen", "GenDep", "Gen"]
    first = read(os.path.join(root, "gen.txt"))
    write(os.path.join(root, "seed.txt"), "changed")
    os.remove(os.path.join(root, "gendep.txt"))
    assert build(Gen(root))
    assert ran(root) == ["Gen", "GenDep", "Gen"]
    # While Gen was abandoned, its last output stayed aside.
    assert read(os.path.join(root, "gendep.txt")) == first
    assert read(os.path.join(root, "gen.txt")) == "changed" + first
    assert not any("stale-output" in n or "stale-record" in n for n in records_folder_names(root))
    assert Gen(root).complete()


def test_a_rerun_starts_while_its_abandoned_forked_worker_is_still_ending(root, monkeypatch):
    # Found by the differential test under load: Luigi starts the rerun as soon as the
    # abandoned child has reported, and a child that had not yet exited still held the locks
    # of the outputs it set aside, so the rerun failed ("another run ... holds").
    assert build(Gen(root))
    write(os.path.join(root, "seed.txt"), "changed")
    os.remove(os.path.join(root, "gendep.txt"))
    ran(root)
    done = os.path.join(root, "gen-rerun-done")
    original = luigi.worker.TaskProcess.run

    def run(self):
        original(self)  # the result is reported; the child ends after this
        if type(self.task) is not Gen:
            return
        note_run(root, "try")
        if read(os.path.join(root, "runs.log")).count("try") > 1:
            write(done, "")
            return
        # The abandoned child stays alive until the rerun's child has ended.
        deadline = time.monotonic() + 60
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(luigi.worker.TaskProcess, "run", run)
    assert build(Gen(root), workers=2)
    assert [name for name in ran(root) if name != "try"] == ["Gen", "GenDep", "Gen"]
    assert read(os.path.join(root, "gen.txt")) == "changed" + read(os.path.join(root, "gendep.txt"))
    assert not any(n.endswith((".stale-output", ".stale-record")) for n in records_folder_names(root))
    assert Gen(root).complete()


class Financials(HashCheckingTask):
    """Reads data/financials.csv in run(); declares it only through extra_inputs() when asked."""

    root = luigi.Parameter()
    declare = luigi.BoolParameter(default=False)

    def requires(self):
        return Seed(self.root)

    def extra_inputs(self):
        return [os.path.join(self.root, "data", "financials.csv")] if self.declare else []

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"report-{self.declare}.txt"))

    def run(self):
        note_run(self.root, "Financials")
        with open(os.path.join(self.root, "data", "financials.csv")) as f:
            total = sum(int(line) for line in f)
        with self.output().open("w") as dst:
            dst.write(f"{read(self.input().path)} {total}")


class Tidy(HashCheckingTask):
    """Reads only what it declares, imports a module of the project and reads luigi.cfg."""

    root = luigi.Parameter()

    def requires(self):
        return Seed(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "tidy.txt"))

    def run(self):
        note_run(self.root, "Tidy")
        sys.path.insert(0, self.root)
        try:
            import tidy_helper  # noqa: F401 (an import inside run() opens its source)
        finally:
            sys.path.remove(self.root)
        luigi.configuration.get_config().reload()
        scratch = os.path.join(self.root, "scratch.txt")
        write(scratch, "made here")
        with self.input().open() as src, self.output().open("w") as dst:
            dst.write(src.read() + read(scratch))


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """A temporary folder beside the test's files, as tmp_path itself lies in the real one,
    whose reads the watch never reports."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(folder))


def undeclared(caplog):
    return [r.getMessage() for r in caplog.records if "does not declare" in r.getMessage()]


def test_an_undeclared_read_is_warned_once_naming_task_file_and_fix(root, own_tmp, caplog, config):
    csv = os.path.join(root, "data", "financials.csv")
    write(csv, "1\n2\n")
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert build(Financials(root))
        write(os.path.join(root, "seed.txt"), "changed")
        assert build(Financials(root))
    assert ran(root) == ["Financials", "Financials"]
    (message,) = undeclared(caplog)  # once per process
    assert str(Financials(root)) in message and csv in message
    assert "requires()" in message and "extra_inputs()" in message
    # Without the declaration an edit reruns nothing; [hashcheck] audit_reads = false is silent.
    write(csv, "5\n")
    assert build(Financials(root)) and ran(root) == []
    hc._forget_process_state()
    caplog.clear()
    config("hashcheck", "audit_reads", "false")
    write(os.path.join(root, "seed.txt"), "again")
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert build(Financials(root))
    assert ran(root) == ["Financials"] and undeclared(caplog) == []


def test_declared_reads_imports_and_config_reads_are_not_warned(root, own_tmp, caplog):
    write(os.path.join(root, "tidy_helper.py"), "VALUE = 1\n")
    write(os.path.join(root, "luigi.cfg"), "[core]\nautoload_range = false\n")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with caplog.at_level(logging.WARNING, logger="luigi-interface"):
            assert build(Tidy(root))
    finally:
        os.chdir(cwd)
        sys.modules.pop("tidy_helper", None)
    assert ran(root) == ["Tidy"]
    assert undeclared(caplog) == []


def test_extra_inputs_are_hashed_so_an_edit_reruns_the_task(root, own_tmp, caplog):
    csv = os.path.join(root, "data", "financials.csv")
    write(csv, "1\n2\n")
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert build(Financials(root, declare=True))
        assert build(Financials(root, declare=True))
        assert ran(root) == ["Financials"]
        write(csv, "5\n")
        assert build(Financials(root, declare=True))
    assert ran(root) == ["Financials"]
    assert read(os.path.join(root, "report-True.txt")) == "hello 5"
    assert [e["path"] for e in record_of(os.path.join(root, "report-True.txt"))["inputs"]] == ["seed.txt", "data/financials.csv"]
    assert undeclared(caplog) == []



class FailsWhenTold(luigi.Task):
    """A plain dynamic dependency that fails while FAIL exists in its root."""

    root = luigi.Parameter()
    v = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, f"dyn-{self.v}.txt"))

    def run(self):
        if os.path.exists(os.path.join(self.root, "FAIL")):
            raise RuntimeError("the dynamic dependency fails")
        write(self.output().path, "")


class TrainsAfterYield(HashCheckingTask):
    root = luigi.Parameter()

    def extra_inputs(self):
        return [os.path.join(self.root, "raw.txt")]

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "model.bin"))

    def run(self):
        v = read(os.path.join(self.root, "raw.txt"))
        yield FailsWhenTold(self.root, v)
        note_run(self.root, "TrainsAfterYield")
        write(self.output().path, "a day of training on " + v)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_abandoned_rerun_whose_dynamic_dependency_fails_gets_its_outputs_back_when_the_build_ends(root, workers, caplog):
    # Found in review: the outputs stayed set aside after the build, and forget then deleted them.
    write(os.path.join(root, "raw.txt"), "v1")
    assert build(TrainsAfterYield(root), workers=workers)
    write(os.path.join(root, "raw.txt"), "v2")
    write(os.path.join(root, "FAIL"), "")
    assert not build(TrainsAfterYield(root), workers=workers)
    assert read(os.path.join(root, "model.bin")) == "a day of training on v1"
    assert not [n for n in os.listdir(os.path.join(root, ".luigi_hashes")) if n.endswith((".stale-output", ".stale-record"))]
    os.remove(os.path.join(root, "FAIL"))
    ran(root)
    assert build(TrainsAfterYield(root), workers=workers)  # still stale, and nothing holds it back
    assert ran(root) == ["TrainsAfterYield"]
    assert read(os.path.join(root, "model.bin")) == "a day of training on v2"

###############################################################################
# Folders of many files #######################################################
###############################################################################
#
# A folder's files are listed once, in a listing beside its record; records hold digests.
# 20,000 files in 20 subfolders: a few seconds to make, and far past any inline list. Marked
# folders: .ci/run runs them once, with README's command, not on every Python and Luigi.

LARGE = 20_000


def make_tiles(folder, count=LARGE, per=1000):
    for sub in range(count // per):
        os.makedirs(os.path.join(folder, f"d{sub:03d}"), exist_ok=True)
        for i in range(per):
            fd = os.open(os.path.join(folder, f"d{sub:03d}", f"t{i:05d}.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, b'{"tile": %d}' % (sub * per + i))
            os.close(fd)


class Tiles(HashCheckingTask):
    root = luigi.Parameter(significant=False)  # so a copied tree's records still hold

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "tiles"))

    def run(self):
        note_run(self.root, "Tiles")
        with self.output().temporary_path() as tmp:
            make_tiles(tmp)


class CountTiles(HashCheckingTask):
    root = luigi.Parameter(significant=False)  # so a copied tree's records still hold
    name = luigi.Parameter(default="count")

    def requires(self):
        return Tiles(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, self.name + ".txt"))

    def run(self):
        note_run(self.root, self.name)
        count = sum(len(files) for _folder, _dirs, files in os.walk(self.input().path))
        write(self.output().path, str(count))


class RawFolder(luigi.ExternalTask):
    path = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(self.path)


class CountRaw(HashCheckingTask):
    """Reads a folder that no task made."""

    root = luigi.Parameter(significant=False)  # so a copied tree's records still hold

    def requires(self):
        return RawFolder(os.path.join(self.root, "raw"))

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "out", "raw-count.txt"))

    def run(self):
        note_run(self.root, "CountRaw")
        write(self.output().path, str(sum(len(files) for _folder, _dirs, files in os.walk(self.input().path))))


def steady(root, *tasks):
    """Build, age every file, and build again, so that the records vouch for the files."""
    assert build(*tasks)
    age(root)
    assert build(*tasks)
    as_new_process()


def sidecars(folder):
    return sorted(name for name in os.listdir(os.path.join(folder, ".luigi_hashes")) if name.endswith(".list"))


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A steady tiles folder and two consumers, made once, copied for each test."""
    root = str(tmp_path_factory.mktemp("tiled"))
    steady(root, CountTiles(root), CountTiles(root, name="other"))
    return root


@pytest.fixture
def tiles(tiled, tmp_path):
    root = str(tmp_path / "copy")
    subprocess.run(["cp", "-a", tiled, root], check=True)  # twice as fast as shutil.copytree at 20,000 files
    ran(root)
    age(root)  # a copy has new inodes: the first check hashes again, and the records are refreshed
    assert build(CountTiles(root), CountTiles(root, name="other"))
    assert ran(root) == []
    as_new_process()
    return root


@pytest.mark.folders
def test_a_folder_listing_is_stored_once_and_records_stay_small(tiled):
    tiles = tiled  # only read: no copy needed
    record_file = os.path.join(tiles, ".luigi_hashes", "tiles.json")
    assert os.path.getsize(record_file) < 2048
    entry = record_of(os.path.join(tiles, "tiles"))["output"]
    assert entry["count"] == LARGE and "files" not in entry
    assert sidecars(tiles) == [entry["listing"]] and entry["listing"] == f"tiles.{entry['listing_digest'][:16]}.list"
    lines = listing_of(os.path.join(tiles, "tiles"))
    assert len(lines) == LARGE and [line[0] for line in lines] == sorted(line[0] for line in lines)
    for consumer in ("count", "other"):
        record = record_of(os.path.join(tiles, consumer + ".txt"))
        (entry,) = record["inputs"]
        # A reader names its maker's listing, and holds no copy of it.
        assert len(json.dumps(entry)) <= 4096 and "files" not in entry
        assert entry["listing"] == record_of(os.path.join(tiles, "tiles"))["output"]["listing"]
        assert os.path.getsize(os.path.join(tiles, ".luigi_hashes", consumer + ".txt.json")) < 4096
    assert sidecars(tiles) == [entry["listing"]]


@pytest.mark.folders
def test_a_no_op_check_of_a_large_folder_reads_no_file_nor_its_listing(tiled, monkeypatch):
    tiles = tiled  # a no-op writes nothing: no copy needed
    ran(tiles)
    opened = []
    real = hc._read_blocks  # private: the one call through which listings are read
    monkeypatch.setattr(hc._LocalStorage, "read_blocks", staticmethod(lambda path: opened.append(path) or real(path)))
    assert build(CountTiles(tiles), CountTiles(tiles, name="other"))
    assert ran(tiles) == [] and counters["reads"] == 0 and opened == []


@pytest.mark.folders
@pytest.mark.parametrize("edit", ["edited", "added", "removed", "renamed"])
def test_one_file_changed_in_a_large_folder_is_the_only_one_hashed_and_named(tiles, edit, capsys):
    folder = os.path.join(tiles, "tiles")
    path = os.path.join(folder, "d007", "t00123.json")
    if edit == "edited":
        write(path, '{"tile": 99999}')
    elif edit == "added":
        write(os.path.join(folder, "d007", "new.json"), "{}")
    elif edit == "removed":
        os.remove(path)
    else:
        os.rename(path, os.path.join(folder, "d019", "moved.json"))
    assert not Tiles(tiles).complete()
    assert counters["reads"] == {"edited": 1, "added": 1, "removed": 0, "renamed": 1}[edit]
    # Of the listing, only the block of each changed subfolder (1,000 files) is merged file
    # by file; every other block is taken whole.
    assert counters["lines_merged"] == {"edited": 1000, "added": 1000, "removed": 1000, "renamed": 2000}[edit]
    as_new_process()
    _code, out, _ = cli_main(["explain", "--module", __name__, "Tiles", "--root", tiles], capsys)
    named = {
        "edited": "1 files changed: edited d007/t00123.json",
        "added": "1 files changed: added d007/new.json",
        "removed": "1 files changed: removed d007/t00123.json",
        "renamed": "2 files changed: removed d007/t00123.json, added d019/moved.json",
    }[edit]
    assert named in out, out
    assert build(CountTiles(tiles))
    assert ran(tiles) == ["Tiles"]  # which makes the same tiles again: its reader is spared


class FreshTiles(HashCheckingTask):
    """300 files, recorded the moment they are written: its listing vouches for none."""

    root = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "tiles"))

    def run(self):
        note_run(self.root, "FreshTiles")
        with self.output().temporary_path() as tmp:
            make_tiles(tmp, 300, 100)


class SlowReader(HashCheckingTask):
    """Reads FreshTiles for over _TICK_NS, so its check after run() hashes the files when
    their stats vouch: its listing of them is not its maker's."""

    root = luigi.Parameter()
    name = luigi.Parameter()

    def requires(self):
        return FreshTiles(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, self.name + ".txt"))

    def run(self):
        note_run(self.root, self.name)
        time.sleep(hc._TICK_NS / 1e9 + 0.2)
        write(self.output().path, str(sum(len(files) for _folder, _dirs, files in os.walk(self.input().path))))


def test_a_folder_read_after_its_files_settled_keeps_a_listing_through_plain_builds(tmp_path, caplog):
    # Nothing aged by hand: a folder written and recorded at once, read by tasks that take
    # over two seconds. Their checks list the folder anew, flags vouching, and name that
    # listing, which never reaches disk; the next build takes their digest whole and
    # refreshes the maker's record from it. That record once named the lost listing and
    # dropped its own: one touched file then cost a full hash and a warning. It keeps its own
    # now, whose flags do not vouch: the first touch costs one full hash, quietly, and the
    # listing made then serves every later one.
    root = str(tmp_path)
    readers = [SlowReader(root, "a"), SlowReader(root, "b")]
    caplog.set_level(logging.WARNING, logger="luigi-interface")
    assert build(*readers, workers=2) and sorted(ran(root)) == ["FreshTiles", "a", "b"]
    records = os.path.join(root, ".luigi_hashes")
    for reader in ("a", "b"):
        then = time.time() - 100
        os.utime(os.path.join(root, reader + ".txt"), (then, then))  # so that only the tiles are counted below
    as_new_process()
    assert build(*readers) and ran(root) == []
    entry = record_of(os.path.join(root, "tiles"))["output"]
    assert entry.get("listing") and os.path.exists(os.path.join(records, entry["listing"])), (entry, sidecars(root))
    assert sidecars(root) == [entry["listing"]]  # still one listing of the folder
    reads = []
    for name in ("d001/t00007.json", "d002/t00008.json"):
        then = time.time() - 50
        os.utime(os.path.join(root, "tiles", name), (then, then))  # touched: the same bytes
        as_new_process()
        assert build(*readers) and ran(root) == []
        reads.append(counters["reads"])
    assert reads == [300, 1], reads
    assert [r.getMessage() for r in caplog.records if "listing" in r.getMessage()] == []


@pytest.mark.folders
def test_a_check_that_finds_its_output_folder_changed_makes_no_listing(tiles):
    # Its task reruns and lists the folder anew: a listing made by the check (about 130
    # bytes a file, hashed and written) would be made for nothing. The last file, so the
    # whole listing is read before the change shows.
    write(os.path.join(tiles, "tiles", "d019", "t00999.json"), "edited")
    assert not Tiles(tiles).complete()
    assert counters["reads"] == 1 and not hc._pending
    assert build(CountTiles(tiles)) and ran(tiles) == ["Tiles"]
    assert len(listing_of(os.path.join(tiles, "tiles"))) == LARGE


@pytest.mark.folders
def test_a_walk_past_its_memory_limit_spills_to_a_temporary_file_and_decides_the_same(tiles, monkeypatch):
    # Ten million files' stat lines are about 480 MB: past _WALK_HELD_LIMIT bytes the walk
    # is kept in a temporary file. Set low here, so 20,000 files spill.
    monkeypatch.setattr(hc, "_WALK_HELD_LIMIT", 64 << 10)
    spilled, real = [], hc._WalkChunks._spill
    monkeypatch.setattr(hc._WalkChunks, "_spill", lambda self: spilled.append(self.held_bytes) or real(self))
    folder = os.path.join(tiles, "tiles")
    then = time.time() - 50
    os.utime(os.path.join(folder, "d004", "t00004.json"), (then, then))  # touched: the same bytes
    assert Tiles(tiles).complete() and counters["reads"] == 1 and len(spilled) == 1
    as_new_process()
    write(os.path.join(folder, "d019", "t00999.json"), "edited")  # the last file: every block read first
    assert not Tiles(tiles).complete()
    assert counters["reads"] == 1 and counters["lines_merged"] == 1000 and len(spilled) == 2
    as_new_process()
    assert build(CountTiles(tiles)) and ran(tiles) == ["Tiles"]
    assert len(listing_of(folder)) == LARGE


@pytest.mark.parametrize("fails", [None, "making the file", "the third write"])
def test_walk_chunks_read_back_as_written_from_memory_a_file_or_memory_when_the_file_fails(monkeypatch, caplog, fails):
    # Stand-ins for a temporary folder with no room: as root, no folder can be made unwritable.
    chunks = [b"a\t1\t2\t3\n" * n for n in (1, 700, 3, 900, 2, 50)]
    monkeypatch.setattr(hc, "_WALK_HELD_LIMIT", 5000)
    caplog.set_level(logging.WARNING, logger="luigi-interface")
    no_room = OSError(errno.ENOSPC, "No space left on device")
    if fails == "making the file":

        def no_file(*args, **kwargs):
            raise no_room

        monkeypatch.setattr(hc.tempfile, "TemporaryFile", no_file)
    if fails == "the third write":
        real, writes = hc._WalkChunks._write, []

        def write_twice(self, data):
            writes.append(data)
            if len(writes) == 3:
                raise no_room
            real(self, data)

        monkeypatch.setattr(hc._WalkChunks, "_write", write_twice)
    walk = hc._WalkChunks()
    walk.append(chunks[0])
    assert walk.file is None and list(walk) == chunks[:1]  # under the limit: in memory
    for data in chunks[1:]:
        walk.append(data)
    assert list(walk) == chunks and list(walk) == chunks  # in order, as often as wanted
    in_file, in_memory = len(walk.sizes), len(walk.held)
    assert (in_file, in_memory) == {None: (6, 0), "making the file": (0, 6), "the third write": (2, 4)}[fails]
    walk.close()
    assert list(walk) == []
    warned = [r.getMessage() for r in caplog.records if "temporary file" in r.getMessage()]
    assert len(warned) == (1 if fails else 0), warned
    assert all("No space left" in message and "TMPDIR" in message for message in warned)


@pytest.mark.folders
@pytest.mark.parametrize("case", ["a few files", "every file", "listing gone"])
def test_a_touched_output_folder_keeps_a_listing_of_its_new_stats(tiles, monkeypatch, caplog, case):
    # A check of a task holds its output folder's new listing until the digest shows the
    # folder is as recorded; then the refreshed record names it, taken from the listing it read. Holding
    # more than _HELD_LIMIT bytes of new blocks writes it at once; if the listing read is
    # gone when it is read again, the record is made without one, with a warning then, as the
    # full hash it costs at the next change gives none; never a rebuild.
    folder = os.path.join(tiles, "tiles")
    names = [f"d{sub:03d}/t{i:05d}.json" for sub in range(20) for i in range(1000)]
    touched = names if case == "every file" else names[3000:3005]
    if case == "every file":
        monkeypatch.setattr(hc, "_HELD_LIMIT", 200_000)  # two blocks of 1,000 files
    if case == "listing gone":
        real, calls = hc._LOCAL.read_blocks, []

        def read_blocks(path):
            calls.append(path)
            if len(calls) > 1:
                raise FileNotFoundError(errno.ENOENT, "removed by another build", path)
            return real(path)

        monkeypatch.setattr(hc._LOCAL, "read_blocks", read_blocks)
    then = time.time() - 50
    for name in touched:
        os.utime(os.path.join(folder, name), (then, then))
    # Tiles alone: a build of CountTiles looks at the folder first as its input, and makes
    # the new listing at once.
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert build(Tiles(tiles)) and ran(tiles) == []
    assert counters["reads"] == len(touched) and len(calls if case == "listing gone" else [1, 1]) == 2
    warned = [r.getMessage() for r in caplog.records if "listing" in r.getMessage()]
    if case == "listing gone":
        assert len(warned) == 1 and calls[0] in warned[0] and folder in warned[0] and "it is gone" in warned[0], warned
    else:
        assert warned == []
    monkeypatch.undo()
    as_new_process()
    entry = record_of(folder)["output"]
    if case == "listing gone":
        assert "listing" not in entry and sidecars(tiles) == []  # the old listing goes with the record that named it
    else:
        listed = {name: (digest, int(mtime)) for name, digest, _size, mtime, _inode in listing_of(folder)}
        assert len(listed) == LARGE and sidecars(tiles) == [entry["listing"]]
        assert all(listed[name][1] == os.stat(os.path.join(folder, name)).st_mtime_ns for name in touched)
    write(os.path.join(folder, "d010", "t00010.json"), "edited")
    assert not Tiles(tiles).complete()
    assert counters["reads"] == (LARGE if case == "listing gone" else 1)
    assert build(CountTiles(tiles)) and ran(tiles) == ["Tiles"]


@pytest.mark.folders
def test_many_changed_files_are_named_ten_at_a_time_with_a_count(tiles, capsys):
    for i in range(25):
        write(os.path.join(tiles, "tiles", "d003", f"t00{i:03d}.json"), "changed")
    _code, out, _ = cli_main(["explain", "--module", __name__, "Tiles", "--root", tiles], capsys)
    assert "25 files changed: edited d003/t00000.json, " in out and " and 15 more" in out, out
    _code, out, _ = cli_main(["verify", "--json", os.path.join(tiles, "tiles")], capsys)
    (document,) = [o for o in json.loads(out)["outputs"] if o["path"].endswith("tiles")]
    assert document["status"] == "modified" and document["files"]["count"] == 25 and len(document["files"]["changed"]) == 25


@pytest.mark.folders
@pytest.mark.parametrize("damage", ["damaged", "a digest changed", "a block too large", "an empty block", "truncated", "missing", "not a listing"])
def test_a_lost_listing_costs_one_full_hash_and_one_warning_never_a_rebuild(tiles, damage, caplog):
    entry = record_of(os.path.join(tiles, "tiles"))["output"]
    path = os.path.join(tiles, ".luigi_hashes", entry["listing"])
    with open(path, "rb") as f:
        data = f.read()
    if damage == "damaged":
        data = data.replace(b"t00001.json\t", b"t00001.json\tx")
    elif damage == "a digest changed":
        # In a block the check takes whole, whose digest lines it hashes as they are: only
        # the listing's own digest, at its end, shows the damage.
        at = data.index(b"  d005/t00001.json\n") - 1
        data = data[:at] + (b"0" if data[at : at + 1] != b"0" else b"1") + data[at + 1 :]
    elif damage == "a block too large":
        head = data.index(b"\n") + 1
        data = data[:head] + b"1000 99999999999 1" + data[data.index(b"\n", head) :]
    elif damage == "an empty block":
        # Well formed but of no file, which no writer makes: read before the listing's
        # digest at its end shows the damage.
        head = data.index(b"\n") + 1
        data = data[:head] + b"0 0 0\n\n" + data[head:]
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "not a listing":
        data = b"[]\n"
    os.remove(path)
    if damage != "missing":
        write(path, data.decode("utf-8"))
    then = time.time() - 50
    os.utime(os.path.join(tiles, "tiles", "d000", "t00000.json"), (then, then))  # so the check needs the listing
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert build(CountTiles(tiles), CountTiles(tiles, name="other"))
    assert ran(tiles) == []
    warned = [r.getMessage() for r in caplog.records if "listing" in r.getMessage()]
    assert len(warned) == 1 and entry["listing"] in warned[0] and "nothing is rebuilt" in warned[0], warned
    # Before the damage shows, at the listing's end, the touched file and those of lines it
    # garbled are hashed once more.
    assert LARGE <= counters["reads"] <= LARGE + 100
    # The full hash matched, and its listing replaced the lost one.
    as_new_process()
    assert sidecars(tiles) == [record_of(os.path.join(tiles, "tiles"))["output"]["listing"]]
    assert build(CountTiles(tiles)) and counters["reads"] == 0


@pytest.mark.folders
def test_a_listing_of_lines_as_the_version_before_wrote_still_serves(tiles, caplog):
    # The first listing format: a line per file, NAME SIZE MTIME INODE VOUCHES DIGEST
    # HASHED_NS. Such a listing still spares every unchanged file its hash, and the next
    # record made writes the listing of blocks.
    output = os.path.join(tiles, "tiles")
    record_file = os.path.join(tiles, ".luigi_hashes", "tiles.json")
    record = record_of(output)
    lines = [f"{name}\t{size}\t{mtime}\t{inode}\tv\t{digest}\t{int(mtime) + 10**10}\n" for name, digest, size, mtime, inode in listing_of(output)]
    data = ("luigi_hashcheck listing 1\n" + "".join(lines)).encode()
    for name in sidecars(tiles):
        os.remove(os.path.join(tiles, ".luigi_hashes", name))
    digest = hashlib.sha256(data).hexdigest()
    record["output"].update(listing=f"tiles.{digest[:16]}.list", listing_digest=digest)
    with open(os.path.join(tiles, ".luigi_hashes", record["output"]["listing"]), "wb") as f:
        f.write(data)
    with open(record_file, "w") as f:
        json.dump(record, f)
    write(os.path.join(output, "d007", "t00123.json"), '{"tile": 99999}')
    as_new_process()
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert not Tiles(tiles).complete()
    assert counters["reads"] == 1 and counters["lines_merged"] == LARGE
    assert not [r for r in caplog.records if "listing" in r.getMessage()]
    assert build(CountTiles(tiles)) and ran(tiles) == ["Tiles"]
    assert len(listing_of(output)) == LARGE  # read as blocks, or it fails
    assert sidecars(tiles) == [record_of(output)["output"]["listing"]]


@pytest.mark.folders
def test_a_listing_of_lines_with_a_newline_moved_costs_a_warning_not_a_crash(tmp_path, caplog):
    # Two bytes of a first-format listing swapped: a newline two fields on, so that one line
    # holds a file's line and the next's stat, and the next only VOUCHES DIGEST HASHED_NS.
    # The fields still line up with the walk's, so the chunk is taken whole; the listing's
    # digest shows the damage only at its end, and the lines must not be split before then.
    root = str(tmp_path)
    for name in ("s/a", "s/b", "z"):
        write(os.path.join(root, "raw", name), name)
    steady(root, CountRaw(root))
    assert ran(root) == ["CountRaw"]
    (entry,) = record_of(os.path.join(root, "out", "raw-count.txt"))["inputs"]
    a, b, z = listing_of(os.path.join(root, "out", "raw-count.txt"), entry)
    hashed = int(a[3]) + 10**10
    data = (
        "luigi_hashcheck listing 1\n"
        f"s/a\t{a[2]}\t{a[3]}\t{a[4]}\tv\t{a[1]}\t{hashed}\ts/b\t{b[2]}\t{b[3]}\t{b[4]}\n"
        f"v\t{b[1]}\t{hashed}\n"
        f"z\t{z[2]}\t{z[3]}\t{z[4]}\tv\t{z[1]}\t{hashed}\n"
    )
    write(os.path.join(root, "out", ".luigi_hashes", entry["listing"]), data)
    then = time.time() - 50
    os.utime(os.path.join(root, "raw", "z"), (then, then))  # so the check needs the listing
    as_new_process()
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert build(CountRaw(root))
    assert ran(root) == []
    warned = [r.getMessage() for r in caplog.records if "listing" in r.getMessage()]
    assert len(warned) == 1 and entry["listing"] in warned[0], warned


@pytest.mark.folders
def test_a_folder_recorded_the_old_way_is_checked_the_old_way_then_rewritten_the_new_way(tiles, caplog):
    output = os.path.join(tiles, "tiles")
    record_file = os.path.join(tiles, ".luigi_hashes", "tiles.json")
    record = record_of(output)
    lines = listing_of(output)
    # Today's format before sidecars: every file inline, in the record.
    old = {k: v for k, v in record["output"].items() if k not in ("count", "stats", "listing", "listing_digest")}
    # Hashed ten seconds after each file's mtime, so each digest vouches for its file.
    old["files"] = [[rel, digest, int(size), int(mtime), int(inode), int(mtime) + 10**10] for rel, digest, size, mtime, inode in lines]
    record["output"] = old
    for name in sidecars(tiles):
        os.remove(os.path.join(tiles, ".luigi_hashes", name))
    with open(record_file, "w") as f:
        json.dump(record, f)
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert Tiles(tiles).complete()
    assert counters["reads"] == 0 and not [r for r in caplog.records if "listing" in r.getMessage()]
    # That first check refreshed the record, in the new format: its stats spare the next
    # check the listing.
    entry = record_of(output)["output"]
    assert "files" not in entry and entry["count"] == LARGE and sidecars(tiles) == [entry["listing"]]
    assert len(listing_of(output)) == LARGE


@pytest.mark.folders
def test_a_raw_folder_keeps_one_listing_beside_its_readers_record(tmp_path, capsys):
    root = str(tmp_path)
    make_tiles(os.path.join(root, "raw"))
    steady(root, CountRaw(root))
    assert ran(root) == ["CountRaw"]
    (entry,) = record_of(os.path.join(root, "out", "raw-count.txt"))["inputs"]
    assert len(json.dumps(entry)) <= 4096 and entry["listing"].startswith("raw-count.txt.")
    assert sidecars(os.path.join(root, "out")) == [entry["listing"]]
    assert not os.path.exists(os.path.join(root, ".luigi_hashes"))  # nothing written beside raw data
    assert len(listing_of(os.path.join(root, "out", "raw-count.txt"), entry)) == LARGE
    assert build(CountRaw(root)) and ran(root) == [] and counters["reads"] == 0
    write(os.path.join(root, "raw", "d001", "t00001.json"), "edited")
    as_new_process()
    _code, out, _ = cli_main(["explain", "--module", __name__, "CountRaw", "--root", root], capsys)
    assert "edited d001/t00001.json" in out, out
    assert build(CountRaw(root)) and ran(root) == ["CountRaw"]
    entry = record_of(os.path.join(root, "out", "raw-count.txt"))["inputs"][0]
    assert sidecars(os.path.join(root, "out")) == [entry["listing"]]  # the old one is gone


def sha256sum_of(folder):
    """A folder's digest by its definition, without the module: sha256 of sorted
    ``DIGEST  NAME`` lines, a link to a folder or to nothing counting as ``link:TARGET``."""
    lines = []
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".luigi_hashes" and not os.path.islink(os.path.join(dirpath, d))]
        names = files + [d for d in os.listdir(dirpath) if os.path.islink(os.path.join(dirpath, d)) and d not in files]
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if os.path.islink(path) and (os.path.isdir(path) or not os.path.exists(path)):
                lines.append((rel, f"link:{os.readlink(path)}  {rel}\n"))
            else:
                with open(path, "rb") as f:
                    lines.append((rel, f"{hashlib.sha256(f.read()).hexdigest()}  {rel}\n"))
    text = "".join(line for _rel, line in sorted(lines))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


@pytest.mark.parametrize("odd", ["", "a\tb", "a\\b", "a\x01"])
def test_a_folder_digest_orders_files_and_subfolders_as_their_sorted_paths(tmp_path, monkeypatch, odd):
    # The walk sorts a folder's stat lines themselves when no name needs an escape, and by
    # name otherwise; either way files and subfolders interleave as sorted paths do.
    folder = str(tmp_path / "f")
    for name in ["a", "a b", "a-b", "a0", "a.txt", "A", "b", "~", "é", "a-/x", "a_/y", "aa/b/c", "a.d/z", *([odd] if odd else [])]:
        write(os.path.join(folder, *name.split("/")), name)
    for width in (1000, 2):  # chunks of 1,000 stat lines, and of 2
        monkeypatch.setattr(hc, "_CHUNK_LINES", width)  # private: how many lines a chunk holds
        assert hc._digest(folder, "sha256", trust_mtime=False)["digest"] == sha256sum_of(folder)


@pytest.mark.stress
def test_a_folder_check_that_takes_unchanged_subfolders_whole_agrees_with_a_full_hash(tmp_path, capsys):
    # Subfolders whose files are all as listed are compared whole; those with names that
    # need escapes, links, or a changed file are taken line by line. Either way the digest
    # must be the folder's own, and only the changed file is read.
    root = str(tmp_path)
    raw = os.path.join(root, "raw")
    for sub in ("a", "z"):
        for i in range(40):
            write(os.path.join(raw, sub, f"f{i:03d}"), f"{sub}{i}")
    for name in ("back\\slash", "tab\tname", "new\nline", "two  spaces", "\u00fcn\u00ef", "cr\rname"):
        write(os.path.join(raw, "odd", name), name)
    write(os.path.join(raw, "links", "file"), "target")
    os.symlink("file", os.path.join(raw, "links", "to-file"))
    os.symlink("../a", os.path.join(raw, "links", "to-folder"))
    os.symlink("nowhere", os.path.join(raw, "links", "dangling"))
    steady(root, CountRaw(root))
    assert ran(root) == ["CountRaw"]
    record = os.path.join(root, "out", "raw-count.txt")
    assert record_of(record)["inputs"][0]["digest"] == sha256sum_of(raw)
    for edited in ("z/f039", "a/f000", "odd/two  spaces", "links/file"):
        with open(os.path.join(raw, *edited.split("/")), "a") as f:
            f.write(" edited")
        as_new_process()
        assert not CountRaw(root).complete()
        assert counters["reads"] == (2 if edited == "links/file" else 1), edited  # a link to a file counts by the file
        as_new_process()
        _code, out, _ = cli_main(["explain", "--module", __name__, "CountRaw", "--root", root], capsys)
        changed = "2 files changed: edited links/file, edited links/to-file" if edited == "links/file" else f"1 files changed: edited {edited}"
        assert changed in out, out
        assert build(CountRaw(root)) and ran(root) == ["CountRaw"]
        assert record_of(record)["inputs"][0]["digest"] == sha256sum_of(raw)
        age(root)
        assert build(CountRaw(root)) and ran(root) == []


def test_a_flat_folder_with_one_changed_file_is_merged_line_by_line_only_around_it(tmp_path, monkeypatch, capsys):
    # A folder's files come in chunks of at most 1,000 stat lines, so one changed file in a
    # flat folder costs one chunk line by line, not the whole folder.
    root = str(tmp_path)
    raw = os.path.join(root, "raw")
    for i in range(2500):
        write(os.path.join(raw, f"f{i:05d}"), str(i))
    steady(root, CountRaw(root))
    assert ran(root) == ["CountRaw"]
    write(os.path.join(raw, "f01234"), "edited")
    taken = []
    real = hc._unchanged  # private: the merge's fast case, counted
    monkeypatch.setattr(hc, "_unchanged", lambda *args: taken.append(real(*args)) or taken[-1])
    assert not CountRaw(root).complete()
    # The chunks before and after are taken whole as their listing's blocks; the changed
    # one is tried as a run of lines (_unchanged), which fails, then merged line by line.
    assert counters["reads"] == 1 and counters["lines_merged"] == 1000 and taken == [None]
    monkeypatch.undo()
    as_new_process()
    _code, out, _ = cli_main(["explain", "--module", __name__, "CountRaw", "--root", root], capsys)
    assert "1 files changed: edited f01234" in out, out
    assert build(CountRaw(root)) and ran(root) == ["CountRaw"]
    assert record_of(os.path.join(root, "out", "raw-count.txt"))["inputs"][0]["digest"] == sha256sum_of(raw)


@pytest.mark.folders
def test_a_flat_folder_with_one_edited_file_is_merged_in_batches_not_held_whole(tmp_path, monkeypatch):
    # Were a flat folder one chunk of the walk, the one edit would make the merge split all
    # 20,000 stat lines and listed lines into fields at once, only to refuse them: over 1 KB
    # a file (helper r88 measured 22 MB). DESIGN.md promises a batch of lines.
    import tracemalloc

    root = str(tmp_path)
    raw = os.path.join(root, "raw")
    os.makedirs(raw)
    for i in range(LARGE):
        with open(os.path.join(raw, f"f{i:05d}"), "w") as f:
            f.write(str(i))
    steady(root, CountRaw(root))
    assert ran(root) == ["CountRaw"]
    write(os.path.join(raw, f"f{LARGE // 2:05d}"), "edited")
    merged, peaks = hc._merged, []

    def measured(*args):
        tracemalloc.start()  # here, not around the walk, which it would slow fivefold
        try:
            return merged(*args)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(hc, "_merged", measured)
    assert not CountRaw(root).complete()
    assert counters["reads"] == 1
    assert len(peaks) == 1 and peaks[0] < 12 << 20, peaks  # about 8 MB at any size; 22 MB whole
    assert build(CountRaw(root)) and ran(root) == ["CountRaw"]
    assert record_of(os.path.join(root, "out", "raw-count.txt"))["inputs"][0]["digest"] == sha256sum_of(raw)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
def test_explain_names_changed_files_on_one_line_and_unambiguously(tmp_path):
    # A name that is not UTF-8 (Latin-1, as old archives hold), one with a newline, one with
    # an escape character and one with a backslash: each is shown so that the reason stays
    # one line and ``back\\xe9`` (a backslash) cannot be read as a byte.
    root = str(tmp_path)
    raw = os.path.join(root, "raw")
    write(os.path.join(raw, "plain"), "x")
    odd = [os.path.join(os.fsencode(raw), name) for name in (b"back\\xe9", b"caf\xe9", b"esc\x1b[2J", b"two\nlines")]
    for path in odd:
        with open(path, "wb") as f:
            f.write(b"before")
    steady(root, CountRaw(root))
    assert ran(root) == ["CountRaw"]
    for path in odd:
        with open(path, "wb") as f:
            f.write(b"after!")
    module = os.path.splitext(os.path.basename(__file__))[0]
    result = run_python(["-m", "luigi_hashcheck", "explain", "--module", module, "CountRaw", "--root", root], root, env={"PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 1, result.stderr
    shown = "4 files changed: edited back\\\\xe9, edited caf\\xe9, edited esc\\x1b[2J, edited two\\nlines"
    assert shown in result.stdout, result.stdout
    assert [line for line in result.stdout.splitlines() if "files changed" in line] == [line for line in result.stdout.splitlines() if shown in line]
    assert "\x1b" not in result.stdout and "lines" not in result.stdout.replace(shown, "")
    result = run_python(["-m", "luigi_hashcheck", "verify", "--json", root], root, env={"PYTHONIOENCODING": "utf-8"})
    files = json.loads(result.stdout)["outputs"][0]["files"]
    assert files == {"changed": shown.split(": ", 1)[1].split(", "), "count": 4}, files


@pytest.mark.folders
def test_accept_of_an_edited_large_folder_writes_its_new_listing(tiles, capsys):
    write(os.path.join(tiles, "tiles", "d005", "t00005.json"), "by hand")
    code, out, _ = cli_main(["accept", os.path.join(tiles, "tiles")], capsys)
    assert code == 0 and "1 files changed: edited d005/t00005.json" in out, out
    entry = record_of(os.path.join(tiles, "tiles"))["output"]
    assert "files" not in entry and sidecars(tiles) == [entry["listing"]]
    lines = {line[0]: line[1] for line in listing_of(os.path.join(tiles, "tiles"))}
    assert len(lines) == LARGE and lines["d005/t00005.json"] == hashlib.sha256(b"by hand").hexdigest()
    as_new_process()
    assert Tiles(tiles).complete()


@pytest.mark.folders
def test_verify_shows_its_progress_through_a_large_folder(tiles, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    clock = iter(itertools.count(0, 0.5))
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    os.utime(os.path.join(tiles, "tiles", "d000", "t00000.json"), (time.time() - 50,) * 2)
    code, _out, err = cli_main(["verify", os.path.join(tiles, "tiles")], capsys)
    assert code == 0
    assert re.search(r"checked \d+ files of 20000 in \S*tiles, \d+ files/s, \d+ s left", err), err


@pytest.mark.folders
def test_forget_removes_a_records_listings(tiles, capsys):
    code, _out, _ = cli_main(["forget", os.path.join(tiles, "tiles")], capsys)
    assert code == 0 and sidecars(tiles) == []


KILL_DURING_LISTING = """
import os, sys, luigi, luigi_hashcheck as hc, test_luigi_hashcheck as t
real = hc._replace_from
def dying(path, source):
    # Die with the temporary file half written, as a kill -9 would leave it.
    name = os.path.join(os.path.dirname(path), hc._temporary_prefix(os.path.basename(path)) + hc._HOST + "~" + str(os.getpid()) + "~dead.tmp")
    with open(name, "wb") as f:
        f.write(os.pread(source.fileno(), 1000, 0))
    os._exit(9)
hc._LocalStorage.replace_from = staticmethod(dying)
luigi.build([t.Tiles(sys.argv[1])], local_scheduler=True, log_level="WARNING")
"""


@pytest.mark.folders
def test_a_kill_while_a_listing_is_written_leaves_the_old_record_and_listing_good(tiles):
    output = os.path.join(tiles, "tiles")
    before = record_of(output)
    then = time.time() - 50
    os.utime(os.path.join(output, "d000", "t00000.json"), (then, then))  # a refresh will write a new listing
    result = run_python(["-c", KILL_DURING_LISTING, tiles], tiles)
    assert result.returncode == 9, result.stderr
    assert record_of(output) == before and sidecars(tiles) == [before["output"]["listing"]]
    assert [n for n in os.listdir(os.path.join(tiles, ".luigi_hashes")) if n.endswith(".tmp")]
    as_new_process()
    assert build(CountTiles(tiles), CountTiles(tiles, name="other"))
    assert ran(tiles) == [] and counters["reads"] == 1  # only the touched file
    assert not [n for n in os.listdir(os.path.join(tiles, ".luigi_hashes")) if n.endswith(".tmp")]
    assert sidecars(tiles) == [record_of(output)["output"]["listing"]]



class SameStatFolderEditor(HashCheckingTask):
    """Rewrites a file of its folder input, made moments ago in the same build, without
    changing its stat."""

    root = luigi.Parameter()

    def requires(self):
        return Folder(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "same-stat-folder.txt"))

    def run(self):
        note_run(self.root, "SameStatFolderEditor")
        path = os.path.join(self.input().path, "one.txt")
        text = read(path)
        st = os.stat(path)
        with open(path, "r+") as f:  # same size, same inode
            f.write("9")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
        write(self.output().path, text)


def test_a_folder_input_rewritten_during_run_with_the_same_stat_is_caught(root):
    # Before run() the folder's listed digests vouch, as it is hashed again after run(); that
    # check must not let the walk's unchanged stats stand for files hashed within a tick.
    failures = failures_of(SameStatFolderEditor, SameStatFolderEditor(root))
    assert isinstance(failures[0], hc.InputChangedError), failures
    assert not os.path.exists(os.path.join(root, ".luigi_hashes", "same-stat-folder.txt.json"))


###############################################################################
# Other stores: Mock and S3 ###################################################
###############################################################################
#
# Luigi's MockTarget needs nothing; S3 is moto's real server on 127.0.0.1, reached by Luigi's
# own S3Client through [s3] endpoint_url, as a user points Luigi at MinIO. Requests are
# counted with botocore's event hooks, registered on boto3's default session before any
# client is made, so every S3Client's client counts.

import boto3
import luigi.contrib.gcs
import luigi.contrib.s3
from moto.server import ThreadedMotoServer

BUCKET = "hashcheck-test"


class S3Requests:
    """Counts of S3 calls by name, except those made inside a task's run() (``paused``);
    ``got``, the keys read by GetObject, in order."""

    def __init__(self):
        self.counts = collections_counter()
        self.paused = 0
        self.got = []

    def __call__(self, event_name, params=None, **_kwargs):
        if not self.paused:
            name = event_name.rsplit(".", 1)[1]
            self.counts[name] += 1
            if name == "GetObject":
                # before-call gives the request, not the call's arguments: the key is its path.
                path = urllib.parse.unquote((params or {}).get("url_path", "")).lstrip("/")
                self.got.append(path[len(BUCKET) + 1 :] if path.startswith(BUCKET + "/") else path)

    @contextlib.contextmanager
    def uncounted(self):
        """Leave out the calls made inside: a task's own run()."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def take(self):
        counts, self.counts = dict(self.counts), collections_counter()
        self.got = []
        return counts


def collections_counter():
    import collections

    return collections.Counter()


S3_REQUESTS = S3Requests()


@pytest.fixture(scope="session")
def moto_server():
    port = free_port()
    saved = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-call.s3", S3_REQUESTS)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3(moto_server, config, tmp_path):
    """A fresh bucket on moto; yields an S3Client made from luigi.cfg, as a pipeline's is."""
    import urllib.request

    # moto keeps buckets per process, across servers: reset between tests.
    urllib.request.urlopen(urllib.request.Request(moto_server + "/moto-api/reset", method="POST")).close()
    config("s3", "endpoint_url", moto_server)
    client = luigi.contrib.s3.S3Client()
    client.s3.meta.client.create_bucket(Bucket=BUCKET)
    write(tmp_path / "s3.cfg", f"[core]\nautoload_range = false\n[s3]\nendpoint_url = {moto_server}\n")
    client.cfg = str(tmp_path / "s3.cfg")
    client.note = tmp_path / "runs"
    S3_REQUESTS.take()
    yield client
    S3_REQUESTS.paused = 0


def s3_url(name):
    return f"s3://{BUCKET}/{name}"


def s3_note(name):
    with open(os.environ["HASHCHECK_S3_RUNS"], "a") as f:
        f.write(name + "\n")


def s3_ran():
    path = os.environ["HASHCHECK_S3_RUNS"]
    if not os.path.exists(path):
        return []
    with open(path) as f:
        names = f.read().split()
    os.remove(path)
    return names


@pytest.fixture
def s3_runs(s3, monkeypatch):
    monkeypatch.setenv("HASHCHECK_S3_RUNS", str(s3.note))
    return s3


class S3Raw(luigi.ExternalTask):
    name = luigi.Parameter(default="raw/in.txt")

    def output(self):
        return luigi.contrib.s3.S3Target(s3_url(self.name))


class S3Step(HashCheckingTask):
    """Reads its inputs (S3, or a local file), writes ``func`` of their text to S3."""

    name = luigi.Parameter()
    upstream = luigi.ListParameter(default=["raw"])
    local = luigi.Parameter(default="")

    def requires(self):
        below = {"up": ["raw"], "head": ["up"]}
        return [S3Raw() if up == "raw" else S3Step(up, below.get(up, ["head"])) for up in self.upstream]

    def input(self):
        inputs = luigi.task.flatten(super().input())
        return inputs + [luigi.LocalTarget(self.local)] if self.local else inputs

    def output(self):
        return luigi.contrib.s3.S3Target(s3_url(f"out/{self.name}.txt"))

    def run(self):
        with S3_REQUESTS.uncounted():
            s3_note(self.name)
            text = "".join(t.open("r").read() for t in self.input())
            with self.output().open("w") as f:
                f.write(text.upper() if self.name == "up" else text[:3] if self.name.startswith("head") else str(len(text)))


def test_s3_edit_no_op_early_cutoff_and_hand_edit(s3_runs):
    s3 = s3_runs
    s3.put_string("hello", s3_url("raw/in.txt"))
    top = S3Step("tail", ["head"])
    assert build(top) and s3_ran() == ["up", "head", "tail"]
    assert build(top) and s3_ran() == []
    record = json.loads(s3.get_as_string(s3_url("out/.luigi_hashes/head.txt.json")))
    assert record["format"] == 1 and record["inputs"][0]["path"] == "up.txt" and record["inputs"][0]["store"] == "s3"
    assert record["output"]["digest"] == hashlib.sha256(b"HEL").hexdigest()
    s3.put_string("help!", s3_url("raw/in.txt"))  # up changes, head stays HEL: early cutoff
    assert build(top) and s3_ran() == ["up", "head"]
    s3.put_string("HELLO", s3_url("out/up.txt"))  # by hand: up is rebuilt, and comes back the same
    assert build(top) and s3_ran() == ["up"]
    s3.put_string("xyz", s3_url("out/head.txt"))
    assert build(top) and s3_ran() == ["head"]
    assert s3.get_as_string(s3_url("out/head.txt")) == "HEL"
    s3.put_string("bye", s3_url("raw/in.txt"))
    assert build(top) and s3_ran() == ["up", "head", "tail"]


def test_s3_digest_is_sha256sum_and_a_reupload_of_the_same_bytes_reruns_nothing(s3_runs, tmp_path):
    s3 = s3_runs
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 << 19).hex().encode())  # over 8 MiB: a multipart upload, ETag "...-2"
    s3.put_multipart(str(big), s3_url("raw/in.txt"), part_size=8 << 20)
    assert s3.s3.meta.client.head_object(Bucket=BUCKET, Key="raw/in.txt")["ETag"].strip('"').endswith("-2")
    assert build(S3Step("head")) and s3_ran() == ["head"]
    record = json.loads(s3.get_as_string(s3_url("out/.luigi_hashes/head.txt.json")))
    assert record["inputs"][0]["digest"] == hashlib.sha256(big.read_bytes()).hexdigest()
    s3.put_string(big.read_bytes(), s3_url("raw/in.txt"))  # the same bytes in one part: another ETag
    assert not s3.s3.meta.client.head_object(Bucket=BUCKET, Key="raw/in.txt")["ETag"].strip('"').endswith("-2")
    hc._forget_process_state()
    assert build(S3Step("head")) and s3_ran() == []
    # The new token was saved, so the next process need not hash again.
    record = json.loads(s3.get_as_string(s3_url("out/.luigi_hashes/head.txt.json")))
    assert not record["inputs"][0]["token"]["etag"].endswith("-2")
    hc._forget_process_state()
    S3_REQUESTS.take()
    reads = hc._counts["reads"]
    assert build(S3Step("head")) and s3_ran() == []
    assert hc._counts["reads"] == reads  # nothing hashed


def test_s3_mixed_local_and_s3_inputs(s3_runs, tmp_path):
    s3 = s3_runs
    s3.put_string("hello", s3_url("raw/in.txt"))
    local = tmp_path / "local.txt"
    write(local, "LOCAL")
    task = S3Step("mixed", local=str(local))
    assert build(task) and s3_ran() == ["mixed"]
    record = json.loads(s3.get_as_string(s3_url("out/.luigi_hashes/mixed.txt.json")))
    assert [e["path"] for e in record["inputs"]] == ["../raw/in.txt", str(local)]
    assert "store" not in record["inputs"][1]
    assert build(task) and s3_ran() == []
    write(local, "OTHER")
    assert build(task) and s3_ran() == ["mixed"]


class S3Lattice(HashCheckingTask):
    """bench.py's lattice shape on S3: layer 0 reads a local seed, every other node three
    nodes of the layer below."""

    width = luigi.IntParameter()
    layer = luigi.IntParameter()
    i = luigi.IntParameter()
    seeds = luigi.Parameter()

    def requires(self):
        if self.layer == 0:
            return []
        return [S3Lattice(self.width, self.layer - 1, (self.i + k) % self.width, self.seeds) for k in range(3)]

    def input(self):
        return [luigi.LocalTarget(os.path.join(self.seeds, f"seed-{self.i}"))] if self.layer == 0 else luigi.task.flatten(super().input())

    def output(self):
        return luigi.contrib.s3.S3Target(s3_url(f"n{self.layer}-{self.i}.txt"))

    def run(self):
        with S3_REQUESTS.uncounted():
            text = "".join(t.open("r").read() for t in self.input())
            with self.output().open("w") as f:
                f.write(hashlib.sha256(text.encode()).hexdigest())


def test_s3_request_budget(s3, tmp_path):
    width, depth = 4, 3
    for i in range(width):
        write(tmp_path / f"seed-{i}", f"seed {i}")
    age(tmp_path)  # old seeds: their stat vouches at once, so no record is refreshed
    tops = [S3Lattice(width, depth - 1, i, str(tmp_path)) for i in range(width)]
    outputs, edges = width * depth, width * (depth - 1) * 3
    assert build(*tops)
    full = S3_REQUESTS.take()
    assert sum(full.values()) <= 4 * outputs + edges, full
    hc._forget_process_state()
    assert build(*tops)
    noop = S3_REQUESTS.take()
    assert sum(noop.values()) <= 2 * outputs, noop
    assert set(noop) == {"HeadObject", "GetObject"}


S3_TILES = 10_000  # the issue's size, in slow mode; CI builds 1,200, two LIST pages (moto takes ~10 ms a request)


def s3_tile_key(i):
    return f"out/tiles/d{i // 1000:02d}/t{i:05d}.json"


class S3Tiles(HashCheckingTask):
    """A folder of ``count`` small objects under one prefix, written with boto3 directly:
    S3Target has no folder writer."""

    count = luigi.IntParameter(default=S3_TILES)

    def output(self):
        return luigi.contrib.s3.S3Target(s3_url("out/tiles"))

    def run(self):
        from concurrent.futures import ThreadPoolExecutor

        with S3_REQUESTS.uncounted():
            s3_note("S3Tiles")
            api = self.output().fs.s3.meta.client
            with ThreadPoolExecutor(8) as pool:  # one PUT at a time would take minutes
                list(pool.map(lambda i: api.put_object(Bucket=BUCKET, Key=s3_tile_key(i), Body=b'{"tile": %d}' % i), range(self.count)))


class S3CountTiles(HashCheckingTask):
    count = luigi.IntParameter(default=S3_TILES)

    def requires(self):
        return S3Tiles(self.count)

    def output(self):
        return luigi.contrib.s3.S3Target(s3_url("out/count.txt"))

    def run(self):
        with S3_REQUESTS.uncounted():
            s3_note("S3CountTiles")
            api = self.output().fs.s3.meta.client
            pages = api.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="out/tiles/")
            with self.output().open("w") as f:
                f.write(str(sum(page.get("KeyCount", 0) for page in pages)))


@pytest.mark.folders
@pytest.mark.parametrize("count", [1200, pytest.param(S3_TILES, marks=pytest.mark.slow)])
def test_s3_a_folder_of_10000_objects_is_listed_once_and_a_no_op_costs_a_list_per_1000(s3_runs, caplog, count):
    s3 = s3_runs
    api = s3.s3.meta.client
    assert build(S3CountTiles(count)) and s3_ran() == ["S3Tiles", "S3CountTiles"]
    assert s3.get_as_string(s3_url("out/count.txt")) == str(count)
    # (a) The listing is an object beside the record; the reader's record names it, no copy.
    entry = json.loads(s3.get_as_string(s3_url("out/.luigi_hashes/tiles.json")))["output"]
    assert entry["count"] == count and "files" not in entry and entry["listing"] == f"tiles.{entry['listing_digest'][:16]}.list"
    records = sorted(item["Key"] for item in api.list_objects_v2(Bucket=BUCKET, Prefix="out/.luigi_hashes/")["Contents"])
    assert records == ["out/.luigi_hashes/count.txt.json", "out/.luigi_hashes/" + entry["listing"], "out/.luigi_hashes/tiles.json"]
    listing = api.get_object(Bucket=BUCKET, Key="out/.luigi_hashes/" + entry["listing"])["Body"].read()
    assert hashlib.sha256(listing).hexdigest() == entry["listing_digest"] and len(listing_files(listing)) == count
    (read,) = json.loads(s3.get_as_string(s3_url("out/.luigi_hashes/count.txt.json")))["inputs"]
    assert len(json.dumps(read)) <= 4096 and "files" not in read and read["listing"] == entry["listing"]
    # (b) A no-op in a new process: one LIST per 1,000 keys, one GET per record, no data GET.
    as_new_process()
    S3_REQUESTS.take()
    assert build(S3CountTiles(count)) and s3_ran() == []
    got, noop = S3_REQUESTS.got, S3_REQUESTS.take()
    assert sorted(got) == ["out/.luigi_hashes/count.txt.json", "out/.luigi_hashes/tiles.json"], got
    assert -(-count // 1000) <= noop.get("ListObjectsV2", 0) <= -(-count // 1000) + 2, noop
    assert sum(noop.values()) <= -(-count // 1000) + 8, noop
    # (c) One object edited: the check reads that object alone (and the listing), and the
    # folder is remade; the same tiles come back, so their reader is spared.
    api.put_object(Bucket=BUCKET, Key=s3_tile_key(1111), Body=b'{"tile": "edited"}')
    as_new_process()
    S3_REQUESTS.take()
    assert not S3Tiles(count).complete()
    got, check = S3_REQUESTS.got, S3_REQUESTS.take()
    assert [key for key in got if not key.startswith("out/.luigi_hashes/")] == [s3_tile_key(1111)], (got[:5], check)
    assert build(S3CountTiles(count)) and s3_ran() == ["S3Tiles"]
    assert api.get_object(Bucket=BUCKET, Key=s3_tile_key(1111))["Body"].read() == b'{"tile": 1111}'
    # (d) The listing lost: one full hash and one warning, no rebuild. The same bytes
    # uploaded in one multipart part change the listing's token of that object, so the
    # check cannot take the record's stats and needs the listing.
    entry = json.loads(s3.get_as_string(s3_url("out/.luigi_hashes/tiles.json")))["output"]
    api.delete_object(Bucket=BUCKET, Key="out/.luigi_hashes/" + entry["listing"])
    upload = api.create_multipart_upload(Bucket=BUCKET, Key=s3_tile_key(7))
    part = api.upload_part(Bucket=BUCKET, Key=s3_tile_key(7), UploadId=upload["UploadId"], PartNumber=1, Body=b'{"tile": 7}')
    api.complete_multipart_upload(
        Bucket=BUCKET, Key=s3_tile_key(7), UploadId=upload["UploadId"], MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]}
    )
    as_new_process()
    S3_REQUESTS.take()
    with caplog.at_level(logging.WARNING, logger="luigi-interface"):
        assert build(S3CountTiles(count)) and s3_ran() == []
    got, lost = S3_REQUESTS.got, S3_REQUESTS.take()
    warned = [r.getMessage() for r in caplog.records if "listing" in r.getMessage()]
    assert len(warned) == 1 and entry["listing"] in warned[0] and "nothing is rebuilt" in warned[0], warned
    assert len([key for key in got if key.startswith("out/tiles/")]) == count, lost
    # The full hash wrote a new listing, which spares the next process the hash.
    entry = json.loads(s3.get_as_string(s3_url("out/.luigi_hashes/tiles.json")))["output"]
    assert api.head_object(Bucket=BUCKET, Key="out/.luigi_hashes/" + entry["listing"])["ContentLength"] > 0
    as_new_process()
    S3_REQUESTS.take()
    assert build(S3CountTiles(count)) and s3_ran() == []
    got, again = S3_REQUESTS.got, S3_REQUESTS.take()
    assert not [key for key in got if key.startswith("out/tiles/")], again


def test_s3_workers_2(s3_runs):
    s3 = s3_runs
    s3.put_string("hello", s3_url("raw/in.txt"))
    tops = [S3Step(f"head{i}", ["up"]) for i in range(3)]
    assert build(*tops, workers=2)
    assert sorted(s3_ran()) == ["head0", "head1", "head2", "up"]
    assert build(*tops, workers=2) and s3_ran() == []
    s3.put_string("bye", s3_url("raw/in.txt"))
    assert build(*tops, workers=2) and sorted(s3_ran()) == ["head0", "head1", "head2", "up"]


def test_s3_damaged_and_hostile_records_mean_rebuild_with_one_warning(s3_runs, caplog):
    s3 = s3_runs
    s3.put_string("hello", s3_url("raw/in.txt"))
    task = S3Step("head")
    assert build(task) and s3_ran() == ["head"]
    record_url = s3_url("out/.luigi_hashes/head.txt.json")
    good = json.loads(s3.get_as_string(record_url))
    hostile = dict(good, output=dict(good["output"], token={"etag": ["not", "a", "string"]}))
    for data in ["{not json", json.dumps(hostile), json.dumps(dict(good, inputs=[dict(good["inputs"][0], path="../../../etc\0passwd")]))]:
        s3.put_string(data, record_url)
        hc._forget_process_state()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="luigi-interface"):
            assert build(task)
        assert s3_ran() == ["head"]
        assert sum("damaged record" in r.getMessage() and record_url in r.getMessage() for r in caplog.records) == 1
    assert build(task) and s3_ran() == []


def test_s3_a_missing_bucket_propagates_naming_the_store_and_deletes_nothing(s3_runs):
    class Lost(HashCheckingTask):
        def output(self):
            return luigi.contrib.s3.S3Target("s3://no-such-bucket-here/out/x.txt")

        def run(self):
            raise AssertionError("must not run")

    with pytest.raises(hc.StoreError, match="s3 s3://no-such-bucket-here/out/x.txt.*NoSuchBucket"):
        Lost().complete()
    assert not build(Lost())


def test_s3_a_missing_bucket_after_the_output_is_found_is_an_error_too(s3_runs):
    # S3Client calls every 404 "absent"; the record's GET tells NoSuchBucket from NoSuchKey.
    store = hc._S3Storage(s3_runs)
    with pytest.raises(hc.StoreError, match="NoSuchBucket"):
        store.read_record("s3://no-such-bucket-here/.luigi_hashes/x.json", 100)
    assert store.read_record(s3_url(".luigi_hashes/x.json"), 100) is None


S3_PIPELINE = """
import os
import luigi
import luigi.contrib.s3
from luigi_hashcheck import HashCheckingTask


class {ns}Node(HashCheckingTask):
    layer = luigi.IntParameter()
    i = luigi.IntParameter()

    def requires(self):
        return [{ns}Node(self.layer - 1, (self.i + k) % 3) for k in range(2)] if self.layer else []

    def output(self):
        return luigi.contrib.s3.S3Target("s3://{bucket}/{ns}/n%d-%d.txt" % (self.layer, self.i))

    def run(self):
        with open(os.path.join({runs!r}), "a") as f:
            f.write("%d-%d\\n" % (self.layer, self.i))
        text = "".join(t.open("r").read() for t in self.input()) or "seed %d" % self.i
        with self.output().open("w") as f:
            f.write(text[::-1])
"""

S3_BUILD = """
import sys, luigi, {ns}
ok = luigi.build([{ns}.{ns}Node(3, i) for i in range(3)], scheduler_host="127.0.0.1", scheduler_port=int(sys.argv[1]), workers=1, log_level="WARNING")
sys.exit(0 if ok else 1)
"""


def test_s3_two_worker_processes_through_one_luigid(s3, tmp_path, tmp_path_factory):
    ns = f"s3l{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs.log"
    write(tmp_path / f"{ns}.py", S3_PIPELINE.format(ns=ns, bucket=BUCKET, runs=str(runs)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, str(tmp_path)]), LUIGI_CONFIG_PATH=s3.cfg)
    with running_luigid(tmp_path_factory.mktemp("luigid"), cooldown=10) as port:
        script = S3_BUILD.format(ns=ns)
        builds = [subprocess.Popen([sys.executable, "-c", script, str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
        for process in builds:
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err.decode()
    done = runs.read_text().split()
    assert len(done) == 12 and len(set(done)) == 12  # each task once, across both processes
    runs.unlink()
    # A fresh process finds everything up to date: the records both processes wrote hold.
    result = subprocess.run([sys.executable, "-c", S3_BUILD.replace('scheduler_host="127.0.0.1", scheduler_port=int(sys.argv[1]), ', "local_scheduler=True, ").format(ns=ns)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert not runs.exists()


def test_s3_verify_forget_and_accept_from_another_folder_with_no_pipeline_code(s3_runs, tmp_path):
    s3 = s3_runs
    s3.put_string("hello", s3_url("raw/in.txt"))
    assert build(S3Step("tail", ["head"])) and s3_ran() == ["up", "head", "tail"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"LUIGI_CONFIG_PATH": s3.cfg}

    def cli(*args):
        return run_python(["-m", "luigi_hashcheck", *args], cwd=elsewhere, env=env)

    result = cli("verify", "--quiet", s3_url("out"))
    assert result.returncode == 0, result.stderr
    assert "3 outputs: 3 ok" in result.stdout
    s3.put_string("bye", s3_url("raw/in.txt"))
    result = cli("verify", "--quiet", s3_url("out/tail.txt"))  # follows the inputs upstream
    assert result.returncode == 1
    assert f"stale     {s3_url('out/tail.txt')}: upstream {s3_url('out/head.txt')} is stale" in result.stdout
    result = cli("verify", "--quiet", s3_url("out"))
    assert f"stale     {s3_url('out/up.txt')}: input ../raw/in.txt changed" in result.stdout
    s3.put_string("hello", s3_url("raw/in.txt"))
    s3.put_string("HELLO ", s3_url("out/up.txt"))  # a harmless change, accepted
    assert cli("verify", "--quiet", s3_url("out/up.txt")).returncode == 1
    result = cli("accept", s3_url("out/up.txt"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert cli("verify", "--quiet", s3_url("out/up.txt")).returncode == 0
    result = cli("forget", s3_url("out/head.txt"))
    assert result.returncode == 0 and "forgot" in result.stdout
    assert s3.get_key(s3_url("out/.luigi_hashes/head.txt.json")) is None
    result = cli("verify", "--quiet", s3_url("out"))
    assert result.returncode == 1 and f"unrecorded {s3_url('out/head.txt')}" in result.stdout
    assert build(S3Step("tail", ["head"])) and s3_ran() == ["head"]


def test_a_url_whose_client_is_missing_exits_2_naming_the_package(tmp_path):
    script = "import sys; sys.modules['boto3'] = None; from luigi_hashcheck import main; sys.exit(main(sys.argv[1:]))"
    result = run_python(["-c", script, "verify", "s3://bucket/out"], cwd=tmp_path)
    assert result.returncode == 2 and "pip install boto3" in result.stderr
    result = run_python(["-m", "luigi_hashcheck", "verify", "gs://bucket/out"], cwd=tmp_path)
    assert result.returncode == 2 and "--client-factory" in result.stderr


# GCS: gcp-storage-emulator, reached by Luigi's GCSClient through a discovery document whose
# rootUrl and baseUrl point at it (client_options would keep https for uploads).

GCS_FACTORY = """
import json, os
import googleapiclient
from google.auth.credentials import AnonymousCredentials
import luigi.contrib.gcs


def client(scheme):
    assert scheme == "gs"
    path = os.path.join(os.path.dirname(googleapiclient.__file__), "discovery_cache", "documents", "storage.v1.json")
    with open(path) as f:
        doc = json.load(f)
    endpoint = os.environ["HASHCHECK_GCS"]
    doc["rootUrl"], doc["baseUrl"] = endpoint + "/", endpoint + "/storage/v1/"
    return luigi.contrib.gcs.GCSClient(oauth_credentials=AnonymousCredentials(), descriptor=json.dumps(doc))
"""
GCS_CLIENT = []


@pytest.fixture(scope="session")
def gcs_server():
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="hashcheck-gcs")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs(gcs_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HASHCHECK_GCS", gcs_server)
    monkeypatch.setenv("HASHCHECK_S3_RUNS", str(tmp_path / "runs"))
    factory = load_module(tmp_path, GCS_FACTORY, name=f"gcsfactory_{uuid.uuid4().hex[:8]}")
    client = factory.client("gs")
    client.factory = factory.__name__
    client.root = f"gs://hashcheck-gcs/{uuid.uuid4().hex[:8]}"
    GCS_CLIENT[:] = [client]
    yield client
    GCS_CLIENT.clear()


class GCSRaw(luigi.ExternalTask):
    root = luigi.Parameter()

    def output(self):
        return luigi.contrib.gcs.GCSTarget(f"{self.root}/raw/in.txt", client=GCS_CLIENT[0])


class GCSStep(HashCheckingTask):
    root = luigi.Parameter()
    name = luigi.Parameter()

    def requires(self):
        return GCSStep(self.root, {"tail": "head", "head": "up"}[self.name]) if self.name != "up" else GCSRaw(self.root)

    def output(self):
        return luigi.contrib.gcs.GCSTarget(f"{self.root}/out/{self.name}.txt", client=GCS_CLIENT[0])

    def run(self):
        s3_note(self.name)
        text = self.input().open("r").read()
        with self.output().open("w") as f:
            f.write(text.upper() if self.name == "up" else text[:3] if self.name == "head" else str(len(text)))


def test_gcs_edit_no_op_early_cutoff_and_verify_through_a_client_factory(gcs, tmp_path):
    root = gcs.root
    gcs.put_string(b"hello", f"{root}/raw/in.txt")
    top = GCSStep(root, "tail")
    assert build(top) and s3_ran() == ["up", "head", "tail"]
    assert build(top) and s3_ran() == []
    record = json.loads(gcs.download(f"{root}/out/.luigi_hashes/head.txt.json").read())
    assert record["output"]["digest"] == hashlib.sha256(b"HEL").hexdigest() and set(record["output"]["token"]) == {"by", "generation", "size"}
    gcs.put_string(b"help!", f"{root}/raw/in.txt")
    assert build(top) and s3_ran() == ["up", "head"]  # head comes back the same: tail is spared
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["-m", "luigi_hashcheck", "verify", "--quiet", "--client-factory", f"{gcs.factory}:client", f"{root}/out"]
    env = {"PYTHONPATH": os.pathsep.join([HERE, str(tmp_path)])}
    result = subprocess.run([sys.executable, *args], cwd=elsewhere, capture_output=True, text=True, timeout=120, env=dict(os.environ, **env), check=False)
    assert result.returncode == 0 and "3 outputs: 3 ok" in result.stdout, result.stdout + result.stderr
    gcs.put_string(b"bye", f"{root}/raw/in.txt")
    result = subprocess.run([sys.executable, *args], cwd=elsewhere, capture_output=True, text=True, timeout=120, env=dict(os.environ, **env), check=False)
    assert result.returncode == 1 and f"stale     {root}/out/up.txt: input ../raw/in.txt changed" in result.stdout, result.stdout + result.stderr


def test_s3_a_403_propagates_naming_the_store_and_deletes_nothing(s3_runs, moto_server):
    import urllib.request

    s3 = s3_runs
    s3.put_string("hello", s3_url("raw/in.txt"))
    assert build(S3Step("head")) and s3_ran() == ["head"]
    keys = sorted(o["Key"] for o in s3.s3.meta.client.list_objects_v2(Bucket=BUCKET)["Contents"])

    def auth(count):
        urllib.request.urlopen(urllib.request.Request(moto_server + "/moto-api/reset-auth", data=count, method="POST", headers={"Content-Type": "text/plain"})).close()

    hc._forget_process_state()
    auth(b"0")  # moto checks credentials from now on; ours are unknown to it: 403 for every call
    try:
        with pytest.raises(hc.StoreError, match=r"s3 s3://hashcheck-test/out/head.txt.*(403|Forbidden|InvalidAccessKeyId)"):
            S3Step("head").complete()
        assert not build(S3Step("head")) and s3_ran() == []
    finally:
        auth(b"inf")
    assert sorted(o["Key"] for o in s3.s3.meta.client.list_objects_v2(Bucket=BUCKET)["Contents"]) == keys


def test_s3_a_network_error_propagates_naming_the_store(s3_runs):
    import botocore.config

    dead = luigi.contrib.s3.S3Client(endpoint_url=f"http://127.0.0.1:{free_port()}", config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2))

    class Unreachable(HashCheckingTask):
        def output(self):
            return luigi.contrib.s3.S3Target(s3_url("out/x.txt"), client=dead)

    with pytest.raises(hc.StoreError, match=r"s3 s3://hashcheck-test/out/x.txt: EndpointConnectionError"):
        Unreachable().complete()


def test_s3_explain_and_adopt(s3, tmp_path, monkeypatch, capsys):
    ns = f"s3a{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs.log"
    write(tmp_path / f"{ns}.py", S3_PIPELINE.format(ns=ns, bucket=BUCKET, runs=str(runs)))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(ns)
    top = getattr(module, f"{ns}Node")(2, 0)
    assert build(top)
    runs.unlink()
    api = s3.s3.meta.client
    records = [o["Key"] for o in api.list_objects_v2(Bucket=BUCKET, Prefix=f"{ns}/.luigi_hashes/")["Contents"]]
    for key in records:  # as if plain Luigi had built it
        api.delete_object(Bucket=BUCKET, Key=key)
    hc._forget_process_state()
    capsys.readouterr()
    assert hc.main(["explain", "--module", ns, f"{ns}Node", "--layer", "2", "--i", "0"]) == 1
    assert "no record" in capsys.readouterr().out
    assert hc.main(["adopt", "--module", ns, f"{ns}Node", "--layer", "2", "--i", "0"]) == 0
    assert sorted(o["Key"] for o in api.list_objects_v2(Bucket=BUCKET, Prefix=f"{ns}/.luigi_hashes/")["Contents"]) == sorted(records)
    hc._forget_process_state()
    assert build(top) and not runs.exists()


class MockStep(HashCheckingTask):
    name = luigi.Parameter()
    upstream = luigi.Parameter(default="")

    def requires(self):
        return MockStep(self.upstream, "up" if self.upstream == "head" else "") if self.upstream else []

    def input(self):
        return luigi.task.flatten(super().input()) or [luigi.mock.MockTarget("mock/raw.txt")]

    def output(self):
        return luigi.mock.MockTarget(f"mock/out/{self.name}")

    def run(self):
        note_run(os.environ["HASHCHECK_MOCK_RUNS"], self.name)
        text = self.input()[0].open("r").read()
        with self.output().open("w") as f:
            f.write(text.upper() if self.name == "up" else text[:3] if self.name == "head" else str(len(text)))


def test_mock_targets_edit_no_op_and_early_cutoff(tmp_path, monkeypatch):
    monkeypatch.setenv("HASHCHECK_MOCK_RUNS", str(tmp_path))
    fs = luigi.mock.MockFileSystem()
    fs.clear()
    with luigi.mock.MockTarget("mock/raw.txt").open("w") as f:
        f.write("hello")
    # A key the output's name prefixes: removing the stale output must leave it alone.
    with luigi.mock.MockTarget("mock/out/up.bak").open("w") as f:
        f.write("keep")
    top = MockStep("tail", "head")
    assert build(top) and ran(str(tmp_path)) == ["up", "head", "tail"]
    assert "mock/out/.luigi_hashes/head.json" in fs.get_all_data()
    assert build(top) and ran(str(tmp_path)) == []
    with luigi.mock.MockTarget("mock/raw.txt").open("w") as f:
        f.write("help")
    assert build(top) and ran(str(tmp_path)) == ["up", "head"]
    assert fs.get_data("mock/out/up.bak") == b"keep"
    assert build(top, workers=2) and ran(str(tmp_path)) == []
    with luigi.mock.MockTarget("mock/raw.txt").open("w") as f:
        f.write("bye")
    assert build(top, workers=2) and ran(str(tmp_path)) == ["up", "head", "tail"]


class MockFolder(HashCheckingTask):
    def output(self):
        return luigi.mock.MockTarget("mock/tiles")

    def run(self):
        note_run(os.environ["HASHCHECK_MOCK_RUNS"], "MockFolder")
        for name in ("a", "b"):
            with luigi.mock.MockTarget(f"mock/tiles/{name}").open("w") as f:
                f.write(name)


def test_a_folder_on_a_mock_target_fails_with_the_fix_instead_of_running_at_every_build(tmp_path, monkeypatch):
    # MockTarget.exists() is false for a prefix, so plain Luigi runs such a task at every
    # build; a record would not change that, so its first build says so, and keeps the files.
    monkeypatch.setenv("HASHCHECK_MOCK_RUNS", str(tmp_path))
    fs = luigi.mock.MockFileSystem()
    fs.clear()
    (failure,) = failures_of(MockFolder, MockFolder())
    assert isinstance(failure, hc.UnhashableTargetError), failure
    assert re.search(r"MockFolder.*luigi\.mock\.MockTarget.*mock/tiles is a folder.*exists\(\) is false for a folder.*own target", str(failure)), failure
    assert ran(str(tmp_path)) == ["MockFolder"]
    assert sorted(fs.get_all_data()) == ["mock/tiles/a", "mock/tiles/b"]  # no record, nothing removed


class DictFS(luigi.target.FileSystem):
    """A filesystem with only what FileSystem requires: exists() and remove()."""

    files: typing.ClassVar[dict] = {}
    folders: typing.ClassVar[set] = set()

    def exists(self, path):
        return path in self.files or path in self.folders

    def remove(self, path, recursive=True, skip_trash=True):
        self.files.pop(path, None)

    def isdir(self, path):
        return path in self.folders


class DictTarget(luigi.target.FileSystemTarget):
    fs = DictFS()

    def __init__(self, path, format=None):
        super().__init__(path)
        self.format = format or luigi.format.get_default_format()

    def open(self, mode="r"):
        import io

        if mode == "r":
            return self.format.pipe_reader(io.BytesIO(self.fs.files[self.path]))
        target = self

        class Writer(io.BytesIO):
            def close(self):
                target.fs.files[target.path] = self.getvalue()
                super().close()

        return self.format.pipe_writer(Writer())


class DictStep(HashCheckingTask):
    name = luigi.Parameter()
    source = luigi.Parameter(default="raw")

    def input(self):
        return DictTarget(self.source)

    def output(self):
        return DictTarget(f"out/{self.name}")

    def run(self):
        note_run(os.environ["HASHCHECK_MOCK_RUNS"], self.name)
        with self.output().open("w") as f:
            f.write(self.input().open("r").read()[::-1])


def test_any_filesystem_target_is_hashed_through_its_fs_and_a_folder_without_listdir_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HASHCHECK_MOCK_RUNS", str(tmp_path))
    DictFS.files.clear()
    DictFS.folders.clear()
    DictFS.files["raw"] = "héllo".encode()
    assert build(DictStep("a")) and ran(str(tmp_path)) == ["a"]
    record = json.loads(DictFS.files["out/.luigi_hashes/a.json"])
    assert record["inputs"][0]["digest"] == hashlib.sha256("héllo".encode()).hexdigest()  # the raw bytes
    assert "token" not in record["inputs"][0]  # no metadata: hashed at every check
    assert build(DictStep("a")) and ran(str(tmp_path)) == []
    DictFS.files["raw"] = b"bye"
    assert build(DictStep("a")) and ran(str(tmp_path)) == ["a"]
    DictFS.folders.add("folder")
    (failure,) = failures_of(DictStep, DictStep("b", "folder"))
    assert isinstance(failure, hc.UnhashableTargetError)
    assert re.search(r"DictStep.*DictTarget.*DictFS has no listdir\(\)", str(failure)), failure


# The storage contract, which every storage passes.


@pytest.fixture(params=["local", "mock", "s3"])
def any_storage(request, tmp_path):
    """(storage, a folder in it, a function writing bytes at a path there)."""
    if request.param == "local":

        def put(path, data):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

        return hc._LOCAL, str(tmp_path / "d"), put
    if request.param == "mock":
        fs = luigi.mock.MockFileSystem()
        fs.clear()
        return hc._MockStorage(fs), "store/d", lambda path, data: fs.get_all_data().__setitem__(path, data)
    client = request.getfixturevalue("s3")
    store = hc._S3Storage(client)
    return store, s3_url("d"), store._put


def test_the_storage_contract(any_storage):
    storage = any_storage
    fs, folder, put = storage
    put(folder + "/a.txt", b"hello")
    put(folder + "/sub/b.txt", b"")
    put(folder + "er.txt", b"not inside")  # a prefix match would take it
    put(folder + "/.luigi_hashes/a.txt.json", b"{}")
    st = fs.stat(folder + "/a.txt")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 5
    assert stat.S_ISDIR(fs.stat(folder).st_mode)
    with pytest.raises(FileNotFoundError):
        fs.stat(folder + "/none")
    entry = fs.hash(folder + "/a.txt", "sha256")
    assert entry["digest"] == hashlib.sha256(b"hello").hexdigest() and entry["size"] == 5
    assert fs.vouches(entry, fs.stat(folder + "/a.txt"), rechecked=True) == (not isinstance(fs, hc._MockStorage))
    names = [line.split("\t")[0] for line in "".join(fs.stat_chunks(folder)).splitlines()]
    assert names == ["a.txt", "sub/b.txt"]
    assert "".join(fs.stat_chunks(folder, ("sub",))).splitlines()[0].split("\t")[:2] == ["a.txt", "5"]
    assert len("".join(fs.stat_chunks(folder, ("sub",))).splitlines()) == 1
    # A folder's digest is the local rule's, so a folder uploaded from disk keeps it.
    lines = f"{hashlib.sha256(b'hello').hexdigest()}  a.txt\n{hashlib.sha256(b'').hexdigest()}  sub/b.txt\n"
    assert hc._digest(folder, "sha256", fs=fs)["digest"] == hashlib.sha256(lines.encode()).hexdigest()
    records = fs.records_folder(folder)
    path = records + "/x.json"
    assert fs.read_record(path, 100) is None
    with fs.lock(records, 1):
        fs.clean(records)
        fs.replace(path, b'{"a": 1}')
    assert fs.read_record(path, 100) == b'{"a": 1}'
    with pytest.raises(hc._DamagedRecord):
        fs.read_record(path, 3)
    assert fs.remove_record(path, 1) and not fs.remove_record(path, 1)
    fs.remove_output(folder + "/a.txt")
    with pytest.raises(FileNotFoundError):
        fs.stat(folder + "/a.txt")
    fs.remove_output(folder)
    with pytest.raises(FileNotFoundError):
        fs.stat(folder)
    assert fs.stat(folder + "er.txt").st_size == 10


###############################################################################
# Packaging ###################################################################
###############################################################################


def test_readme_test_command_is_what_ci_runs():
    readme = read(os.path.join(HERE, "README.md"))
    ci = read(os.path.join(HERE, ".ci", "run"))
    command = "python -m pytest"
    assert command in readme and command in ci


def test_luigi_floor_is_what_ci_tests():
    # setup.cfg promises the floor and .ci/run's oldest run proves it; neither may move alone.
    setup = read(os.path.join(HERE, "setup.cfg"))
    ci = read(os.path.join(HERE, ".ci", "run"))
    floors = [line.strip()[len("luigi>="):] for line in setup.splitlines() if line.strip().startswith("luigi>=")]
    tested = [line.split("=", 1)[1].split()[0] for line in ci.splitlines() if line.startswith("luigi_oldest=")]
    assert len(floors) == 1 and floors == tested, (floors, tested)
    assert "suite_run $py310 $luigi_oldest" in ci


def test_benchmark_quick_mode_runs(tmp_path):
    # Timing is the benchmark's business; the test only keeps the script from rotting.
    result = subprocess.run([sys.executable, os.path.join(HERE, "benchmarks", "bench.py"), "--quick"],
                            capture_output=True, text=True, check=False, timeout=600, env=dict(os.environ, PYTHONPATH=HERE))
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    for name in ("full_build", "full_build_workers2", "noop_vs_floor", "scaling", "one_seed"):
        assert figures[name]["pairs" if name != "scaling" else "tasks"]
    assert figures["one_seed"]["reran"] == 6 and figures["one_seed"]["chains_rerun"] == [1]
    assert figures["hashing"]["peak_rss_mib"] < 64
    # The folder figures (issue 13), at 5,000 files: no folder no-op ran a task.
    assert figures["folder_noop_vs_floor"]["files"] == 5000 and figures["folder_noop_vs_floor"]["pairs"]
    assert figures["folder_create_vs_pool"]["pairs"] and figures["folder_rss"]["noop_mb"] > 0
    assert figures["folder_scaling"]["files"] == [10, 1000, 5000] and figures["folder_reruns"] == []
    # One file changed: this module writes the folder's listing, so none of the three may
    # skip (bench.py skips them only for a module that keeps the listing in the record).
    changed = [figures[name] for name in ("folder_one_edit", "folder_one_added", "folder_one_removed")]
    assert all(c.get("pairs") and c.get("ratio", 0) > 0 for c in changed), changed


def test_benchmark_against_another_checkout_runs(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(os.path.join(HERE, "luigi_hashcheck.py"), old)  # the script's own smoke test: against itself
    result = subprocess.run([sys.executable, os.path.join(HERE, "benchmarks", "bench.py"), "--quick", "--against", str(old)],
                            capture_output=True, text=True, check=False, timeout=600, env=dict(os.environ, PYTHONPATH=HERE))
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["full_build"]["pairs"] and figures["noop"]["pairs"] and figures["against"] == str(old)
    missing = subprocess.run([sys.executable, os.path.join(HERE, "benchmarks", "bench.py"), "--quick", "--against", str(tmp_path)],
                             capture_output=True, text=True, check=False, timeout=60)
    assert missing.returncode != 0 and "no luigi_hashcheck.py" in missing.stderr

"""Tests for luigi_hashcheck: real Luigi builds in tmp_path, arranged as the module is."""

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings

import luigi
import luigi.configuration
import luigi.mock
import pytest

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


def write(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path):
    with open(path) as f:
        return f.read()


def record_of(path):
    folder, name = os.path.split(os.path.abspath(str(path)))
    with open(os.path.join(folder, ".luigi_hashes", name + ".json")) as f:
        return json.load(f)


def age(root, seconds=100):
    """Set every file's mtime into the past, as if built long ago."""
    then = time.time() - seconds
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(folder, name), (then, then))


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
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


###############################################################################
# A small pipeline: Seed -> Upper -> Head -> Count ###########################
###############################################################################


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


###############################################################################
# Completeness ################################################################
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
        hc._counts.clear()
        assert top.complete()
        assert hc._counts["record_checks"] == 1000
        write(os.path.join(root, "seed.txt"), "other")
        assert not top.complete()
    finally:
        sys.setrecursionlimit(limit)


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


def test_fingerprint_ignores_python_version_details():
    tree = hc.ast.parse("def f(a: int = 1):\n    '''doc'''\n    return a")
    text = hc._ast_text(tree)
    assert "doc" not in text and "lineno" not in text and "type_params" not in text
    assert text == hc._ast_text(hc.ast.parse("def f(a:int=1):  # comment\n\n    return a"))


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


###############################################################################
# Targets of every shape ######################################################
###############################################################################


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


class InFolder(HashCheckingTask):
    root = luigi.Parameter()

    def requires(self):
        return Folder(self.root)

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, "folder", "inside.txt"))

    def run(self):
        write(self.output().path, "inside")


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


def test_output_inside_a_directory_output_is_an_error(root):
    assert not build(InFolder(root))
    assert not os.path.exists(os.path.join(root, "folder", ".luigi_hashes"))
    with pytest.raises(hc.HashCheckError, match="inside"):
        hc._check_not_nested(hc._norm(os.path.join(root, "folder", "inside.txt")))


def test_recorded_digest_is_what_sha256sum_prints(root):
    assert build(Upper(root))
    digest = record_of(os.path.join(root, "upper.txt"))["output"]["digest"]
    assert digest == hashlib.sha256(b"HELLO").hexdigest()
    if shutil.which("sha256sum"):
        out = subprocess.run(["sha256sum", os.path.join(root, "upper.txt")], capture_output=True, text=True).stdout
        assert out.split()[0] == digest


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


def test_a_fifo_is_an_error_naming_it_and_never_blocks(root):
    os.remove(os.path.join(root, "seed.txt"))
    os.mkfifo(os.path.join(root, "seed.txt"))
    with pytest.raises(hc.HashCheckError, match="seed.txt"):
        hc._digest(os.path.join(root, "seed.txt"), "sha256")
    assert not build(Upper(root))
    assert ran(root) == []


class Mocked(HashCheckingTask):
    def output(self):
        return luigi.mock.MockTarget("mocked")

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
    assert "Mocked()" in message and "MockTarget" in message and "HashableTarget" in message
    with pytest.raises(hc.UnhashableTargetError, match="MockTarget"):
        MockedInput(root).complete()
    assert not build(MockedInput(root))


###############################################################################
# HashableTarget contract #####################################################
###############################################################################


class MemoryTarget(HashableTarget):
    """A third-party target that implements only the three methods (and exists)."""

    store = {}

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


def test_hashable_target_has_exactly_three_abstract_methods():
    own = HashableTarget.__abstractmethods__ - luigi.Target.__abstractmethods__
    assert own == {"hash_content", "get_current_input_hash", "store_input_hash"}
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

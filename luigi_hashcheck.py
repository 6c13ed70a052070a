"""Content-hash completeness for Luigi tasks.

Luigi calls a task complete when its output exists. A :class:`HashCheckingTask` is complete
only when its outputs exist, every task it depends on is complete, and the digests of its
inputs, its significant parameters and its code match the record written when the outputs
were made. Records are JSON files in a hidden ``.luigi_hashes/`` folder beside each output.

Usage::

    import luigi
    from luigi_hashcheck import HashCheckingTask

    class Clean(HashCheckingTask):
        day = luigi.DateParameter()

        def requires(self):
            return Raw(day=self.day)

        def output(self):
            return luigi.LocalTarget(f"out/clean-{self.day}.csv")

        def run(self):
            with self.input().open() as src, self.output().open("w") as dst:
                dst.write(src.read().lower())

Edit ``Raw``'s output, ``Clean.run`` or the ``day`` and ``Clean`` runs again; touch a file or
rewrite it with the same bytes and nothing runs. ``python -m luigi_hashcheck --help`` lists
the commands that inspect records without running anything.

The sections, in reading order:

- Errors: one root, :class:`HashCheckError`.
- Configuration: the ``[hashcheck]`` section of luigi.cfg.
- State: everything that outlives one call, with its lifetime, and the build memo. Importing
  the module wraps ``luigi.worker.Worker.add`` and ``Worker.run`` (``_install_worker_hooks``)
  so that each build gets a memo of its own.
- Storage: the one seam through which bytes, stat fields, listings, record files, locks and
  removals go; the local filesystem is its implementation.
- Hashing: digests of files and folders.
- Code fingerprints: what a task's code is, as a digest.
- Records: their schema, the one function that makes a record, reading and writing them.
- Targets: :class:`HashableTarget` and :class:`HashableLocalTarget`.
- Deciding: the fixed set of reasons, the one comparison of a recorded entry with what is on
  disk, and the one walk that gives every task a verdict. The build, ``explain`` and
  ``adopt`` use the walk; ``verify`` and ``accept`` use the comparison.
- The task: :class:`HashCheckingTask`, and what its wrapped ``run()`` does before and after.
- Command line: ``verify``, ``explain``, ``adopt``, ``forget``, ``accept``.
- Platform: the lock calls, chosen once at the end.
"""

__all__ = [
    "ConfigError",
    "HashCheckError",
    "HashCheckingTask",
    "HashableExternalFile",
    "HashableLocalTarget",
    "HashableTarget",
    "HashableTargetException",
    "InputChangedError",
    "LockTimeout",
    "StoreError",
    "TaskWithCheckingInputHash",
    "UnhashableTargetError",
    "ValidationError",
    "WrapperTask",
    "hashcheck",
    "main",
]
__version__ = "0.1.0"

import abc
import ast
import bisect
import collections.abc
import contextlib
import contextvars
import errno
import functools
import hashlib
import html
import importlib.util
import inspect
import itertools
import json
import linecache
import logging
import multiprocessing
import os
import posixpath
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
import threading
import time
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor

if __name__ == "__main__":
    # ``python -m luigi_hashcheck`` runs this file a second time as __main__. A second
    # HashCheckingTask and a second ``hashcheck`` Config would make Luigi call the config
    # name ambiguous and drop its command-line flags, so hand off to the importable copy
    # before this one defines any class.
    from luigi_hashcheck import main as _imported_main

    sys.exit(_imported_main())

import luigi
import luigi.format
import luigi.target
import luigi.worker
from luigi.task import flatten, getpaths
from luigi.task_register import Register

logger = logging.getLogger("luigi-interface")

RECORD_DIR = ".luigi_hashes"
_FORMAT = 1
_BLOCK = 1 << 20
_MAX_RECORD_BYTES = 256 << 20  # a folder of a million files lists them all
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_SCANDIR_FD = os.scandir in os.supports_fd and hasattr(os, "O_DIRECTORY")  # not on Windows


###############################################################################
# Errors ######################################################################
###############################################################################


class HashCheckError(RuntimeError):
    """Base class of every error luigi_hashcheck raises."""


class ConfigError(HashCheckError, ValueError):
    """The ``[hashcheck]`` configuration is invalid."""


class UnhashableTargetError(HashCheckError, TypeError):
    """A task uses a target luigi_hashcheck cannot hash."""

    def __init__(self, task, target, why=None, missing=None):
        """:param why: why it cannot serve as an input; :param missing: what its filesystem lacks."""
        self.task = task
        self.target = target
        kind = f"{type(target).__module__}.{type(target).__qualname__}"
        if why:
            super().__init__(f"{task} uses a {kind} as an input, which {why}")
        else:
            fix = missing or "use luigi.LocalTarget, another luigi FileSystemTarget, or a subclass of luigi_hashcheck.HashableTarget"
            super().__init__(f"{task} uses a {kind}, which luigi_hashcheck cannot hash: {fix}")


class HashableTargetException(HashCheckError):
    """Raised by a :class:`HashableTarget`'s ``get_current_input_hash()``: it has no usable
    record, so its task is stale (as the proof of concept used it)."""


class ValidationError(HashCheckError):
    """A task's ``validate()`` raised or returned False after its ``run()``; nothing was recorded."""

    def __init__(self, task, message):
        self.task = task
        self.message = message
        super().__init__(f"{task}: {_reason('validate', error=message)}; no record was written")


class InputChangedError(HashCheckError):
    """An input changed while the task reading it was running."""

    def __init__(self, task, name):
        self.task = task
        self.input = name
        super().__init__(f"input {name} of {task} changed while it ran; no record was written, the next build reruns it")


class LockTimeout(HashCheckError, TimeoutError):
    """A record folder's lock could not be had in time."""

    def __init__(self, path, timeout):
        self.path = path
        super().__init__(f"could not lock {path} within {timeout:g} s; is another writer stuck?")


class StoreError(HashCheckError, OSError):
    """A store (S3, GCS, ...) refused or failed a request: network, permission, missing bucket.

    Raised out of ``complete()`` like an ``OSError`` on local disk; nothing is deleted.
    """


class _DamagedRecord(Exception):
    """A record is unreadable; its task is stale."""



###############################################################################
# Configuration ###############################################################
###############################################################################


class hashcheck(luigi.Config):
    """The ``[hashcheck]`` section of luigi.cfg."""

    algorithm = luigi.Parameter(default="sha256", description="hashlib algorithm for new records")
    trust_mtime = luigi.BoolParameter(
        default=True,
        parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="skip hashing a file whose size, mtime and inode match its record",
    )
    lock_timeout = luigi.FloatParameter(default=60.0, description="seconds to wait for a record folder's lock")
    root = luigi.Parameter(
        default="",
        description="the project root: inputs under it are named relative to the output's folder, others by absolute path "
        "(default: the nearest folder above the output holding luigi.cfg)",
    )
    summary = luigi.BoolParameter(
        default=True,
        parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="log what ran and why, in one INFO block, when a build that checked HashCheckingTasks ends",
    )
    keep_stale = luigi.BoolParameter(
        default=True,
        parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="set a rerun's stale local outputs aside in .luigi_hashes/ and put them back if it fails (false: delete them)",
    )
    audit_reads = luigi.BoolParameter(
        default=True,
        parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="warn of files run() reads that the task does not declare as inputs",
    )


# The last three default, so a _Settings made with the first four still works.
_Settings = collections.namedtuple("_Settings", "algorithm trust_mtime lock_timeout root summary keep_stale audit_reads", defaults=(True, True, True))


@functools.cache
def _check_algorithm(name):
    try:
        digest_size = hashlib.new(name).digest_size
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"[hashcheck] algorithm = {name!r} is not a hashlib algorithm") from exc
    if not digest_size or name.lower().startswith("shake"):
        raise ConfigError(f"[hashcheck] algorithm = {name!r} has no fixed digest size; try sha256")
    return name


def _settings() -> _Settings:
    try:
        config = hashcheck()
    except (ValueError, luigi.parameter.ParameterException) as exc:
        raise ConfigError(f"[hashcheck] {exc}") from exc
    root = os.path.abspath(config.root) if config.root else None
    return _Settings(_check_algorithm(config.algorithm), config.trust_mtime, config.lock_timeout, root, config.summary, config.keep_stale, config.audit_reads)



###############################################################################
# State #######################################################################
###############################################################################
#
# Everything that outlives one call, each with how long it lives. The caches of the process
# live as long as it does, and each keeps only what cannot go stale within it, as its
# comment says; _forget_process_state() empties them all, as a new process would start.
# The build memo lives as long as one build.

# Keys of the messages logged once per process (a warning per damaged record, per task...).
_logged: set[object] = set()
# (path, algorithm) -> the file's entry. Lets a process hash each unchanged file once, however
# many tasks read it and however many builds run: an entry serves only while the storage's
# freshness rule says its stat still vouches for it.
_digest_cache: dict[tuple[str, str], dict] = {}
# Class, function or module -> its normalised source text. A class's is read when the class
# is defined, and never again: a file edited later must not lend its source to old code.
_sources: dict[object, str] = {}
# Module in code_dependencies -> (its top-level functions and classes, its source). Read
# again only once importlib.reload() has re-executed the module, which makes those objects
# anew; its file on disk alone never counts (inspect.getsource reads an edited file through
# linecache). Holding the objects keeps their ids from being reused.
_module_texts: dict[object, tuple[tuple, str]] = {}
# Module of a function or class in code_dependencies -> its __spec__ when first seen, which
# importlib.reload() replaces.
_module_specs: dict[object, object] = {}
# Source file -> (its lines as linecache holds them, qualified name -> line of each class's
# definition). Before Python 3.13, inspect.getsource parses the whole file again for every
# class, so a module of a hundred task classes took seconds to import; one parse per file
# serves them all. It lives as long as linecache's lines: once checkcache() drops an
# edited file, getlines() reads it anew and the file is parsed again. _forget_process_state
# leaves it: from the same lines a new process would find the same lines of classes.
_class_lines: dict[str, tuple[list, dict[str, list[int]]]] = {}
# This process, for code fingerprints taken after a reload (_reloaded): unique to it, and
# kept by forked workers, which run the same code.
_PROCESS = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
# Task class -> its significant public parameters. A class's parameters are fixed once made.
_param_specs: dict[type, list] = {}
# Folder -> the nearest folder at or above it holding luigi.cfg, or None. Luigi reads its
# configuration once per process, so a luigi.cfg made or removed meanwhile counts from the
# next process on.
_config_folders: dict[str, str | None] = {}
# Lock file -> a lock for the threads of this process, which POSIX locks do not tell apart.
_thread_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)
# Records folders already cleaned of the temporary files of killed writers.
_cleaned: set[str] = set()
# Counters the tests read to prove the cost stays linear; cheap enough to keep always on.
_counts: collections.Counter[str] = collections.Counter()
# For the length of one call: ids of tasks inside their wrapped run(), so super().run() is
# not wrapped twice; ids of tasks inside _deps_and_inputs, whose deps() and input() of their
# own may call each other and must not come back to it.
_running: set[int] = set()
_finding: set[int] = set()
# Lock files of set-aside outputs (.stale-lock) that a rerun in this process holds -> the
# descriptor holding the lock, until the rerun's records are written or its outputs are back.
# POSIX locks belong to a process, so without it a check in this process could take a lock
# that a rerun of this very process holds. A forked child holds none of its parent's locks.
_stale_held: dict[str, int] = {}
_stale_guard = threading.Lock()
# task_id -> the paths its generator run() had set aside when Luigi abandoned it for new
# dynamic dependencies; their locks stay held until the task runs again in this process.
_abandoned: dict[str, list[str]] = {}
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_stale_held.clear)
    os.register_at_fork(after_in_child=_abandoned.clear)
# The read watch (see _Watch): the watches of the run()s active in this process, and the one
# the audit hook feeds, set only while exactly one is active; whether the hook is installed,
# which is for the life of the process (an audit hook cannot be removed; a forked child has
# its parent's).
_watching: list = []
_watch = None
_hooked = False
# .build: the memo of the build running in this thread, for the length of a Worker.add or
# Worker.run call. Per thread, as Luigi allows builds in threads; forked workers inherit it.
_local = threading.local()
# The running task's set_progress_percentage, for the length of its wrapped run(), so that
# hashing a large file there can report how far it got. A context variable, not _local, so
# the threads hashing one folder can be handed it (contextvars.copy_context).
_reporting_to: contextvars.ContextVar = contextvars.ContextVar("_reporting_to", default=None)
# Listing digest -> an unnamed temporary file holding a folder's listing that a scan in this
# process wrote, until a record names it and its bytes are copied beside the record (see
# _with_listings). Emptied when the outermost build ends, and never holds more than
# _PENDING_LIMIT: one lost costs a hash of its folder's files at the next check.
_pending: dict[str, typing.IO[bytes]] = {}
_PENDING_LIMIT = 64
# Whether scans write the new listings they find (builds, adopt, accept) or only compare
# (verify and explain, which write nothing), for the length of a command.
_keeping_listings: contextvars.ContextVar = contextvars.ContextVar("_keeping_listings", default=True)
# verify's progress through the files of a large folder: a callback(done, total, path).
_folder_progress: contextvars.ContextVar = contextvars.ContextVar("_folder_progress", default=None)


def _forget_process_state():
    """Empty every cache of the process, as if it had just started (for tests and notebooks)."""
    for cache in (_logged, _digest_cache, _sources, _module_texts, _module_specs, _param_specs, _config_folders, _cleaned, _counts):
        cache.clear()
    _drop_pending()
    _norm_absolute.cache_clear()


def _drop_pending():
    while _pending:
        _pending.popitem()[1].close()


def _warn_task(kind, task, message):
    """Warn about ``task`` once per task_id and build (and so per process, as forked workers
    each have a copy of the build's memo): Luigi checks a task more than once per build."""
    build = _memo()
    if (kind, task.task_id) not in build.warned:
        build.warned.add((kind, task.task_id))
        warnings.warn(message, stacklevel=3)


def _log_once(*, key, level, message):
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message)


# Luigi asks complete() of a task many times in one build: once while scheduling, again
# for every dependency before each run, and after a run with check_complete_on_run. A
# recursive check without a memo is quadratic on chains and exponential on lattices.
# Luigi has no "build started" event, so the memo lives on the Worker: Worker.add and
# Worker.run, the two calls through which luigi.build, the luigi command line and
# luigid-driven workers do all their checking, are wrapped to make the Worker's memo the
# active one. A new build means a new Worker, hence a fresh memo, even when Luigi reuses
# the task instances; a Worker kept open starts a new build at its first add() after a
# finished run(). A complete() outside any build gets a memo of its own.


class _Memo:
    """What one build has learnt: complete() answers by task_id, and what they were made of."""

    def __init__(self, inspecting=False):
        self.answers = {}
        # explain and adopt inspect: what the walk finds is not saved, and no hint is
        # logged, also by the complete() of a plain task (a WrapperTask) that calls ours.
        self.inspecting = inspecting
        # Inside Worker.run tasks finish, here or in forked children, so a remembered
        # "incomplete" must be looked at again.
        self.running = False
        self.finished = False  # a Worker.run of this build has ended
        self.started_ns = time.time_ns()
        self.graph = {}  # task_id -> (dependencies, inputs, input()), as _deps_and_inputs found them
        self.outputs = {}  # task_id -> flatten(task.output())
        self.unnested = set()  # folders whose outputs were found not to lie in a folder output
        self.fingerprints = {}  # class -> code fingerprint; code_version is read once per build
        self.leftovers = {}  # folder -> what _interrupted_writes found there
        # task_id -> (task, verdict, upstream task_id or None, task_ids walked into), as a
        # walk in this process first judged it: for the summary at the end of Worker.run.
        self.verdicts = {}
        self.warned = set()  # (kind, task_id) of the warnings given in this build
        self.absent = set()  # store outputs found absent (fs.key), until their task has run
        self.stats = {}  # ("stat", fs.key(path)) -> a store's stat, shared while scheduling
        self._settings = None

    @property
    def settings(self):
        # Reading luigi.cfg through luigi.Config costs more than a record check; the
        # configuration cannot change within one build.
        if self._settings is None:
            self._settings = _settings()
        return self._settings


def _active_memo():
    """The memo of the build running in this thread, or None."""
    return getattr(_local, "build", None)


def _memo():
    """The active memo, or a new one for a check outside any build."""
    return _active_memo() or _Memo()


@contextlib.contextmanager
def _inspection(settings):
    """An inspecting memo, active in this thread for the length of the block."""
    memo = _Memo(inspecting=True)
    memo._settings = settings
    outer, _local.build = _active_memo(), memo
    try:
        yield memo
    finally:
        _local.build = outer


def _track_builds(method, running):
    @functools.wraps(method)
    def wrapper(worker, *args, **kwargs):
        memo = worker.__dict__.get("_hashcheck_memo")
        if memo is None or (memo.finished and not memo.running):
            # A Worker kept open for another add()/run() cycle starts a new build: files
            # may have changed since its last run() ended.
            memo = worker.__dict__["_hashcheck_memo"] = _Memo()
        outer, was_running = _active_memo(), memo.running
        _local.build = memo
        memo.running = running or was_running
        try:
            result = method(worker, *args, **kwargs)
        finally:
            _local.build, memo.running = outer, was_running
            memo.finished = memo.finished or (running and not was_running)
        if running and not was_running:
            # Here, in the parent, after every forked child has ended, and just before
            # luigi.build logs its own execution summary.
            _settle_set_aside(memo)
            _log_summary(memo, worker)
            _drop_pending()
        return result

    wrapper._hashcheck = True
    return wrapper


def _install_worker_hooks():
    """Wrap ``Worker.add`` and ``Worker.run`` once per process, however often we are imported."""
    if not getattr(luigi.worker.Worker.add, "_hashcheck", False):
        luigi.worker.Worker.add = _track_builds(luigi.worker.Worker.add, running=False)  # type: ignore[method-assign]
        luigi.worker.Worker.run = _track_builds(luigi.worker.Worker.run, running=True)  # type: ignore[method-assign]


_install_worker_hooks()


###############################################################################
# Storage #####################################################################
###############################################################################
#
# Every access to bytes, stat fields, listings, record files, locks and removal goes
# through one storage: the small interface _LocalStorage names at the end of this section.
# The local filesystem is its only implementation; another store (Luigi's MockTarget, S3,
# GCS) is another class with the same methods. Paths are normalised absolute strings; on
# POSIX, and so in every record, "/" separates their parts.
#
# Freshness: a storage's stat gives a token (here: size, mtime_ns, inode), and its own
# rule, vouches(), says when a token vouches for a digest taken earlier. A store without
# metadata vouches for nothing, and everything is hashed every time.

# A file rewritten within one timestamp tick keeps its mtime (SCons issue #2760), so a
# digest only vouches for a stat taken at least this long after the file's mtime.
_TICK_NS = 2_000_000_000
# A file larger than this, hashed inside a running task, reports its progress to luigid.
_PROGRESS_BYTES = 256 << 20


def _utf8(text):
    return text.encode("utf-8", "surrogateescape")


def _prefix(text, limit):
    """The longest prefix of ``text`` of at most ``limit`` UTF-8 bytes, cut between characters."""
    return _utf8(text)[:limit].decode("utf-8", "ignore")


def _norm(path: str | os.PathLike) -> str:
    """Return ``path`` absolute and normalised, so ``out/d/`` and ``out/d`` are one output."""
    path = os.fspath(path)
    # A check normalises each path several times. A relative path depends on the current
    # folder, and on Windows a rooted one (\\x) on the current drive.
    return _norm_absolute(path) if os.sep == "/" and os.path.isabs(path) else os.path.abspath(path)


@functools.lru_cache(maxsize=1 << 16)
def _norm_absolute(path):
    return os.path.abspath(path)


def _vouches(entry: dict, st: os.stat_result, rechecked: bool = False) -> bool:
    """Whether the recorded ``entry`` still vouches for a file whose stat is ``st``.

    A file written less than a tick before it was hashed may have changed since without
    changing its stat, so its entry vouches for it only when ``rechecked``: when the
    file will be hashed again after the task has read it, as run() inputs are.
    """
    return (
        entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and entry.get("inode") == st.st_ino
        and (rechecked or entry["hashed_ns"] - st.st_mtime_ns >= _TICK_NS)
    )


def _hash_file(path: str, algorithm: str) -> dict:
    """Hash a regular file in blocks; return its entry. Never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | _BINARY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HashCheckError(f"{path} is not a regular file or directory; only those can be hashed")
        hashed_ns = time.time_ns()
        _counts["reads"] += 1
        h = hashlib.new(algorithm)
        if st.st_size < _BLOCK:
            # Most outputs are small: plain reads, without a file object or a buffer to fill.
            # One byte over the size lets a file that grew still be read in full.
            while data := os.read(fd, st.st_size + 1):
                h.update(data)
        else:
            # One buffer for every block, so memory does not grow with the file.
            report = _reporting_to.get() if st.st_size > _PROGRESS_BYTES else None
            with open(fd, "rb", buffering=0, closefd=False) as f:
                buf = bytearray(_BLOCK)
                view = memoryview(buf)
                done = shown = 0
                while n := f.readinto(buf):
                    h.update(view[:n])
                    done += n
                    if report and done * 100 // st.st_size > shown:
                        shown = min(100, done * 100 // st.st_size)
                        report(shown)
    finally:
        os.close(fd)
    return {
        "kind": "file",
        "digest": h.hexdigest(),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
        "hashed_ns": hashed_ns,
    }


# A link that leads nowhere: to itself through other links, or through a file as if a folder.
_UNRESOLVED = (errno.ELOOP, errno.ENOTDIR, errno.ENAMETOOLONG)


def _counts_by_name(link, path):
    """Whether the link at the ``os.DirEntry`` ``link``, whose path is ``path``, counts by its
    target's name: a link to a folder, or one that leads to no file (dangling, or a loop such
    as ``a -> b``, ``b -> a``, which would otherwise raise ELOOP at every build)."""
    try:
        return link.is_dir() or not os.path.exists(path)
    except OSError as exc:
        if exc.errno in _UNRESOLVED:
            return True
        raise


def _read_bytes(path, limit):
    """The bytes of the record file ``path``, or None if there is none; at most ``limit``
    bytes, plus one, so that a record that grew reads as truncated.

    :raises _DamagedRecord: if it is a symbolic link, not a regular file, or too large.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _BINARY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _DamagedRecord("it is a symbolic link") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _DamagedRecord("it is not a regular file")
        if st.st_size > limit:
            raise _DamagedRecord("it is too large")
        return os.read(fd, st.st_size + 1)
    finally:
        os.close(fd)


def _records_folder(output_folder):
    """Create ``.luigi_hashes`` in ``output_folder``; refuse one that is a symbolic link."""
    folder = os.path.join(output_folder, RECORD_DIR)
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        mode = os.lstat(folder).st_mode
    if not stat.S_ISDIR(mode):  # lstat: a link to a folder is not a folder
        raise HashCheckError(f"{folder} is a symbolic link or not a folder; refusing to write records through it")
    return folder


@contextlib.contextmanager
def _locked(folder, timeout):
    """Hold the lock of a records folder. POSIX locks belong to a process, so threads of one
    process also queue on a threading lock."""
    path = os.path.join(folder, ".lock")
    deadline = time.monotonic() + timeout
    thread_lock = _thread_locks[path]
    if not thread_lock.acquire(timeout=max(timeout, 0)):
        raise LockTimeout(path, timeout)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _BINARY, 0o644)
        try:
            delay = 0.001
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise LockTimeout(path, timeout)
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            try:
                yield
            finally:
                _unlock(fd)
        finally:
            os.close(fd)
    finally:
        thread_lock.release()


# Temporary files are named .<record>~<host>~<pid>~<random>.tmp, so a later writer can tell
# a dead writer's leftover from a live writer's file. The record's name and the host are cut
# to 64 bytes (a long host name to a digest of it), so the name stays within 255 bytes.
_HOST = socket.gethostname().replace("~", "-").replace(os.sep, "-") or "localhost"
if len(_utf8(_HOST)) > 64:
    _HOST = "host-" + hashlib.sha256(_utf8(_HOST)).hexdigest()[:16]
_LEFTOVER_AGE_NS = 600 * 10**9  # far longer than writing a record could take
def _clean_leftovers(folder):
    """Remove temporary files that killed writers left in a records folder.

    Called under the folder's lock, once per folder per process. Only a file that cannot
    belong to a live writer goes: one older than any write could take, or one whose writer,
    on this host, is gone.

    :returns: the copies a rerun set aside (see _set_aside) whose output has a record again,
        as their paths less the suffix, each with its stale lock now held: a rerun killed
        after it recorded its outputs left them, and no build would put them back or remove
        them until that task reran. _discard_copies removes them once the folder's lock is
        let go, as a copy of a large folder takes longer than other writers wait.
    """
    if folder in _cleaned:
        return []
    _cleaned.add(folder)
    now = time.time_ns()
    garbage = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(_STALE_OUTPUT) or entry.name.endswith(_STALE_RECORD):
                base = os.path.join(folder, entry.name[: entry.name.rindex(".")])
                if base not in garbage and os.path.lexists(base + ".json") and _take_stale_lock(base + _STALE_LOCK):
                    garbage.append(base)
                continue
            if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                continue
            try:
                _record, host, pid, _random = entry.name[:-4].rsplit("~", 3)
                age = now - entry.stat(follow_symlinks=False).st_mtime_ns
                dead = host == _HOST and not _pid_alive(int(pid))
            except (ValueError, OSError):
                continue
            if age > _LEFTOVER_AGE_NS or dead:
                with contextlib.suppress(OSError):
                    if not entry.is_dir(follow_symlinks=False):
                        os.unlink(entry.path)
                    elif dead:  # a set-aside copy its remover died removing (_discard_copies)
                        shutil.rmtree(entry.path)
    return garbage


def _discard_copies(bases):
    """Remove the set-aside copies that _clean_leftovers found. Each is first renamed to a
    temporary name of this process and its lock let go, so a rerun of its task is not
    refused while a large copy is removed; a copy this process dies removing is then a dead
    writer's leftover, which a later cleanup removes. A copy that cannot be moved stays."""
    for base in bases:
        moved = []
        try:
            for copy in (base + _STALE_OUTPUT, base + _STALE_RECORD):
                gone = os.path.join(os.path.dirname(base), _temporary_name(os.path.basename(copy)))
                with contextlib.suppress(OSError):
                    os.replace(copy, gone)
                    moved.append(gone)
        finally:
            _release_stale_lock(base + _STALE_LOCK)
        for gone in moved:
            with contextlib.suppress(OSError):
                _discard(gone)


def _temporary_prefix(record_name):
    """How the names of the temporary files of a record begin."""
    return f".{_prefix(record_name, 64)}~"


def _temporary_name(name):
    """A new temporary name of this process for ``name``, as _clean_leftovers reads them."""
    return f"{_temporary_prefix(name)}{_HOST}~{os.getpid()}~{os.urandom(6).hex()}.tmp"


def _replace(path, data):
    """Write ``data`` to ``path`` atomically: a new temporary file, fsynced, then renamed."""
    if os.path.islink(path):
        raise HashCheckError(f"record {path} is a symbolic link; refusing to write through it")
    _write_atomically(path, (data,))


def _write_atomically(path, blocks):
    """Write the bytes ``blocks`` to a new temporary file beside ``path``, fsync it, then
    rename it over ``path``; on any failure remove the temporary file."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, _temporary_name(name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o644)
    try:
        try:
            # os.write, not a file object: nothing is buffered, so nothing needs a flush.
            for block in blocks:
                _write_all(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The folder is not fsynced: a crash may then lose the rename, and a lost record only
    # means a rebuild, while an fsync per record would double the cost of a build.


def _write_all(fd, data):
    """Write all of the bytes ``data`` to ``fd``: os.write may take only part of them."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _remove_record_file(path, timeout):
    """Remove the record file ``path`` under its folder's lock, never what a link there
    points to; return whether it was there."""
    folder = os.path.dirname(path)
    if not os.path.lexists(path):
        return False
    if os.path.islink(folder):
        raise HashCheckError(f"{folder} is a symbolic link; refusing to remove records through it")
    with _locked(folder, timeout):
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise HashCheckError(f"{path} is a folder, not a record")
            os.unlink(path)
        except FileNotFoundError:
            return False
    return True


def _remove_output(path):
    """Remove a stale output, file or folder, before its task reruns."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


# The most stat lines in one chunk of a walk: a folder's files between its subfolders come
# in chunks of at most this many, so a changed file costs the merge one chunk line by line
# (see _merged), even in a flat folder of a million files.
_CHUNK_LINES = 1000


def _stat_chunks(root, excluded=()):
    """Yield a folder's files as chunks of stat lines, ``NAME<TAB>SIZE<TAB>MTIME_NS<TAB>INODE``
    (or ``NAME<TAB>link:TARGET`` for a link that counts by its target's name), in the order
    of their sorted relative posix paths, with names escaped as listings hold them.

    That order is the one of ``sorted()`` over the whole relative paths, which listings and
    folder digests use, reached without holding more than one folder's entries per level: a
    subfolder sorts as its name plus "/", as all its paths begin so. Skips every
    ``.luigi_hashes`` folder, and the files and folders whose relative paths are
    ``excluded``; does not follow links to folders, so a link cycle cannot hang the walk.
    A no-op check of a folder is this walk alone, so it is written for speed: one stat per
    file, as a bare walk makes, one string per file, and the rest in C (sort, join).

    :raises HashCheckError: for a file that is not a regular file, a folder or a link.
    """
    skip = set(excluded)
    frames = [iter(_stat_frame(root, "", "", skip))]
    while frames:
        for item in frames[-1]:
            if item.__class__ is str:
                yield item
            else:  # a subfolder, walked in its place
                frames.append(iter(_stat_frame(*item, skip)))
                break
        else:
            frames.pop()


def _stat_frame(folder, prefix, escaped, skip):
    """One folder's part of _stat_chunks, in order: chunks of at most _CHUNK_LINES stat lines
    of its files, and between them its subfolders, as (path, prefix, escaped prefix)."""
    names, lines, subfolders = [], [], []
    # Through a descriptor where the platform can: each entry's stat is then an fstatat of
    # its name, where a path would be looked up again part by part, about a tenth of the
    # cost of a no-op check of a large folder. Entries' paths are then only their names.
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY) if _SCANDIR_FD else None
    try:
        with os.scandir(folder if fd is None else fd) as found:
            for entry in found:
                name = entry.name
                if skip and prefix + name in skip:
                    continue
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                elif entry.is_dir(follow_symlinks=False):
                    if name != RECORD_DIR:
                        subfolders.append(name + "/")
                    continue
                elif entry.is_symlink() and _counts_by_name(entry, os.path.join(folder, name)):
                    names.append(name)
                    lines.append(f"{escaped}{name}\tlink:{_escape(os.readlink(os.path.join(folder, name)))}\n")
                    continue
                else:
                    st = entry.stat()  # a link to a file counts by the file
                    if not stat.S_ISREG(st.st_mode):
                        raise HashCheckError(f"{os.path.join(folder, name)} is not a regular file or directory; only those can be hashed")
                names.append(name)
                lines.append(f"{escaped}{name}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\n")
    finally:
        if fd is not None:
            os.close(fd)
    joined = "".join(names) + "".join(subfolders)
    if joined.isprintable() and "\\" not in joined:
        # Names as they are: every character of them sorts after the tab that ends a name
        # in its line, so the lines sort as their names do.
        lines.sort()
        keys, before = lines, escaped
    else:
        order = sorted(range(len(names)), key=names.__getitem__)
        cut = len(escaped)
        lines = [escaped + _escape(names[i]) + lines[i][cut + len(names[i]) :] for i in order]
        keys, before = [names[i] for i in order], ""
    parts: list = []
    at = 0
    for key in sorted(subfolders):
        end = bisect.bisect_left(keys, before + key)  # the files whose names sort below key
        parts.extend("".join(lines[i : min(i + _CHUNK_LINES, end)]) for i in range(at, end, _CHUNK_LINES))
        parts.append((os.path.join(folder, key[:-1]), prefix + key, escaped + _escape(key)))
        at = end
    parts.extend("".join(lines[i : i + _CHUNK_LINES]) for i in range(at, len(lines), _CHUNK_LINES))
    return parts


def _first(pair):
    return pair[0]


def _read_blocks(path):
    """The blocks of the listing file ``path``; FileNotFoundError if there is none.

    :raises _DamagedRecord: if it is a symbolic link or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _BINARY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _DamagedRecord("it is a symbolic link") from exc
        raise
    with open(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _DamagedRecord("it is not a regular file")
        while block := f.read(_BLOCK):
            yield block


def _replace_from(path, source):
    """Write the bytes of the file object ``source`` to ``path`` atomically, as _replace does,
    in blocks: a listing can be larger than memory should hold."""
    _write_atomically(path, _pending_blocks(source))


def _sidecars(records, stem):
    """The listing files of the record ``stem`` in the records folder ``records``."""
    try:
        names = os.listdir(records)
    except FileNotFoundError:
        return []
    return [os.path.join(records, name) for name in names if _is_sidecar(name, stem)]


def _remove_sidecar(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _LocalStorage:
    """The storage interface, with the local filesystem behind it.

    - ``stat(path)``: the stat (freshness token) of a file or folder, following links;
      raises FileNotFoundError.
    - ``vouches(entry, stat, rechecked)``: whether a recorded entry's token still vouches
      for its digest.
    - ``hash(path, algorithm)``: a file's entry, read in blocks.
    - ``readlink(path)``: where a link points.
    - ``read_record(path, limit)``: a record file's bytes, or None.
    - ``records_folder(folder)``: make ``.luigi_hashes`` there; ``clean(records)``: remove
      dead writers' leftovers; ``replace(path, data)``: write a record atomically.
    - ``lock(records, timeout)``: a context manager; a no-op for stores without locks.
    - ``remove_record(path, timeout)``, under the folder's lock, and ``remove_output(path)``.
    - ``stat_chunks(folder, excluded)``: the folder's files' names and stats, in sorted order
      (see _stat_chunks); listings: ``read_blocks(path)``, ``replace_from(path, file)``,
      ``sidecars(records, stem)`` and ``remove_sidecar(path)``.
    """

    stat = staticmethod(os.stat)
    vouches = staticmethod(_vouches)
    hash = staticmethod(_hash_file)
    readlink = staticmethod(os.readlink)
    read_record = staticmethod(_read_bytes)
    records_folder = staticmethod(_records_folder)
    clean = staticmethod(_clean_leftovers)
    replace = staticmethod(_replace)
    lock = staticmethod(_locked)
    remove_record = staticmethod(_remove_record_file)
    remove_output = staticmethod(_remove_output)
    stat_chunks = staticmethod(_stat_chunks)
    read_blocks = staticmethod(_read_blocks)
    replace_from = staticmethod(_replace_from)
    sidecars = staticmethod(_sidecars)
    remove_sidecar = staticmethod(_remove_sidecar)


_LOCAL = _LocalStorage()


# Other stores: Luigi's own clients, recognised through sys.modules and never imported, so
# the module needs nothing beyond Luigi. A remote path is the target's path as given (an
# s3:// URL, a Mock key) without a trailing "/", never made absolute; "/" separates its
# parts. A remote stat carries a token instead of mtime and inode, and vouches() compares
# tokens only: a token from a listing never equals one from a HEAD, as it lacks fields.


class _RemoteStat:
    """What a store says of a path: ``st_mode`` (file or folder), ``st_size`` and ``token``,
    a str -> str dict of the metadata that changes with the content (or None: no shortcut)."""

    __slots__ = ("st_mode", "st_size", "token")
    st_mtime_ns = None
    st_ino = None

    def __init__(self, folder, size=None, token=None):
        self.st_mode = stat.S_IFDIR if folder else stat.S_IFREG
        self.st_size = size
        self.token = token


_FOLDER_STAT = _RemoteStat(True)


def _marker(rel):
    """Whether a listed name is a folder marker, which is no file: ``d/`` or ``d_$folder$``."""
    return rel.endswith(("/", "_$folder$"))


class _RemoteStorage:
    """The storage interface of _LocalStorage over a store reached through a client.

    A subclass gives ``_head(path)`` (a _RemoteStat or None), ``_open(path)`` ((stat, iterator
    of byte blocks), FileNotFoundError if absent), ``_list(prefix)`` ((path, stat) of every
    key under it, markers included), ``_get(path)`` (bytes or None), ``_put(path, data)`` and
    ``_delete(path)``. Errors other than "absent" become StoreError naming the store and path.
    """

    name = "store"
    local = False

    def _fail(self, path, exc):
        return StoreError(f"{self.name} {path}: {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def _errors(self, path):
        try:
            yield
        except (FileNotFoundError, HashCheckError, _DamagedRecord):
            raise
        except Exception as exc:  # the client's errors, whatever library it uses
            raise self._fail(path, exc) from exc

    def key(self, path):
        """Key of this path in the process-wide caches, apart from local paths."""
        return f"{self.name}:{path}"

    def vouches(self, entry, st, rechecked=False):
        return st.token is not None and entry.get("token") == st.token

    def stat(self, path):
        with self._errors(path):
            st = self._head(path)
            if st is None and self._any(path.rstrip("/") + "/"):
                st = _FOLDER_STAT
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return st

    def _any(self, prefix):
        return next(iter(self._list(prefix)), None) is not None

    def hash(self, path, algorithm):
        """One read of the object, in blocks; the token comes with it (one GET on S3)."""
        with self._errors(path):
            st, blocks = self._open(path)
            hashed_ns = time.time_ns()
            _counts["reads"] += 1
            h = hashlib.new(algorithm)
            size = 0
            for block in blocks:
                h.update(block)
                size += len(block)
        entry = {"kind": "file", "digest": h.hexdigest(), "size": size, "mtime_ns": None, "inode": None, "hashed_ns": hashed_ns, "store": self.name}
        if st.token is not None:
            entry["token"] = st.token
        return entry

    def scan(self, folder, excluded=()):
        """(relative path, full path, False, stat) of every file below ``folder``, from one
        listing, without markers, ``.luigi_hashes/`` or the ``excluded`` paths."""
        prefix = folder.rstrip("/") + "/"  # "out" would also match "outer.txt"
        skip = set(excluded)
        with self._errors(folder):
            for full, st in self._list(prefix):
                rel = full[len(prefix) :]
                parts = rel.split("/")
                if not rel or _marker(rel) or RECORD_DIR in parts[:-1]:
                    continue
                if skip and any("/".join(parts[: i + 1]) in skip for i in range(len(parts))):
                    continue
                yield rel, full, False, st

    def readlink(self, path):
        raise HashCheckError(f"{self.name} {path}: stores have no links")

    def read_record(self, path, limit):
        with self._errors(path):
            data = self._get(path)
        if data is not None and len(data) > limit:
            raise _DamagedRecord("it is too large")
        return data

    def records_folder(self, folder):
        return folder.rstrip("/") + "/" + RECORD_DIR if folder else RECORD_DIR  # prefixes need no making

    def clean(self, records):
        pass  # a PUT is atomic: no temporary files

    def lock(self, records, timeout):
        # No lock on stores that have none: Luigi's scheduler runs one task at a time, and a
        # lost refresh costs only a hash (README, "Many machines").
        return contextlib.nullcontext()

    def replace(self, path, data):
        with self._errors(path):
            self._put(path, bytes(data))

    def remove_record(self, path, timeout):
        with self._errors(path):
            return self._delete(path)

    def remove_output(self, path):
        with self._errors(path):
            if self._head(path) is not None:
                self._delete(path)
                return
            for full, _st in list(self._list(path.rstrip("/") + "/")):
                self._delete(full)

    def stat_chunks(self, folder, excluded=()):
        # One listing, sorted here: a store's order is its own. A line holds the size and
        # the token, which stands in for mtime and inode.
        found = sorted(self.scan(folder, excluded), key=lambda item: item[0])
        for start in range(0, len(found), _CHUNK_LINES):
            yield "".join(f"{_escape(rel)}\t{st.st_size}\t{_token_text(st.token)}\n" for rel, _full, _link, st in found[start : start + _CHUNK_LINES])

    def read_blocks(self, path):
        with self._errors(path):
            data = self._get(path)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        yield data

    def replace_from(self, path, source):
        self.replace(path, b"".join(_pending_blocks(source)))

    def sidecars(self, records, stem):
        try:
            with self._errors(records):
                return [full for full, _st in self._list(records + "/") if _is_sidecar(full.rpartition("/")[2], stem)]
        except UnhashableTargetError:  # a filesystem that cannot list has no folders, so no listings
            return []

    def remove_sidecar(self, path):
        with self._errors(path):
            self._delete(path)


class _MockStorage(_RemoteStorage):
    """Luigi's in-memory MockFileSystem: records are keys of ``get_all_data()`` too. It keeps
    no metadata, so every check hashes."""

    name = "mock"

    def __init__(self, fs):
        self.fs = fs
        # Made here, in the process that schedules, before any worker forks (Luigi issue #3203).
        self.data = fs.get_all_data()

    def _head(self, path):
        data = self.data.get(path)
        return None if data is None else _RemoteStat(False, len(data))

    def _open(self, path):
        data = self.data.get(path)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, "no such key", path)
        view = memoryview(data)
        return _RemoteStat(False, len(data)), (view[i : i + _BLOCK] for i in range(0, len(data), _BLOCK))

    def _list(self, prefix):
        return [(key, _RemoteStat(False, len(self.data.get(key) or b""))) for key in sorted(self.data.keys()) if key.startswith(prefix)]

    def _get(self, path):
        data = self.data.get(path)
        return None if data is None else bytes(data)

    def _put(self, path, data):
        self.data[path] = data

    def _delete(self, path):
        # Exactly this key: MockFileSystem.remove() takes every key it prefixes.
        return self.data.pop(path, None) is not None


def _s3_token(response, by, size_key):
    token = {"by": by, "etag": str(response.get("ETag", "")).strip('"'), "size": str(response.get(size_key))}
    version = response.get("VersionId")
    if by == "head" and version and version != "null":  # only a versioned bucket has one
        token["version"] = str(version)
    return token


class _S3Storage(_RemoteStorage):
    """S3 through Luigi's S3Client, calling the boto3 client underneath: S3Client.exists()
    costs a HEAD, two marker GETs and a LIST on a missing key, get_key() two HEADs."""

    name = "s3"

    def __init__(self, client):
        self.client = client
        self._api = None

    @property
    def api(self):
        if self._api is None:
            self._api = self.client.s3.meta.client
        return self._api

    @staticmethod
    def _split(path):
        bucket, _sep, key = path.split("://", 1)[-1].partition("/")
        return bucket, key

    @staticmethod
    def _code(exc):
        response = getattr(exc, "response", None)
        return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""

    def _head(self, path):
        bucket, key = self._split(path)
        if not key:
            return None
        try:
            response = self.api.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return _RemoteStat(False, response["ContentLength"], _s3_token(response, "head", "ContentLength"))

    def _open(self, path):
        bucket, key = self._split(path)
        try:
            response = self.api.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if self._code(exc) in ("404", "NoSuchKey"):
                raise FileNotFoundError(errno.ENOENT, "no such key", path) from exc
            raise
        return _RemoteStat(False, response["ContentLength"], _s3_token(response, "head", "ContentLength")), response["Body"].iter_chunks(_BLOCK)

    def _list(self, prefix):
        bucket, key = self._split(prefix)
        scheme = prefix.split("://", 1)[0] if "://" in prefix else "s3"
        for page in self.api.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for item in page.get("Contents", ()):
                yield f"{scheme}://{bucket}/{item['Key']}", _RemoteStat(False, item["Size"], _s3_token(item, "list", "Size"))

    def _any(self, prefix):
        bucket, key = self._split(prefix)
        return self.api.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0) > 0

    def _get(self, path):
        bucket, key = self._split(path)
        try:
            return self.api.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            # S3Client calls any 404 "absent"; a missing bucket must not read as a missing record.
            if self._code(exc) in ("404", "NoSuchKey"):
                return None
            raise

    def _put(self, path, data):
        bucket, key = self._split(path)
        self.api.put_object(Bucket=bucket, Key=key, Body=data)  # one PUT: atomic

    def _delete(self, path):
        bucket, key = self._split(path)
        if self._head(path) is None:
            return False
        self.api.delete_object(Bucket=bucket, Key=key)
        return True


class _GCSStorage(_RemoteStorage):
    """GCS through Luigi's GCSClient, calling its API client underneath: GCSTarget.open('r')
    downloads the whole object to a temporary file first. Tokens: generation + size."""

    name = "gcs"

    def __init__(self, client):
        self.client = client
        self.api = client.client

    @staticmethod
    def _split(path):
        bucket, _sep, key = path.split("://", 1)[-1].partition("/")
        return bucket, key

    @staticmethod
    def _absent(exc):
        return str(getattr(getattr(exc, "resp", None), "status", "")) == "404"

    @staticmethod
    def _token(item, by):
        return {"by": by, "generation": str(item.get("generation")), "size": str(item.get("size"))}

    def _meta(self, path):
        bucket, key = self._split(path)
        if not key:
            return None
        try:
            return self.api.objects().get(bucket=bucket, object=key).execute()
        except Exception as exc:
            if self._absent(exc):
                return None
            raise

    def _head(self, path):
        item = self._meta(path)
        return None if item is None else _RemoteStat(False, int(item["size"]), self._token(item, "head"))

    def _open(self, path):
        item = self._meta(path)
        if item is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        st = _RemoteStat(False, int(item["size"]), self._token(item, "head"))
        return st, self._blocks(path, item)

    def _blocks(self, path, item):
        if not int(item["size"]):
            return
        bucket, key = self._split(path)
        # The generation just stated, so the bytes are those the token names.
        request = self.api.objects().get_media(bucket=bucket, object=key, generation=item["generation"])
        http = sys.modules["googleapiclient.http"]
        blocks: list = []

        class _Sink:
            write = blocks.append

        downloader = http.MediaIoBaseDownload(_Sink(), request, chunksize=max(_BLOCK, getattr(self.client, "chunksize", 0)))
        done = False
        while not done:
            _status, done = downloader.next_chunk()
            yield from blocks
            blocks.clear()

    def _list(self, prefix):
        bucket, key = self._split(prefix)
        request = self.api.objects().list(bucket=bucket, prefix=key)
        while request is not None:
            response = request.execute()
            for item in response.get("items", ()):
                yield f"gs://{bucket}/{item['name']}", _RemoteStat(False, int(item["size"]), self._token(item, "list"))
            request = self.api.objects().list_next(request, response)

    def _any(self, prefix):
        bucket, key = self._split(prefix)
        return bool(self.api.objects().list(bucket=bucket, prefix=key, maxResults=1).execute().get("items"))

    def _get(self, path):
        item = self._meta(path)
        if item is None:
            return None
        return b"".join(self._blocks(path, item))

    def _put(self, path, data):
        self.client.put_string(data, path, mimetype="application/json")  # a resumable upload

    def _delete(self, path):
        bucket, key = self._split(path)
        try:
            self.api.objects().delete(bucket=bucket, object=key).execute()
        except Exception as exc:
            if self._absent(exc):
                return False
            raise
        return True


class _WebHdfsStorage(_RemoteStorage):
    """HDFS over WebHDFS (Luigi's WebHdfsClient), through the ``hdfs`` package's client:
    HdfsTarget.open() always shells out to ``hadoop fs -cat``. Tokens: modificationTime +
    length, under the tick rule of local mtimes. Supported, untested: no server in the tests."""

    name = "hdfs"

    def __init__(self, client):
        self.api = client.client

    @staticmethod
    def _plain(path):
        # hdfs://namenode:port/a/b -> /a/b, as the hdfs package takes paths
        return "/" + path.split("://", 1)[1].partition("/")[2] if "://" in path else path

    @staticmethod
    def _token(status, by):
        return {"by": by, "mtime_ms": str(status.get("modificationTime")), "size": str(status.get("length"))}

    def vouches(self, entry, st, rechecked=False):
        token = entry.get("token")
        if st.token is None or token != st.token:
            return False
        return rechecked or entry["hashed_ns"] - int(token["mtime_ms"]) * 1_000_000 >= _TICK_NS

    def _head(self, path):
        status = self.api.status(self._plain(path), strict=False)
        if status is None:
            return None
        if status.get("type") == "DIRECTORY":
            return _FOLDER_STAT
        return _RemoteStat(False, status["length"], self._token(status, "head"))

    def _any(self, prefix):
        return False  # _head said what a folder is

    def _open(self, path):
        st = self._head(path)
        if st is None or stat.S_ISDIR(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "no such file", path)

        def blocks():
            with self.api.read(self._plain(path), chunk_size=_BLOCK) as reader:
                yield from reader

        return st, blocks()

    def _list(self, prefix):
        folder = prefix.rstrip("/")
        for name, status in self.api.list(self._plain(folder), status=True):
            full = f"{folder}/{name}"
            if status.get("type") == "DIRECTORY":
                yield from self._list(full + "/")
            else:
                yield full, _RemoteStat(False, status["length"], self._token(status, "head"))

    def _get(self, path):
        if self.api.status(self._plain(path), strict=False) is None:
            return None
        with self.api.read(self._plain(path)) as reader:
            return reader.read()

    def _put(self, path, data):
        self.api.write(self._plain(path), data=data, overwrite=True)

    def _delete(self, path):
        return bool(self.api.delete(self._plain(path)))


class _AzureStorage(_RemoteStorage):
    """Azure Blob Storage through Luigi's AzureBlobClient and the SDK's BlobClient: the
    reader Luigi gives re-downloads from offset 0 on every read(n), so blobs are streamed with
    ``download_blob().chunks()``. Paths are ``container/blob``. Tokens: etag + size.
    Supported, untested: no server in the tests."""

    name = "azure"

    def __init__(self, client):
        self.client = client

    def _blob(self, path):
        container, _sep, blob = path.partition("/")
        return self.client.blob_client(container, blob)

    @staticmethod
    def _absent(exc):
        return type(exc).__name__ == "ResourceNotFoundError"

    @staticmethod
    def _token(props, by):
        return {"by": by, "etag": str(props.get("etag") if hasattr(props, "get") else props.etag).strip('"'), "size": str(props.size)}

    def _head(self, path):
        try:
            props = self._blob(path).get_blob_properties()
        except Exception as exc:
            if self._absent(exc):
                return None
            raise
        return _RemoteStat(False, props.size, self._token(props, "head"))

    def _open(self, path):
        try:
            downloader = self._blob(path).download_blob()
        except Exception as exc:
            if self._absent(exc):
                raise FileNotFoundError(errno.ENOENT, "no such blob", path) from exc
            raise
        return _RemoteStat(False, downloader.properties.size, self._token(downloader.properties, "head")), downloader.chunks()

    def _list(self, prefix):
        container, _sep, start = prefix.partition("/")
        for item in self.client.container_client(container).list_blobs(name_starts_with=start):
            yield f"{container}/{item.name}", _RemoteStat(False, item.size, self._token(item, "list"))

    def _get(self, path):
        try:
            return self._blob(path).download_blob().readall()
        except Exception as exc:
            if self._absent(exc):
                return None
            raise

    def _put(self, path, data):
        self._blob(path).upload_blob(data, overwrite=True)

    def _delete(self, path):
        try:
            self._blob(path).delete_blob()
        except Exception as exc:
            if self._absent(exc):
                return False
            raise
        return True


class _FileSystemStorage(_RemoteStorage):
    """Any other FileSystemTarget: existence, folders and listings through its ``fs``, bytes
    through a copy of the target reading with ``format=luigi.format.Nop``. No metadata, so
    every check hashes; records are written through a copy of the target too."""

    name = "fs"

    def __init__(self, task, target):
        self.task = task
        self.target = target
        self.fs = target.fs

    def _need(self, method):
        if not callable(getattr(self.fs, method, None)):
            raise UnhashableTargetError(self.task, self.target, missing=f"its filesystem {type(self.fs).__name__} has no {method}()")

    def _copy(self, path):
        import copy

        clone = copy.copy(self.target)
        clone.path = path
        clone.format = luigi.format.Nop
        return clone

    def _head(self, path):
        self._need("exists")
        if not self.fs.exists(path):
            return None
        try:
            folder = self.fs.isdir(path)
        except NotImplementedError:
            folder = False
        return _FOLDER_STAT if folder else _RemoteStat(False)

    def _any(self, prefix):
        return False  # _head asked isdir() already

    def _open(self, path):
        if not self.fs.exists(path):
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        f = self._copy(path).open("r")

        def blocks():
            with f:
                while block := f.read(_BLOCK):
                    yield block

        return _RemoteStat(False), blocks()

    def _list(self, prefix):
        for method in ("isdir", "listdir"):
            self._need(method)
        try:
            names = list(self.fs.listdir(prefix.rstrip("/")))
        except NotImplementedError:
            raise UnhashableTargetError(self.task, self.target, missing=f"its filesystem {type(self.fs).__name__} has no listdir()") from None
        for name in names:
            full = name if name.startswith(prefix) else prefix + name.lstrip("/")
            yield full, _RemoteStat(False)

    def _get(self, path):
        if not self.fs.exists(path):
            return None
        with self._copy(path).open("r") as f:
            return f.read()

    def _put(self, path, data):
        with self._copy(path).open("w") as f:
            f.write(data)

    def _delete(self, path):
        if not self.fs.exists(path):
            return False
        self.fs.remove(path)
        return True


def _storage_of(target, task=None):
    """(storage, normalised path) of a file-like target, or None for a target that is only
    a HashableTarget (or neither, which _require_hashable refuses). A LocalTarget is the
    fast path; a target that is also a HashableTarget keeps its three methods."""
    if isinstance(target, luigi.LocalTarget):
        return _LOCAL, _norm(target.path)
    if isinstance(target, HashableTarget) or not isinstance(target, luigi.target.FileSystemTarget):
        return None
    path = os.fspath(target.path).rstrip("/") or os.fspath(target.path)
    return _client_storage(target.fs) or _FileSystemStorage(task, target), path


# The Luigi clients we know: (module, class, storage). Looked up in sys.modules, never
# imported: a pipeline that uses one has imported it already.
_CLIENTS = (
    ("luigi.mock", "MockFileSystem", _MockStorage),
    ("luigi.contrib.s3", "S3Client", _S3Storage),
    ("luigi.contrib.gcs", "GCSClient", _GCSStorage),
    ("luigi.contrib.hdfs.webhdfs_client", "WebHdfsClient", _WebHdfsStorage),
    ("luigi.contrib.azureblob", "AzureBlobClient", _AzureStorage),
)


def _client_storage(fs):
    """The storage for a Luigi filesystem client we know, or None."""
    for module_name, class_name, storage in _CLIENTS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(fs, getattr(module, class_name)):
            return storage(fs)
    return None


###############################################################################
# Hashing #####################################################################
###############################################################################


def _digest_file(fs, path, algorithm, st, known, trust_mtime, rechecked=False):
    """The entry of the file at ``path`` whose stat is ``st``: ``known``'s digest, or this
    process's, while the storage says its stat vouches for it; else a new hash."""
    key = (path, algorithm) if fs is _LOCAL else (fs.key(path), algorithm)
    if trust_mtime:
        if known and known.get("kind") == "file" and fs.vouches(known, st, rechecked):
            return dict(known)
        cached = _digest_cache.get(key)
        if cached and fs.vouches(cached, st, rechecked):
            return dict(cached)
    entry = fs.hash(path, algorithm)
    _digest_cache[key] = entry
    return dict(entry)


# Folders. A folder's entry holds its digest, its file count and, while every file's stat
# vouches for its digest, "stats": a digest of every file's name and stat, so that a no-op
# check is one walk and one comparison. Its files are listed in a listing: a sidecar in
# .luigi_hashes named NAME.<16 hex>.list after the record that owns it and its own digest,
# a block per chunk of the walk, in order, so that it is written and read as a stream
# (DESIGN.md, "Listings"). A check whose stats differ merges the walk with the listing, and
# hashes only the files whose stat no longer vouches for their listed digest.

_LISTING_HEADER = b"luigi_hashcheck listing 2\n"
_LISTING_HEADER_1 = b"luigi_hashcheck listing 1\n"  # one line per file: still read, never written
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_UNESCAPES = {"t": "\t", "n": "\n", "r": "\r"}
# The keys of a folder entry that describe its files, which a new scan replaces together.
_LISTED_KEYS = ("files", "tokens", "count", "stats", "listing", "listing_digest")
_UNREAD = object()  # see _merged
_HELD_LIMIT = 1 << 24  # bytes of new blocks a listing that may not be needed holds (_ListingWriter)
_BLOCK_LIMIT = 1 << 26  # bytes of a listing's block: _CHUNK_LINES names take far less
_WALK_HELD_LIMIT = 1 << 26  # bytes of a walk's stat lines held in memory (_WalkChunks): a million files take 48 MB
_SHOWN_CHANGES = 100  # names of changed files a scan keeps, for explain and verify --json


def _escape(text):
    """A name as a listing line holds it: no tab, newline or carriage return."""
    return text.translate(_ESCAPES) if "\\" in text or not text.isprintable() else text


def _unescape(text):
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(_UNESCAPES.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _shown(name):
    """A file's name as messages show it: on one line, and never read as another name. It is
    the listing's escape (a backslash doubled, ``\\t``, ``\\n``, ``\\r``), and then a byte that
    is not UTF-8 shows as ``\\xNN``, any other character that does not print as Python writes
    it, ``\\x1b``."""
    text = _escape(name)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else ch.encode("unicode_escape").decode() for ch in text)


def _sidecar_name(stem, digest):
    return f"{stem}.{digest[:16]}.list"


def _is_sidecar(name, stem):
    """Whether ``name`` is a listing of the record ``stem`` (its name without ``.json``)."""
    middle = name[len(stem) + 1 : -len(".list")]
    return len(name) == len(stem) + 22 and name.startswith(stem + ".") and name.endswith(".list") and all(c in "0123456789abcdef" for c in middle)


def _token_text(token):
    return "-" if token is None else _encode_canonical(token)


class _Scanned(dict):
    """A folder's entry as a scan found it. Beside its keys, which records hold, it keeps
    for this process: ``changes``, (count, the first names) of the files edited, added or
    removed against the listing it was compared with, or None without one; ``base``, the
    folder digest that listing described; ``worth``, whether its new listing would spare
    the next check a hash (see _worth_refreshing)."""

    changes = None
    base = None
    worth = False


class _ListingWriter:
    """A new listing, written to an unnamed temporary file a block at a time, in order;
    ``close()`` gives its digest, under which it waits in _pending for a record to name it.

    With ``hold``, the listing may turn out not to be needed, as when a check finds its
    task's output folder changed, and the task reruns: then it is only held, blocks copied
    from the listing being read as their places in it, until ``close()`` writes it (taking
    those blocks from ``reread()``, (blocks, digest): that listing read again) or ``drop()``
    forgets it. Holding more than _HELD_LIMIT bytes of new blocks writes it out at once.
    ``about`` (the listing read, the folder) names them in the warning given if it cannot.
    """

    def __init__(self, algorithm, hold=False, reread=None, about=("a listing", "a folder")):
        self.algorithm, self.reread, self.about = algorithm, reread, about
        self.hash = hashlib.new(algorithm)
        self.held, self.held_bytes = ([], 0) if hold else (None, 0)
        try:
            self.file = tempfile.TemporaryFile()  # noqa: SIM115 - kept open in _pending, closed by _drop_pending
        except OSError as exc:  # TMPDIR gone or full: no listing, which costs time, not a wrong answer
            self.file, self.held = None, None
            _log_once(
                key=("listing file",),
                level=logging.WARNING,
                message=f"luigi_hashcheck: cannot make a temporary file for a folder's listing ({exc}); records are "
                "made without listings, so each folder's next change is hashed in full. Point TMPDIR at a folder with room",
            )
        self.write(_LISTING_HEADER)

    def write(self, data):
        """Write bytes as they are: a header, or a block read from another listing."""
        if self.file is None:
            return
        if self.held is not None:
            self.held.append(bytes(data))
            self.held_bytes += len(data)
            if self.held_bytes > _HELD_LIMIT:
                self._release()
            return
        self.hash.update(data)
        _write_all(self.file.fileno(), data)

    def copy(self, data, offset):
        """Write ``data``, a block at ``offset`` in the listing being read, or note its place."""
        if self.held is None:
            self.write(data)
        elif self.held and self.held[-1].__class__ is tuple and self.held[-1][1] == offset:
            self.held[-1] = (self.held[-1][0], offset + len(data))
        else:
            self.held.append((offset, offset + len(data)))

    def block(self, keys, digests, flags):
        """Write a block of files: their stat lines as the walk gives them (``keys``), their
        escaped digest lines (``digests``), and a v or - for each (``flags``), as lists."""
        if keys:
            stats, lines = _utf8("".join(keys)), _utf8("".join(digests))
            self.write(b"%d %d %d\n%b%b%b\n" % (len(keys), len(stats), len(lines), stats, lines, "".join(flags).encode()))

    def _release(self):
        """Write what is held: its copied blocks read again, checked against their listing's
        digest. If that listing is gone or changed, there is no new listing."""
        held, self.held = self.held, None
        places = collections.deque(held)
        if all(place.__class__ is bytes for place in held):  # nothing copied: nothing to read again
            for place in held:
                self.write(place)
            return
        try:
            blocks, expected = self.reread()
            h, offset = hashlib.new(self.algorithm), 0
            for data in blocks:
                h.update(data)
                end = offset + len(data)
                while places and (places[0].__class__ is bytes or places[0][0] < end):
                    if places[0].__class__ is bytes:
                        self.write(places.popleft())
                        continue
                    start, stop = places[0]
                    self.write(memoryview(data)[start - offset : min(stop, end) - offset])
                    if stop <= end:
                        places.popleft()
                    else:
                        places[0] = (end, stop)
                offset = end
            while places and places[0].__class__ is bytes:
                self.write(places.popleft())
            if places or h.hexdigest() != expected:
                raise _DamagedRecord("it changed while it was read")
        except (_DamagedRecord, OSError, KeyError) as exc:  # KeyError: a listing of _pending let go
            self.drop()
            # Said now: the record made without a listing gives no warning when its folder
            # next changes, and is hashed in full then.
            where, folder = self.about
            why = "it is gone" if isinstance(exc, (FileNotFoundError, KeyError)) else exc
            _log_once(
                key=("held listing", where),
                level=logging.WARNING,
                message=f"luigi_hashcheck: listing {where} of {folder} could not be read again ({why}); the folder's "
                "record is made without a listing, so its next change is hashed in full, which only costs time",
            )

    def drop(self):
        """Forget the listing: nothing is written from now on, and ``close()`` gives None."""
        if self.file is not None:
            self.file.close()
        self.file, self.held = None, None

    def close(self):
        if self.held is not None:
            self._release()
        if self.file is None:
            return None
        digest = self.hash.hexdigest()
        if digest in _pending:
            self.file.close()
        else:
            while len(_pending) >= _PENDING_LIMIT:
                _pending.pop(next(iter(_pending))).close()
            _pending[digest] = self.file
        return digest


def _block_lines(keys, digests, flags):
    """The stat lines, digest lines and flags of a block of listed files, each ending in a
    newline but the flags, from its listed ``key`` (stat line), digest, and whether the
    digest vouches for a file of that stat: as _ListingWriter.block takes them."""
    digest_lines = [f"{_escape(digest)}  {key[: key.index(chr(9))]}\n" for key, digest in zip(keys, digests)]
    return [key + "\n" for key in keys], digest_lines, ["v" if good else "-" for good in flags]


def _listing_from_files(known, algorithm):
    """The listing of a folder recorded the old way, with its files inline: its digest."""
    writer = _ListingWriter(algorithm)
    tokens = known.get("tokens", {})
    files = []
    for rel, digest, size, mtime_ns, inode, hashed_ns in known["files"]:
        if digest.startswith("link:"):
            key, vouches = f"{_escape(rel)}\t{_escape(digest)}", True
        elif "store" in known:
            key, vouches = f"{_escape(rel)}\t{size}\t{_token_text(tokens.get(rel))}", False  # its tokens came from reads, not listings
        else:
            key, vouches = f"{_escape(rel)}\t{size}\t{mtime_ns}\t{inode}", mtime_ns is not None and hashed_ns - mtime_ns >= _TICK_NS
        files.append((rel, key, digest, vouches))
    files.sort(key=_first)  # by the unescaped names, as the walk gives them
    for at in range(0, len(files), _CHUNK_LINES):
        part = files[at : at + _CHUNK_LINES]
        writer.block(*_block_lines([f[1] for f in part], [f[2] for f in part], [f[3] for f in part]))
    return writer.close()


def _listing_lines(blocks, expected, algorithm, where):
    """Yield the files of a listing read as ``blocks``, in order: for a listing of blocks,
    each block as (a buffer, where in it the block, its stat lines, its digest lines and its
    flags begin, where it ends, and where the buffer begins in the file), offsets into the
    buffer that spare copying it; for a listing of lines (the first format), lists of its
    lines without their newlines.

    :raises _DamagedRecord: where it is not a listing, or at the end if its digest is not
        ``expected``.
    """
    h = hashlib.new(algorithm)
    data = b""
    version = None
    dropped = 0  # bytes of the file before data
    for block in blocks:
        h.update(block)
        data = data + block if data else block
        if version is None:
            if len(data) < len(_LISTING_HEADER):
                continue
            version = {_LISTING_HEADER: 2, _LISTING_HEADER_1: 1}.get(data[: len(_LISTING_HEADER)])
            if version is None:
                raise _DamagedRecord(f"{where} is not a listing")
            data, dropped = data[len(_LISTING_HEADER) :], len(_LISTING_HEADER)
        if version == 1:
            cut = data.rfind(b"\n") + 1
            lines = data[:cut].decode("utf-8", "surrogateescape").split("\n")
            data = data[cut:]
            lines.pop()
            if lines:
                yield lines
            continue
        at = 0
        while (head := data.find(b"\n", at, at + 64) + 1) > 0:
            try:
                count, stats, lines = map(int, data[at:head].split(b" "))
            except ValueError:
                raise _DamagedRecord(f"{where} has a damaged block") from None
            end = head + stats + lines + count + 1
            # A block of no file, or a negative size, is damage (no writer makes one), and
            # would give _Listed no lines to take; too large a size would have the rest read.
            if count < 1 or stats < 0 or lines < 0 or stats + lines > _BLOCK_LIMIT:
                raise _DamagedRecord(f"{where} has a damaged block")
            if end > len(data):
                break
            if data[end - 1] != 10 or data[end - count - 1 : end - 1].strip(b"v-"):  # 10: a newline
                raise _DamagedRecord(f"{where} has a damaged block")
            yield data, at, head, head + stats, end - count - 1, end, dropped
            at = end
        if len(data) - at >= 64 and head == 0:
            raise _DamagedRecord(f"{where} has a damaged block")
        data, dropped = data[at:], dropped + at
    if data or version is None or h.hexdigest() != expected:
        raise _DamagedRecord(f"{where} is truncated or does not match its digest")


class _Listed:
    """The files of a listing (from _listing_lines), as _merged takes them: a block whose
    files are all as listed, at once (block()), or else one line at a time, checked, or a
    run of lines to compare at once, as the first format's lines were:
    ``NAME<TAB>SIZE...<TAB>v<TAB>DIGEST<TAB>HASHED_NS``."""

    def __init__(self, items, where):
        self.items, self.where = items, where
        self.lines, self.at = [], 0
        self.ahead = None  # a block read and not yet taken or made lines

    def _more(self):
        item, self.ahead = self.ahead or next(self.items, None), None
        if item is None:
            return False
        lines = item if item.__class__ is list else self._lines(item)
        _counts["lines_merged"] += len(lines)
        self.lines, self.at = self.lines[self.at :] + lines, 0
        return True

    def _lines(self, block):
        """A block's files as lines of the first format (with no time of hashing)."""
        data, _at, keys_at, digests_at, flags_at, end, _dropped = block
        keys = data[keys_at:digests_at].decode("utf-8", "surrogateescape").split("\n")
        digests = data[digests_at:flags_at].decode("utf-8", "surrogateescape").split("\n")
        flags = data[flags_at : end - 1].decode()
        if not len(keys) == len(digests) == len(flags) + 1 or keys.pop() or digests.pop():
            raise _DamagedRecord(f"{self.where} has a damaged block")
        lines = []
        for key, line, flag in zip(keys, digests, flags):
            name = key[: key.find("\t")]
            if "\t" not in key or not line.endswith("  " + name):
                raise _DamagedRecord(f"{self.where} has a damaged line")
            lines.append(f"{key}\t{flag}\t{line[: len(line) - len(name) - 2]}\t0")
        return lines

    def block(self, stats):
        """The next block, taken, if no file of it was read yet, it lists the files of the
        walk's chunk ``stats`` (bytes) with the same stats, each one vouching, and no name or
        digest in it needs an escape; else None."""
        if self.at < len(self.lines):
            return None
        if self.ahead is None:
            self.ahead = next(self.items, None)
            if self.ahead is None or self.ahead.__class__ is list:
                self._more()  # a listing of lines: they are merged one by one
                return None
        data, _at, keys_at, digests_at, flags_at, end, _dropped = block = self.ahead
        if digests_at - keys_at != len(stats) or not data.startswith(stats, keys_at):
            return None
        if data.find(b"-", flags_at, end) >= 0 or data.find(b"\\", digests_at, flags_at) >= 0:
            return None
        self.ahead = None
        return block

    def next(self):
        """The next line, or None at the end.

        :raises _DamagedRecord: if it has too few fields.
        """
        if self.at == len(self.lines) and not self._more():
            return None
        line = self.lines[self.at]
        self.at += 1
        if line.count("\t") < 4:
            raise _DamagedRecord(f"{self.where} has a damaged line")
        return line

    def run(self, count):
        """The next ``count`` lines, or fewer at the end, left to take with skip()."""
        while len(self.lines) - self.at < count and self._more():
            pass
        return self.lines[self.at : self.at + count]

    def skip(self, count):
        self.at += count


def _pending_blocks(source):
    offset = 0
    while block := os.pread(source.fileno(), _BLOCK, offset):  # pread: forked workers share the offset
        offset += len(block)
        yield block


def _listing_source(fs, path, known, algorithm, home):
    """The listing to compare the folder at ``path`` with: (lines, the folder digest it
    describes, where it is, a callable that reads it again as (blocks, its digest)), or
    None. Found in order: the recorded entry's own files (the old format), this process's
    new listing of that digest, the named listing beside the folder or in the records folder
    ``home`` of the record that holds ``known``, and last the listing of the record beside
    the folder, whichever task made it: any listing of this path serves, as its digests are
    checked against the files' stats."""
    dirname = os.path.dirname if fs is _LOCAL else posixpath.dirname
    join = os.path.join if fs is _LOCAL else posixpath.join
    beside = join(dirname(path), RECORD_DIR)
    tried = []
    entries = [known] if known and known.get("kind") == "dir" else []
    for entry in entries:
        digest = _listing_from_files(entry, algorithm) if "files" in entry else entry.get("listing_digest")
        if digest in _pending:
            reread = functools.partial(_reread_pending, digest)
            return _listing_lines(reread()[0], digest, algorithm, "a listing"), entry["digest"], None, reread
        if digest and entry.get("listing"):
            for folder in dict.fromkeys([beside, home] if home else [beside]):
                tried.append((join(folder, entry["listing"]), digest, entry["digest"]))
    record_path = _record_path(path, fs)
    try:
        producer = _read_record(record_path, fs)
    except (_DamagedRecord, OSError):
        producer = None
    if producer and producer["output"]["kind"] == "dir" and producer["output"] is not known:
        made = producer["output"]
        if "files" in made or made.get("listing_digest") in _pending:
            return _listing_source(fs, path, made, algorithm, None)
        if made.get("listing"):
            tried.append((join(beside, made["listing"]), made["listing_digest"], made["digest"]))
    for where, digest, base in tried:
        try:
            blocks = fs.read_blocks(where)
            first = next(blocks, b"")
        except FileNotFoundError:
            continue
        except (_DamagedRecord, OSError) as exc:
            _warn_listing(where, path, exc)
            continue
        return _listing_lines(itertools.chain([first], blocks), digest, algorithm, where), base, where, functools.partial(_reread, fs, where, digest)
    if tried:
        _warn_listing(tried[0][0], path, "it is missing")
    return None


def _reread_pending(digest):
    return _pending_blocks(_pending[digest]), digest


def _reread(fs, where, digest):
    return fs.read_blocks(where), digest


def _warn_listing(where, folder, why):
    _log_once(
        key=("listing", where),
        level=logging.WARNING,
        message=f"luigi_hashcheck: listing {where} of {folder} is unusable ({why}); hashing the folder in full, "
        "which only costs time: nothing is rebuilt for it",
    )


class _WalkChunks:
    """The stat lines of one folder's walk, chunk by chunk, as bytes, kept until the walk's
    end says whether they must be merged with the listing; read as many times as wanted
    until ``close()``. Past _WALK_HELD_LIMIT bytes they go to an unnamed temporary file, so
    that a folder of ten million files (about 500 MB of stat lines) costs no more memory
    than one of a million. If that file cannot be made or written, the rest stay in memory,
    with a warning: a check that costs memory beats one that fails.
    """

    def __init__(self):
        self.held, self.held_bytes, self.file, self.sizes = [], 0, None, []
        self.limit, self.writing = _WALK_HELD_LIMIT, False

    def append(self, data):
        if self.writing:
            try:
                self._write(data)
                self.sizes.append(len(data))
                return
            except OSError as exc:
                self._stay(exc)
        self.held.append(data)
        self.held_bytes += len(data)
        if self.held_bytes > self.limit:
            self._spill()

    def _write(self, data):
        _write_all(self.file.fileno(), data)

    def _spill(self):
        try:
            self.file = tempfile.TemporaryFile(buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as exc:
            self._stay(exc)
            return
        held, self.held, self.held_bytes, self.writing = self.held, [], 0, True
        for data in held:
            self.append(data)  # in order: past a failed write, the rest stay in memory

    def _stay(self, exc):
        self.writing, self.limit = False, float("inf")  # not tried again for this folder
        _log_once(
            key=("walk spill",),
            level=logging.WARNING,
            message=f"luigi_hashcheck: cannot write the stat lines of a large folder to a temporary file ({exc}); "
            "they are kept in memory instead. Point TMPDIR at a folder with room",
        )

    def __iter__(self):
        offset = 0
        for size in self.sizes:  # pread: each pass starts at the start, whatever an earlier one left
            yield os.pread(self.file.fileno(), size, offset)
            offset += size
        yield from self.held

    def close(self):
        if self.file is not None:
            self.file.close()
        self.held, self.file, self.sizes, self.writing = [], None, [], False


def _digest_dir(fs, path, algorithm, trust_mtime, known=None, rechecked=False, excluded=(), home=None, listing_if=None):
    """Digest a directory: the hash of ``sha256sum``-style lines, one per file, sorted.

    One walk gives each file's name and stat. While they all match the ``known`` entry's
    stats, its digest stands; otherwise the walk is merged with the folder's listing (see
    _listing_source), and only the files whose stat no longer vouches are hashed.

    :param home: the records folder of the record that holds ``known``.
    :param listing_if: as for _merged.
    :returns: a _Scanned entry.
    """
    local = fs is _LOCAL
    st = fs.stat(path) if local else _FOLDER_STAT
    with contextlib.closing(_WalkChunks()) as chunks:  # see _WalkChunks: the walk's stat lines, kept for _merged
        h = hashlib.new(algorithm)
        count = 0
        report = _folder_progress.get()
        total = known.get("count") if known else None
        for chunk in fs.stat_chunks(path, excluded):
            if report:
                report(count, total, path)
            data = _utf8(chunk)  # bytes, as a listing's blocks are compared with them
            h.update(data)
            chunks.append(data)
            count += data.count(b"\n")
        stats = h.hexdigest()
        entry = _Scanned(kind="dir", digest=None, size=None, mtime_ns=st.st_mtime_ns, inode=st.st_ino, hashed_ns=time.time_ns(), count=count)
        if excluded:
            entry["excluded"] = list(excluded)
        if not local:
            entry["store"] = fs.name
        if trust_mtime and known and known.get("kind") == "dir" and known.get("stats") == stats and known.get("count") == count:
            # Every file as it was when its listed digest vouched for it: nothing to read.
            entry.update((key, known[key]) for key in ("digest", "hashed_ns", "listing", "listing_digest") if key in known)
            entry["stats"] = stats
            entry.changes, entry.base = (0, []), known["digest"]
            return entry
        source = _listing_source(fs, path, known, algorithm, home) if trust_mtime else None
        try:
            return _merged(fs, path, algorithm, chunks, source, rechecked, entry, stats, listing_if)
        except _DamagedRecord as exc:
            _warn_listing(source[2] or "made in this process", path, exc)
            return _merged(fs, path, algorithm, chunks, None, rechecked, entry, stats, listing_if)


def _unchanged(chunk, text, count, fields):
    """The folder digest's lines of the files of the walk's ``chunk``, if ``text``, the next
    ``count`` listed lines joined by newlines, are theirs, each with the same stat and
    vouching for its digest; else None.

    Lists of fields compared at once, not a loop over lines, as this is most of the cost of
    checking a folder with a few changed files. Only a chunk of files whose stat lines have
    ``fields`` fields, and with no escaped name, is taken so: names then are as the digest
    lines hold them, and fields line up.
    """
    if "\\" in text or chunk.count("\t") != (fields - 1) * count:
        return None
    walked = chunk[:-1].replace("\n", "\t").split("\t")
    listed = text.replace("\n", "\t").split("\t")
    step = fields + 3  # the stat line's, then v, the digest and when it was taken
    if len(listed) != step * count or listed[fields::step].count("v") != count:
        return None
    if any(walked[i::fields] != listed[i::step] for i in range(fields)):
        return None
    return "\n".join(map("  ".join, zip(listed[fields + 1 :: step], listed[0::step]))) + "\n"


def _rel(line):
    """The name a stat line or listing line begins with, unescaped."""
    return _unescape(line[: line.index("\t")])


def _merged(fs, path, algorithm, chunks, source, rechecked, entry, stats, listing_if=None):
    """Finish the ``entry`` of the folder at ``path`` from the walk's ``chunks`` and the
    listing ``source``, if any: reuse each listed digest its file's stat vouches for, hash
    the rest, and write the new listing as the lines come.

    A listing's block holds the walk's stat lines of a chunk as the walk gives them, so a
    chunk whose files are as listed is one comparison of bytes, and its digest lines are
    hashed as they are: the common case, a folder with few changed files, costs little more
    than reading its listing. Other chunks are merged a line at a time, or for a listing of
    lines a run at a time (see _unchanged); a listing line begins with its file's stat line,
    so a file whose stat is as listed is one comparison of strings.

    :param listing_if: a folder digest: the new listing is only wanted if the folder's comes
        out the same (see _compare), so it is held until then, and dropped at the first
        change against a listing of that digest.
    """
    local = fs is _LOCAL
    fields = 4 if local else 3  # of a file's stat line: NAME SIZE MTIME INODE, or NAME SIZE TOKEN
    listed = _Listed(source[0] if source else iter(()), source and source[2] or "a listing")
    old = _UNREAD  # the next listed line, read only when a line is compared: a whole block may match
    writer = _ListingWriter(algorithm, listing_if is not None, source and source[3], (listed.where, path)) if _keeping_listings.get() else None
    folder_hash = hashlib.new(algorithm)
    changed, first = 0, []
    worth = source is None
    vouching = True
    # [stat line, name, listed line or None, (digest, listed stat line, flag) or None], and
    # None where a chunk ends, as the new listing's blocks do.
    waiting = []
    report = _folder_progress.get()
    done = 0

    def note(how, rel):
        nonlocal changed
        changed += 1
        if writer and writer.held is not None and source and source[1] == listing_if:
            writer.drop()  # the folder is not the one listing_if names: its task reruns
        if len(first) < _SHOWN_CHANGES:
            first.append(f"{how} {_shown(rel)}")

    def flush():
        nonlocal worth, vouching, done
        todo = [item for item in waiting if item is not None and item[3] is None]
        paths = [path + "/" + item[1] if not local or os.sep == "/" else os.path.join(path, *item[1].split("/")) for item in todo]
        if len(todo) > 16 and (os.cpu_count() or 1) > 1:
            # Reads release the GIL, so threads overlap them; each thread takes a batch of
            # files, as one hand-off per small file would cost more than its hash.
            step = -(-len(paths) // (4 * os.cpu_count()))
            with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
                batches = pool.map(_hash_all, itertools.repeat(fs), [paths[i : i + step] for i in range(0, len(paths), step)], itertools.repeat(algorithm))
                hashed = [found for batch in batches for found in batch]
        else:
            hashed = _hash_all(fs, paths, algorithm)
        for item, new in zip(todo, hashed):
            line, rel, was = item[0], item[1], item[2]
            escaped = line[: line.index("\t")]
            if local:
                key = f"{escaped}\t{new['size']}\t{new['mtime_ns']}\t{new['inode']}"
                good = new["hashed_ns"] - new["mtime_ns"] >= _TICK_NS
            else:
                # A listing's tokens come from the store's listing, which later checks compare
                # them with: the walk's, when the read saw the same version.
                token = _listed_token(line.rsplit("\t", 1)[1], new.get("token"))
                key = f"{escaped}\t{new['size']}\t{token}"
                good = token != "-" and fs.vouches({**new, "token": json.loads(token)}, _RemoteStat(False, new["size"], json.loads(token)))
            vouching = vouching and good
            if was is None:
                if source:  # without a listing every file is new, and none is named
                    note("added", rel)
            else:
                was_key, was_vouch, was_digest, _was_hashed = was.rsplit("\t", 3)
                if _unescape(was_digest) != new["digest"]:
                    note("edited", rel)
                    worth = True
                elif good and not (was_vouch == "v" and was_key == key):
                    worth = True
            item[3] = (new["digest"], key, good)
        digests, block = [], ([], [], [])
        for item in waiting:
            if item is None:
                if writer:
                    writer.block(*_block_lines(*block))
                block = ([], [], [])
                continue
            _line, rel, _was, (digest, key, good) = item
            digests.append(f"{digest}  {rel}\n")
            for part, value in zip(block, (key, digest, good)):
                part.append(value)
        folder_hash.update(_utf8("".join(digests)))
        done += len(digests)
        if report:
            report(done, entry["count"], path)
        waiting.clear()

    for data in chunks:
        if old is _UNREAD and (found := listed.block(data)) is not None:
            # Every file of the chunk as listed, and vouching: nothing to hash.
            buffer, at, _keys_at, digests_at, flags_at, end, dropped = found
            if waiting:
                flush()
            view = memoryview(buffer)
            folder_hash.update(view[digests_at:flags_at])
            if writer:
                writer.copy(view[at:end], dropped + at)
            done += end - 1 - flags_at
            if report:
                report(done, entry["count"], path)
            continue
        chunk = data.decode("utf-8", "surrogateescape")
        if old is _UNREAD:
            old = listed.next()
        if old is not None and chunk and old.startswith(chunk[: chunk.index("\n")]):  # else its first file differs
            count = chunk.count("\n")
            run = [old, *listed.run(count - 1)]
            text = "\n".join(run)
            digests = _unchanged(chunk, text, count, fields) if len(run) == count else None
            if digests is not None:
                if waiting:
                    flush()
                folder_hash.update(_utf8(digests))
                if writer:
                    # From the fields _unchanged compared, not the listed lines split again:
                    # a damaged listing's newlines need not fall where its fields do.
                    keys = [line + "\n" for line in chunk[:-1].split("\n")]
                    writer.block(keys, [line + "\n" for line in digests[:-1].split("\n")], "v" * count)
                listed.skip(count - 1)
                old = _UNREAD
                done += count
                if report:
                    report(done, entry["count"], path)
                continue
        for line in chunk[:-1].split("\n") if chunk else ():
            if old is _UNREAD:
                old = listed.next()
            if old is not None and not old.startswith(line):
                rel = _rel(line)
                while old is not None and _rel(old) < rel:
                    note("removed", _rel(old))
                    worth = True
                    old = listed.next()
            if old is not None and old.startswith(line) and old[len(line)] == "\t" and (old[len(line) + 1] == "v" or rechecked):
                # The same file with the same stat as listed, and its digest vouches for it.
                vouching = vouching and old[len(line) + 1] == "v"
                digest = old[len(line) + 3 : old.rindex("\t")]
                waiting.append([line, _rel(line), old, (_unescape(digest), line, old[len(line) + 1] == "v")])
                old = _UNREAD
            else:
                rel = _rel(line)
                was = None
                if old is not None and _rel(old) == rel:
                    was, old = old, _UNREAD
                if line.count("\t") == 1:  # NAME<TAB>link:TARGET, a link that counts by its target's name
                    digest = line[line.index("\t") + 1 :]
                    if was is None:
                        note("added", rel)
                    elif was.rsplit("\t", 3)[2] != digest:
                        note("edited", rel)
                    worth = True
                    waiting.append([line, rel, was, (_unescape(digest), line, True)])
                else:
                    waiting.append([line, rel, was, None])
        waiting.append(None)  # where the chunk ends, and the new listing's block
        if len(waiting) >= 4096:
            flush()
    flush()
    if old is _UNREAD:
        old = listed.next()
    while old is not None:
        note("removed", _rel(old))
        worth = True
        old = listed.next()
    entry["digest"] = folder_hash.hexdigest()
    if vouching:
        entry["stats"] = stats
    entry.changes = (changed, first) if source else None
    entry.base = source[1] if source else None
    entry.worth = worth
    if writer:
        if writer.held is not None and entry["digest"] != listing_if:
            writer.drop()
        if (digest := writer.close()) is not None:
            entry["listing_digest"] = digest
    return entry


def _hash_all(fs, paths, algorithm):
    return [fs.hash(path, algorithm) for path in paths]


def _listed_token(listed, read):
    """The token a listing line keeps for a store file just read: the one the store's listing
    gave (``listed``, as text), when the read's token names the same version (all but how it
    was asked); else none, so that the next check reads it again."""
    if listed == "-" or read is None:
        return "-"
    found = json.loads(listed)
    same = all(read.get(key) == value for key, value in found.items() if key != "by")  # a listing has no VersionId
    return listed if same else "-"


def _digest(
    path: str,
    algorithm: str,
    known: dict | None = None,
    trust_mtime: bool = True,
    rechecked: bool = False,
    excluded: tuple[str, ...] = (),
    fs=_LOCAL,
    st=None,
    home: str | None = None,
    listing_if: str | None = None,
) -> dict:
    """Return the entry (kind, digest, stat fields) of a file or directory.

    :param path: normalised absolute path.
    :param known: a recorded entry for the same path; its digest is reused while the
        file's size, mtime and inode still match it (for a folder, file by file).
    :param rechecked: the caller hashes the path again later (see ``_vouches``).
    :param excluded: for a folder, relative posix paths below it to leave out.
    :param fs: the storage the path is in.
    :param st: its stat, when the caller has just taken it.
    :param home: for a folder, the records folder of the record that holds ``known``.
    :param listing_if: for a folder, as for _merged.
    :raises FileNotFoundError: if nothing is at ``path``.
    """
    if st is None:
        if rechecked and trust_mtime and known is None and fs is not _LOCAL:
            # Before run(): this build's digest of a remote input (its task wrote it) serves
            # without a request, since the check after run() asks the store again.
            cached = _digest_cache.get((fs.key(path), algorithm))
            build = _active_memo()
            if cached is not None and build is not None and cached["hashed_ns"] >= build.started_ns:
                return dict(cached)
        st = fs.stat(path)
    if stat.S_ISDIR(st.st_mode):
        return _digest_dir(fs, path, algorithm, trust_mtime, known, rechecked, excluded, home, listing_if)
    if not stat.S_ISREG(st.st_mode):
        raise HashCheckError(f"{path} is not a regular file or directory; only those can be hashed")
    return _digest_file(fs, path, algorithm, st, known, trust_mtime, rechecked)


def _digest_written(fs, path, algorithm, trust_mtime):
    """The entry of an output its task has just written. On a store, one read gives the
    digest and its token (one GET on S3), and a folder is listed only if no object is there."""
    if fs is _LOCAL:
        return _digest(path, algorithm, trust_mtime=trust_mtime)
    try:
        entry = fs.hash(path, algorithm)
    except FileNotFoundError:
        return _digest(path, algorithm, trust_mtime=trust_mtime, fs=fs)
    _digest_cache[(fs.key(path), algorithm)] = entry
    return dict(entry)


def _text_digest(text):
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


###############################################################################
# Code fingerprints ###########################################################
###############################################################################

_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _is_docstring(statement):
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)


def _ast_text(node):
    """Render a syntax tree without positions, comments or docstrings.

    Written out by hand because ``ast.dump`` changes between Python versions; empty
    fields (such as 3.12's ``type_params``) are left out for the same reason.
    """
    if isinstance(node, list):
        return "[" + ",".join(_ast_text(item) for item in node) + "]"
    if not isinstance(node, ast.AST):
        return repr(node)
    fields = []
    for name in node._fields:
        value = getattr(node, name, None)
        if name == "body" and isinstance(node, _DOCUMENTED) and value and _is_docstring(value[0]):
            value = value[1:]
        if value is None or value == []:
            continue
        fields.append(f"{name}={_ast_text(value)}")
    return f"{type(node).__name__}({','.join(fields)})"


def _stable_repr(value):
    """repr() that does not depend on the hash seed or on memory addresses."""
    if hasattr(value, "co_code"):
        return _code_text(value)
    if hasattr(value, "__code__"):  # a function, a lambda
        return _code_text(value.__code__)
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({sorted(map(_stable_repr, value))})"
    if isinstance(value, dict):
        return "{" + ", ".join(sorted(f"{_stable_repr(k)}: {_stable_repr(v)}" for k, v in value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}({[_stable_repr(v) for v in value]})"
    text = repr(value)
    return f"<{type(value).__qualname__}>" if " at 0x" in text else text


def _code_text(code):
    consts = [_stable_repr(c) for c in code.co_consts]
    return f"{code.co_code.hex()}|{consts}|{code.co_names}"


def _bytecode_text(obj):
    """A stand-in for source: the bytecode of ``obj`` and its members, stable within one Python."""
    members = vars(obj) if isinstance(obj, type) or inspect.ismodule(obj) else {"": obj}
    parts = [f"python{sys.version_info[0]}.{sys.version_info[1]}"]
    for name in sorted(members):
        value = members[name]
        # Look through staticmethod, classmethod, property and our own run() wrapper.
        value = inspect.unwrap(getattr(value, "__func__", getattr(value, "fget", value)))
        code = getattr(value, "__code__", None)
        if code is not None:
            parts.append(f"{name}:{_code_text(code)}|{_stable_repr(value.__defaults__)}|{_stable_repr(value.__kwdefaults__)}")
        elif not callable(value) and not name.startswith("__"):
            parts.append(f"{name}={_stable_repr(value)}")
    return "\n".join(parts)


def _source_text(obj):
    """The normalised source of a class, function or module, read once per process."""
    try:
        return _sources[obj]
    except (KeyError, TypeError):
        pass
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    try:
        text = _ast_text(ast.parse(textwrap.dedent(_getsource(obj))))
    except (OSError, TypeError, SyntaxError, RecursionError):
        text = _fallback_text(obj, name)
    if not inspect.ismodule(obj):  # importlib.reload() changes a module in place
        with contextlib.suppress(TypeError):
            _sources[obj] = text
    return text


def _getsource(obj):
    """``inspect.getsource(obj)``, with one parse per file for all its classes (see
    _class_lines), and for a class defined twice the definition that ran (see below);
    Python 3.13 finds a class by its ``__firstlineno__`` instead."""
    if not inspect.isclass(inspect.unwrap(obj)) or sys.version_info >= (3, 13):
        return inspect.getsource(obj)
    # As inspect.getsourcelines and findsource do it, up to the parse.
    obj = inspect.unwrap(obj)
    file = inspect.getsourcefile(obj)
    if not file:
        return inspect.getsource(obj)
    linecache.checkcache(file)
    module = inspect.getmodule(obj, file)
    lines = linecache.getlines(file, module.__dict__) if module else linecache.getlines(file)
    known = _class_lines.get(file)
    if lines and (known is None or known[0] is not lines):
        known = _class_lines[file] = (lines, _class_starts(ast.parse("".join(lines))))
    starts = known[1].get(obj.__qualname__) if lines and known else None
    if not starts:
        return inspect.getsource(obj)  # which says why it cannot
    blocks = [inspect.getblock(lines[start:]) for start in starts]
    if len(blocks) > 1:
        # A name defined twice (under if and else, say): inspect takes the first, which may
        # not be the class that runs, and its edits would go unseen. The one that holds the
        # class's own functions is it; 3.13's inspect finds it by __firstlineno__.
        firsts = [code.co_firstlineno - 1 for code in map(_own_code, vars(obj).values()) if code is not None]
        for start, block in zip(starts, blocks):
            if any(start <= first < start + len(block) for first in firsts):
                return "".join(block)
        # None to tell them apart: all of them, so that an edit to any one counts.
        return "".join(textwrap.dedent("".join(block)) for block in blocks)
    return "".join(blocks[0])


def _own_code(value):
    """The code object of a function, method, static or class method or property in a
    class's namespace, or None."""
    value = getattr(value, "__func__", getattr(value, "fget", value))
    return getattr(inspect.unwrap(value), "__code__", None) if callable(value) else None


def _class_starts(tree):
    """Qualified name -> indexes of the first lines (their first decorators') of the classes
    of that name in ``tree``, in the order inspect's _ClassFinder meets them, depth first.
    Only statements can hold a class, so only lists of statements are walked, in the order
    of each node's fields."""
    starts: dict[str, list[int]] = {}
    todo = [(tree, "")]  # a node, and the qualified name it is in
    while todo:
        node, prefix = todo.pop()
        if isinstance(node, ast.ClassDef):
            prefix += node.name
            starts.setdefault(prefix, []).append((node.decorator_list[0] if node.decorator_list else node).lineno - 1)
            prefix += "."
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            prefix += node.name + ".<locals>."
        inner = [child for field in _STATEMENT_FIELDS for child in getattr(node, field, ())]
        todo.extend((child, prefix) for child in reversed(inner))
    return starts


# The fields that hold statements (or handlers and match cases, which hold them), in the
# order every node that has them lists them.
_STATEMENT_FIELDS = ("body", "handlers", "orelse", "finalbody", "cases")


def _fallback_text(obj, name):
    try:
        text = _bytecode_text(obj)
    except Exception:  # noqa: BLE001 - the fingerprint must never crash a build
        text = f"{getattr(obj, '__module__', '')}.{name}"
    _log_once(
        key=("nosource", name),
        level=logging.WARNING,
        message=f"luigi_hashcheck: no source for {name}; its code fingerprint uses bytecode, "
        "which changes between Python versions",
    )
    return text


def _module_text(module):
    """The source of a module in code_dependencies, read again once importlib.reload() has
    re-executed it (its top-level functions and classes are then new objects)."""
    members = tuple(
        value
        for _key, value in sorted(vars(module).items())
        if (inspect.isfunction(value) or inspect.isclass(value)) and getattr(value, "__module__", None) == module.__name__
    ) + (getattr(module, "__spec__", None),)  # reload() finds the spec anew, too
    known = _module_texts.get(module)
    if known is None or len(known[0]) != len(members) or any(a is not b for a, b in zip(known[0], members)):
        text = _source_text(module)
        if known is not None:
            text += _reloaded()
        known = _module_texts[module] = (members, text)
    return known[1]


def _dependency_text(dep):
    """The source of a function or class in code_dependencies. Once importlib.reload() has
    re-executed its module (which then has a new ``__spec__``), run() likely calls the new
    one through the module, so that one counts."""
    module = sys.modules.get(getattr(dep, "__module__", None) or "")
    if module is None or _module_specs.setdefault(module, module.__spec__) is module.__spec__:
        return _source_text(dep)
    return _source_text(getattr(module, getattr(dep, "__name__", ""), dep)) + _reloaded()


def _reloaded():
    """What a fingerprint gets once code it covers was reloaded in this process.

    After importlib.reload() a process runs a mix: new functions through the module, old
    ones wherever they were bound before (``from helpers import f``). Records it writes
    then carry a mark no fresh process makes, so the next one runs those tasks again with
    code that is all new; within this process the mark stays the same, so they run once.
    """
    return f"\nreloaded in process {_PROCESS}"


def _code_dependencies(cls):
    """``code_dependencies`` of ``cls`` and of every base, in MRO order, each once."""
    found: dict[int, object] = {}
    for klass in cls.__mro__:
        for dep in vars(klass).get("code_dependencies", ()):
            found.setdefault(id(dep), dep)
    return list(found.values())


def _fingerprint(cls: "type[HashCheckingTask]") -> str:
    """Digest of the source of ``cls`` and of every base it has that HashCheckingTask has
    not (mixins included, wherever they stand), of its ``code_dependencies`` and of its
    ``code_version``.

    The classes' source is read when the class is defined, so a file edited after the
    import cannot lend its new source to the old code; a module in ``code_dependencies``
    is read again after ``importlib.reload()``; ``code_version`` is read at every build.
    """
    build = _active_memo()
    fingerprint = build.fingerprints.get(cls) if build is not None else None
    if fingerprint is None:
        parts = [_source_text(klass) for klass in cls.__mro__ if klass not in HashCheckingTask.__mro__]
        parts += [_module_text(dep) if inspect.ismodule(dep) else _dependency_text(dep) for dep in _code_dependencies(cls)]
        parts.append(repr(cls.code_version))
        fingerprint = _text_digest("\n".join(parts))
        if build is not None:
            build.fingerprints[cls] = fingerprint
    return fingerprint




###############################################################################
# Records #####################################################################
###############################################################################
#
# One JSON record per output, at <output folder>/.luigi_hashes/<output name>.json. Readers
# never lock: a record is replaced atomically. Writers of one folder take its lock.

_ENTRY_FIELDS = {"path": "str", "kind": "str", "digest": "str", "size": "int?", "mtime_ns": "int?", "inode": "int?", "hashed_ns": "int"}
_RECORD_FIELDS = {
    "format": "int",
    "algorithm": "str",
    "created_ns": "int",
    "task": "task",
    "code": "str",
    "input_hash": "str",
    "output": "entry",
    "inputs": "entries",
    "dynamic": "dynamic",
}


#
# Each record is made by _make_record, the only function that builds one, and written by
# _write_record, the only function that writes one. A check never writes: it returns the
# stat fields it refreshed, and its caller decides whether to save them.

# A record file name longer than this many UTF-8 bytes is shortened: most filesystems allow
# 255 bytes in a name, and Luigi's own open("w") writes names of up to 234.
_NAME_LIMIT = 200
_NAME_DIGEST = 32  # hex digits of the digest of the full name in a shortened one


def _record_path(path: str, fs=_LOCAL) -> str:
    """Return the record's path for an output at normalised ``path``; on a store, with "/"."""
    if fs is _LOCAL:
        folder, name = os.path.split(path)
        return os.path.join(folder, RECORD_DIR, _record_name(name))
    folder, name = posixpath.split(path)
    return posixpath.join(folder, RECORD_DIR, _record_name(name))


def _record_name(name):
    """The record file name of an output named ``name``: ``NAME.json`` or, past _NAME_LIMIT
    bytes, a prefix of it, ``~``, a digest of the full name and ``.json``. A shortened
    record keeps the full name as its output entry's ``path``."""
    full = name + ".json"
    if len(full) * 4 <= _NAME_LIMIT or len(_utf8(full)) <= _NAME_LIMIT:
        return full
    digest = hashlib.sha256(_utf8(name)).hexdigest()[:_NAME_DIGEST]
    return f"{_prefix(name, _NAME_LIMIT - _NAME_DIGEST - len('~.json'))}~{digest}.json"


def _is_shortened(record_name):
    tail = record_name[-_NAME_DIGEST - len("~.json") :]
    return len(tail) == _NAME_DIGEST + 6 and tail[0] == "~" and tail.endswith(".json") and all(c in "0123456789abcdef" for c in tail[1:-5])


# Each leaf kind: the types it allows, and whether a NUL is barred (strings become paths).
_LEAVES = {
    "str": ((str,), True),
    "int": ((int,), False),
    "int?": ((int, type(None)), False),
}
_SHAPES = {
    "task": {"family": "str", "params": "params"},
    "entry": _ENTRY_FIELDS,
    "dynamic dependency": {"family": "str", "params": "params", "outputs": "entries"},
}
_FILE_FIELDS = ("str", "str", "int?", "int?", "int?", "int")  # [path, digest, size, mtime_ns, inode, hashed_ns]
_ABSENT = object()


def _leaf_problem(value, kind):
    types, no_nul = _LEAVES[kind]
    if type(value) in types and not (no_nul and "\0" in value):
        return None
    return f"{type(value).__name__} is not a valid {kind}"


def _params_problem(value):
    # map() keeps this loop in C: every record has params, and a no-op build reads them all.
    ok = type(value) is dict and set(map(type, value)) <= {str} and set(map(type, value.values())) <= {str}
    return None if ok else "params must map strings to strings"


def _files_problem(value):
    """What is wrong with a folder entry's list of files, or None."""
    if type(value) is not list:
        return "files: a list expected"
    for item in value:
        if type(item) is not list or len(item) != len(_FILE_FIELDS) or any(map(_leaf_problem, item, _FILE_FIELDS)):
            return "files: each file must be [path, digest, size, mtime_ns, inode, hashed_ns]"
    return None


def _token_problem(value):
    ok = type(value) is dict and set(map(type, value)) <= {str} and set(map(type, value.values())) <= {str}
    return None if ok else "a token must map strings to strings"


def _tokens_problem(value):
    if type(value) is not dict or any(type(k) is not str or _token_problem(v) for k, v in value.items()):
        return "tokens must map names to tokens"
    return None


def _names_problem(value):
    """What is wrong with an optional list of names (``excluded``, ``defaulted``), or None."""
    if type(value) is not list or any(_leaf_problem(item, "str") for item in value):
        return "a list of names expected"
    return None


# The optional keys of each shape, and their checks: keys added under format 1, which
# readers that do not know them ignore.
_OPTIONAL = {
    "entry": {
        "excluded": _names_problem,
        "files": _files_problem,
        # A folder's: its file count, the digest of its files' names and stats, and its
        # listing's name and digest (see _digest_dir).
        "count": functools.partial(_leaf_problem, kind="int"),
        "stats": functools.partial(_leaf_problem, kind="str"),
        "listing": functools.partial(_leaf_problem, kind="str"),
        "listing_digest": functools.partial(_leaf_problem, kind="str"),
        # An entry on a store other than the local disk: its name and freshness token(s).
        "store": functools.partial(_leaf_problem, kind="str"),
        "token": _token_problem,
        "tokens": _tokens_problem,
    },
    "dynamic dependency": {"defaulted": _names_problem},
}


def _shape_checker(fields, optional=None):
    """Return a function that says what is wrong with an object of ``fields`` and of the
    ``optional`` keys it has, or None.

    Made once per shape, with the leaf checks inline: a no-op build reads every record,
    and one function call per field would cost more than reading the record.
    """
    leaves = [(key, kind, *_LEAVES[kind]) for key, kind in fields.items() if kind in _LEAVES]
    inner = [(key, kind) for key, kind in fields.items() if kind not in _LEAVES]
    optional_items = list((optional or {}).items())

    def check(value):
        if type(value) is not dict:
            return f"an object expected, found {type(value).__name__}"
        for key, kind, types, no_nul in leaves:
            item = value.get(key, _ABSENT)
            if type(item) not in types or no_nul and "\0" in item:
                return f"key {key!r} missing" if item is _ABSENT else f"{key}: {_leaf_problem(item, kind)}"
        for key, kind in inner:
            if key not in value:
                return f"key {key!r} missing"
            problem = _CHECKS[kind](value[key])
            if problem:
                return f"{key}: {problem}"
        for key, item_check in optional_items:
            if key in value:
                problem = item_check(value[key])
                if problem:
                    return problem if problem.startswith(f"{key}:") else f"{key}: {problem}"
        return None

    return check


def _list_checker(kind, item_kind):
    def check(value):
        if type(value) is not list:
            return f"a list of {kind} expected"
        item_check = _CHECKS[item_kind]
        for item in value:
            problem = item_check(item)
            if problem:
                return problem
        return None

    return check


# kind -> a function saying what is wrong with a value of that kind, or None.
_CHECKS: dict[str, collections.abc.Callable[[object], str | None]] = {kind: functools.partial(_leaf_problem, kind=kind) for kind in _LEAVES}
_CHECKS.update({kind: _shape_checker(fields, _OPTIONAL.get(kind)) for kind, fields in _SHAPES.items()})
_CHECKS.update(
    params=_params_problem,
    entries=_list_checker("entries", "entry"),
    dynamic=_list_checker("dynamic", "dynamic dependency"),
    record=_shape_checker(_RECORD_FIELDS),
)


def _problem(value, kind):
    """Return what is wrong with ``value`` as a record field of ``kind``, or None."""
    return _CHECKS[kind](value)


def _read_record(path: str, fs: _LocalStorage = _LOCAL) -> dict | None:
    """Return the record at ``path``, or None if there is none.

    :raises _DamagedRecord: if the record is empty, truncated, not a JSON object, of an
        unknown format, or has a missing or mistyped key.
    """
    data = fs.read_record(path, _MAX_RECORD_BYTES)
    if data is None:
        return None
    if not data:
        raise _DamagedRecord("it is empty")
    try:
        # We write records as ASCII; decoding them here spares json its encoding detection.
        record = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _DamagedRecord("it is not JSON") from exc
    if type(record) is not dict:
        raise _DamagedRecord("it is not a JSON object")
    if record.get("format") != _FORMAT:
        raise _DamagedRecord(f"unknown format {record.get('format')!r}")
    problem = _problem(record, "record")
    if problem is None:
        try:
            _check_algorithm(record["algorithm"])
        except ConfigError:
            problem = f"unknown algorithm {record['algorithm']!r}"
    if problem:
        raise _DamagedRecord(problem)
    return record


# One encoder for every record: json.dumps() makes a new one per call when given options,
# and ``indent`` would swap json's C encoder for a Python one several times slower.
_encode = json.JSONEncoder(sort_keys=True).encode


def _dump(record):
    """The record as JSON, one top-level key per line."""
    lines = (f"{_encode(key)}: {_encode(record[key])}" for key in sorted(record))
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")


def _write_record(path: str, record: dict, settings: _Settings, replacing: dict | None = None, fs: _LocalStorage = _LOCAL) -> bool:
    """Write ``record`` to the record file ``path`` under its folder's lock.

    :param replacing: if given, write only while the record on disk is still this one, so
        an update never overwrites a record another process wrote meanwhile.
    :returns: whether the record was written.
    """
    garbage: list = []
    try:
        dirname = os.path.dirname if fs is _LOCAL else posixpath.dirname
        folder = fs.records_folder(dirname(dirname(path)))
        with fs.lock(folder, settings.lock_timeout):
            garbage = fs.clean(folder) or []
            if replacing is not None:
                try:
                    if _read_record(path, fs) != replacing:
                        return False
                except _DamagedRecord:
                    return False
            # Under the lock, so that no other writer's cleanup takes a listing between
            # its write and the record that names it: listings first, the record (the
            # commit point), then the listings no longer named.
            record, kept = _with_listings(record, path, fs)
            fs.replace(path, _dump(record))
            if kept or record["output"].get("kind") == "dir":
                # Only a record that owns listings, or of a folder (whose new listing may be
                # lost, see _ListingWriter), looks for its old ones: listing a records folder
                # at every write would make a build quadratic.
                for sidecar in fs.sidecars(folder, _stem(path)):
                    if sidecar.rpartition("/" if fs is not _LOCAL else os.sep)[2] not in kept:
                        fs.remove_sidecar(sidecar)
            return True
    except HashCheckError:
        raise
    except OSError as exc:
        raise HashCheckError(f"cannot write record {path}: {exc.strerror or exc}") from exc
    finally:
        _discard_copies(garbage)


def _remove_record(path, settings, fs=_LOCAL):
    """Remove the record file ``path``, under its folder's lock, and then its listings;
    return whether it was there."""
    removed = fs.remove_record(path, settings.lock_timeout)
    dirname = os.path.dirname if fs is _LOCAL else posixpath.dirname
    for sidecar in fs.sidecars(dirname(path), _stem(path)):
        fs.remove_sidecar(sidecar)
    return removed


def _stem(record_path):
    """A record's name without ``.json``: how the names of its listings begin."""
    return record_path.rpartition("/" if "://" in record_path or os.sep == "/" else os.sep)[2][: -len(".json")]


def _exists(fs, path):
    if fs is _LOCAL:
        return os.path.isfile(path)
    with fs._errors(path):
        return fs._head(path) is not None


def _with_listings(record, record_path, fs):
    """``record`` with the listing of each folder entry beside it: (record, the names of the
    listings of this record kept).

    A folder output's listing, and that of a folder input that no HashCheckingTask made,
    are this record's own, ``STEM.<16 hex>.list``: from this process's new listing, or
    from a folder recorded the old way, with its files inline. A folder input that a
    HashCheckingTask made is named by its maker's listing, never copied: ten readers of a
    folder hold no copy of its list. An entry whose listing is lost keeps no listing."""
    local = fs is _LOCAL
    dirname, join = (os.path.dirname, os.path.join) if local else (posixpath.dirname, posixpath.join)
    records, stem = dirname(record_path), _stem(record_path)
    output_path = join(dirname(records), record["output"]["path"])
    folder = dirname(output_path)
    kept = set()

    def settle(entry, own, path):
        if entry.get("kind") != "dir" or not ("files" in entry or entry.get("listing_digest")):
            return entry
        algorithm = record["algorithm"]
        if "files" in entry and not entry.get("listing_digest"):
            digest = _listing_from_files(entry, algorithm)
            entry = {**{k: v for k, v in entry.items() if k not in _LISTED_KEYS}, "count": len(entry["files"]), "listing_digest": digest}
        entry = {k: v for k, v in entry.items() if k not in ("files", "tokens")}
        digest = entry["listing_digest"]
        if not own and entry.get("recorded"):
            # Named only when its maker's listing of these very lines is there or to come;
            # else the check finds whatever listing the maker's record names then.
            name = _sidecar_name(_stem(_record_path(path, fs)), digest)
            if digest in _pending or _exists(fs, join(dirname(path), RECORD_DIR, name)):
                return {**entry, "listing": name}  # pending: its maker's record, refreshed in this build too, will write it
            return {k: v for k, v in entry.items() if k not in ("listing", "listing_digest")}
        name = _sidecar_name(stem, digest)
        target = join(records, name)
        if not _exists(fs, target):
            source = _pending.get(digest)
            if source is None:
                # A listing that never reached disk: a reader named one its own process
                # made and lost, and this refresh took the reader's digest whole. The
                # listing this record has now, of the same digest, serves instead.
                keep = _listing_on_disk(record_path, entry, fs) if own else None
                if keep is not None:
                    kept.add(keep["listing"])
                    return {**entry, **keep}
                return {k: v for k, v in entry.items() if k not in ("listing", "listing_digest")}
            fs.replace_from(target, source)
        kept.add(name)
        return {**entry, "listing": name}

    def inputs(entries):
        return [settle(e, False, _input_path(folder, e["path"], fs)) for e in entries]

    made = dict(
        record,
        output=settle(record["output"], True, output_path),
        inputs=inputs(record["inputs"]),
        dynamic=[dict(dep, outputs=inputs(dep["outputs"])) for dep in record["dynamic"]],
    )
    return made, kept


def _listing_on_disk(record_path, entry, fs):
    """The listing fields of the record now at ``record_path``, if it describes the folder
    digest of ``entry`` and its listing is there; else None."""
    try:
        now = _read_record(record_path, fs)
    except (_DamagedRecord, OSError):
        return None
    made = now["output"] if now else {}
    if made.get("kind") != "dir" or made.get("digest") != entry.get("digest") or not made.get("listing"):
        return None
    dirname, join = (os.path.dirname, os.path.join) if fs is _LOCAL else (posixpath.dirname, posixpath.join)
    if not _exists(fs, join(dirname(record_path), made["listing"])):
        return None
    return {"listing": made["listing"], "listing_digest": made["listing_digest"]}


_encode_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def _input_hash(algorithm: str, family: str, params: dict, code: str, pairs: list) -> str:
    """The one digest over a task's identity, code and (input name, input digest) pairs."""
    payload = _encode_canonical([family, params, code, pairs])
    return hashlib.new(algorithm, payload.encode("utf-8")).hexdigest()


def _pairs(inputs, dynamic):
    """The (name, digest) pairs a local record's input hash covers: its inputs, then the
    outputs of its dynamic dependencies."""
    return [[e["path"], e["digest"]] for e in inputs + [e for dep in dynamic for e in dep["outputs"]]]


def _make_record(algorithm, family, params, code, output, inputs, dynamic, created_ns=None, input_hash=None, reason=None):
    """The one function that makes a record: the fields of _RECORD_FIELDS, its input hash
    computed from them unless given, dated now unless ``created_ns`` is given; with
    ``reason``, why the build that wrote it ran the task (for that build's summary)."""
    record = {
        "format": _FORMAT,
        "algorithm": algorithm,
        "created_ns": created_ns or time.time_ns(),
        "task": {"family": family, "params": params},
        "code": code,
        "input_hash": input_hash or _input_hash(algorithm, family, params, code, _pairs(inputs, dynamic)),
        "output": output,
        "inputs": inputs,
        "dynamic": dynamic,
    }
    if reason:
        record["reason"] = reason
    return record


def _remade(record, **fields):
    """``record`` made again with some of _make_record's arguments changed: refreshed stat
    fields, a new date, new digests. Keys a newer version wrote are kept."""
    made = _make_record(
        **{
            "algorithm": record["algorithm"],
            "family": record["task"]["family"],
            "params": record["task"]["params"],
            "code": record["code"],
            "output": record["output"],
            "inputs": record["inputs"],
            "dynamic": record["dynamic"],
            "created_ns": record["created_ns"],
            **fields,
        }
    )
    return {**record, **made}


# How inputs are named in a record, and which folder record an output lies in.


def _project_root(folder, settings):
    """The project root for outputs in ``folder``: ``[hashcheck] root``, or else the nearest
    folder at or above it that holds luigi.cfg; None when there is neither."""
    if settings.root:
        return settings.root
    climbed = []
    while folder not in _config_folders:
        climbed.append(folder)
        parent = os.path.dirname(folder)
        if os.path.isfile(os.path.join(folder, "luigi.cfg")):
            _config_folders[folder] = folder
        elif parent == folder:
            _config_folders[folder] = None
        else:
            folder = parent
    found = _config_folders[folder]
    _config_folders.update(dict.fromkeys(climbed, found))
    return found


def _within(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _remote_root(path):
    """(root, key) of a store path: ``s3://bucket`` and the key, or for a Mock key "/" when
    it starts with one, else ""."""
    if "://" in path:
        scheme, _sep, rest = path.partition("://")
        netloc, _sep, key = rest.partition("/")
        return f"{scheme}://{netloc}", key
    return ("/", path.lstrip("/")) if path.startswith("/") else ("", path)


def _resolve(folder, name, fs=_LOCAL):
    """The path an input's recorded ``name`` stands for, for an output in ``folder``."""
    if fs is _LOCAL:
        return _norm(os.path.join(folder, name))
    if "://" in name or name.startswith("/") or os.path.isabs(name):
        return name
    root, key = _remote_root(folder)
    joined = posixpath.normpath(posixpath.join(key, name)) if key else posixpath.normpath(name)
    return f"{root}/{joined}" if root and root != "/" else root + joined


def _name(target, folder, index, root=None, fs=_LOCAL):
    """Name an input in a record. Relative to the output's ``folder`` when both lie under the
    project ``root``, or when no root is known, so the project can move; absolute otherwise,
    so data outside the project is found wherever the project goes. An input in another
    store than the output (``fs``) is named by its URL, or absolute path; one in the same
    store by its posix path relative to the folder."""
    path = getattr(target, "path", None)
    if not isinstance(path, (str, os.PathLike)):
        return f"{type(target).__name__}[{index}]"
    if folder is None:
        return os.fspath(path)
    if not isinstance(target, luigi.LocalTarget):
        found = _storage_of(target)
        if found is None or fs is _LOCAL or type(found[0]) is not type(fs):
            return found[1] if found else os.fspath(path)
        (in_root, in_key), (out_root, out_key) = _remote_root(found[1]), _remote_root(folder)
        if in_root != out_root:
            return found[1]
        return posixpath.relpath("/" + in_key, "/" + out_key)
    path = _norm(path)
    if fs is not _LOCAL:
        return path
    if root is not None and not (_within(path, root) and _within(folder, root)):
        return path
    head, _sep, tail = path.rpartition(os.sep)
    if head == folder:  # the common case, and relpath is slow
        return tail
    try:
        return os.path.relpath(path, folder).replace(os.sep, "/")
    except ValueError:  # another drive on Windows
        return path


def _same_inputs(names, entries, folder, fs=_LOCAL):
    """Whether ``names`` name the inputs of the recorded ``entries``. A name relative to the
    output's ``folder`` and an absolute one name the same file when they resolve alike, so
    records written before the project root chose the form stay valid."""
    if names == [entry["path"] for entry in entries]:
        return True
    return len(names) == len(entries) and all(
        name == entry["path"] or _resolve(folder, name, fs) == _resolve(folder, entry["path"], fs) for name, entry in zip(names, entries)
    )


def _named(entry, name, recorded=False):
    """``entry`` under ``name``; ``recorded`` marks an input that a HashCheckingTask made, which
    so has a record of its own: verify calls it ``unrecorded`` when that record is gone."""
    named = dict(entry, path=name)
    if recorded:
        named["recorded"] = True
    return named


def _folder_record(path):
    """The record of the output at ``path`` if it is a folder output; else None, as for a
    damaged record."""
    record_path = _record_path(path)
    if not os.path.exists(record_path):
        return None
    try:
        record = _read_record(record_path)
    except _DamagedRecord:
        return None
    return record if record and record["output"]["kind"] == "dir" else None


def _output_of(record_path):
    """The output a record file belongs to. A shortened record name keeps only a prefix of
    the output's name; the record holds the full one."""
    records, name = os.path.split(record_path)
    folder = os.path.dirname(records)
    if _is_shortened(name):
        try:
            record = _read_record(record_path)
        except (_DamagedRecord, OSError):
            record = None
        if record:
            output = os.path.join(folder, record["output"]["path"])
            # Only a name that leads back to this very record: a record is data, not a pointer.
            if _record_path(_norm(output)) == _norm(record_path):
                return output
    return os.path.join(folder, name[: -len(".json")])




###############################################################################
# Targets #####################################################################
###############################################################################


class HashableTarget(luigi.Target):
    """A target whose content can be hashed and that can keep its task's input hash.

    A task whose output is a HashableTarget other than a :class:`luigi.LocalTarget` is
    checked through these three methods alone: the output must exist and its stored input
    hash must equal the current one. There is no check of the output's own digest and no
    per-input reason.

    ``hash_content()`` is needed only by a task that reads the target as an input: a target
    written for the proof of concept without it can still be made and be an output.
    """

    def hash_content(self) -> str:
        """Return the hex digest of the target's content.

        :rtype: str
        """
        raise NotImplementedError(f"{type(self).__qualname__} has no hash_content(), so it cannot be an input")

    @abc.abstractmethod
    def get_current_input_hash(self) -> str | None:
        """Return the input hash recorded for the task that made this target, or None
        when there is no usable record. Raising :class:`HashableTargetException` means
        the same.

        :rtype: str or None
        """

    @abc.abstractmethod
    def store_input_hash(self, input_hash: str) -> None:
        """Record ``input_hash`` for this target.

        :param str input_hash: the digest returned by the task's input hash.
        """


class HashableLocalTarget(luigi.LocalTarget, HashableTarget):
    """A drop-in :class:`luigi.LocalTarget` whose record sits in ``.luigi_hashes/``.

    A plain ``luigi.LocalTarget`` gets exactly the same treatment from
    :class:`HashCheckingTask`; this class adds the :class:`HashableTarget` methods.
    """

    def hash_content(self) -> str:
        settings = _settings()
        return _digest(_norm(self.path), settings.algorithm, trust_mtime=settings.trust_mtime)["digest"]

    def get_current_input_hash(self) -> str | None:
        try:
            record = _read_record(_record_path(_norm(self.path)))
        except _DamagedRecord:
            return None
        return record["input_hash"] if record else None

    def store_input_hash(self, input_hash: str) -> None:
        settings = _settings()
        path = _norm(self.path)
        record_path = _record_path(path)
        try:
            record = _read_record(record_path)
        except _DamagedRecord:
            record = None
        algorithm = record["algorithm"] if record else settings.algorithm
        output = _named(_digest(path, algorithm, trust_mtime=settings.trust_mtime), os.path.basename(path))
        if record is None:
            record = _make_record(algorithm, "", {}, "", output, [], [], input_hash=input_hash)
        else:
            record = _remade(record, output=output, created_ns=time.time_ns(), input_hash=input_hash)
        _write_record(record_path, record, settings)




###############################################################################
# Deciding ####################################################################
###############################################################################
#
# "Is this task up to date, and if not, why?" is answered here, and only here. _judge
# compares one task's records with the world (its own verdict); _walk walks the graph and
# gives every task its final verdict, stale too when a task below it is (_settle). The
# build's complete(), explain and adopt use _walk. verify, which has records but no
# pipeline, uses the same comparison of a recorded entry with what is there now
# (_compare_entry) and the same rule for staleness from upstream (_settle); accept uses
# the comparison too.

# Every reason a task or a record is stale: the texts the log, explain and verify print.
_REASONS = {
    "no outputs": "task has no outputs",
    "no record": "no record",
    "damaged": "record damaged",
    "output missing": "output missing",
    "output modified": "output modified: {digests}",
    "parameters": "parameters changed: {changes}",
    "code": "code changed",
    "inputs": "inputs changed",
    "reordered": "inputs reordered",
    "missing": "{what} {name} is missing",
    "changed": "{what} {name} changed ({digests})",
    "excluded": "{what} {name} changed (the outputs left out of it)",
    "input hash": "input hash changed",
    "dynamic lost": "dynamic dependency {family} cannot be rebuilt",
    "dynamic outputs": "dynamic dependency {task} changed its outputs",
    "external": "external data missing",
    "aside": "output {name} is set aside in .luigi_hashes/ by a rerun that failed to end or is running",
    "incomplete": "incomplete",
    "upstream": "upstream task {task} will run",
    # the build's summary, told after the build what became of a stale task:
    "reran": "upstream {task} reran",
    "cutoff": "skipped by early cutoff, its inputs did not change",
    "not run": "did not run ({reason})",
    "failed": "failed ({reason})",
    # verify's, which judges records without their pipeline:
    "record damaged": "record damaged: {error}",
    "record unreadable": "record unreadable: {error}",
    "record vanished": "record vanished",
    "unhashable": "{what} is not a regular file or directory",
    "unreadable": "{what} cannot be read ({error})",
    "unrecorded": "no record, though {reader} reads it as a HashCheckingTask's output",
    "record upstream": "upstream {output} is {status}",
    # the build's and adopt's, when a task's validate() hook refuses its outputs:
    "validate": "validate() failed: {error}",
}


def _reason(key, **fields):
    return _REASONS[key].format(**fields)


# The one comparison: a recorded entry against what is there now.


def _look(fs, path, algorithm, known, trust_mtime, cache, rechecked=False, excluded=(), home=None, listing_if=None):
    """The entry of the file or folder at ``path`` now, or None if nothing is there.

    :param known: its recorded entry, whose digest serves while its stat vouches for it.
    :param cache: spares a second look at a path within one walk, as an output and as an input.
    :param rechecked: as for ``_digest``; ``home`` and ``listing_if`` too.
    """
    key = (path, algorithm, excluded) if excluded else (path, algorithm)
    if fs is not _LOCAL:
        key = (fs.key(path), algorithm)
    if key not in cache:
        _counts["looks"] += 1
        try:
            st = None
            if fs is not _LOCAL and not (rechecked and known is None):
                st = _stat_of(fs, path, cache)
                if st is None:
                    raise FileNotFoundError(path)
            cache[key] = _digest(path, algorithm, known, trust_mtime, rechecked, excluded, fs, st, home, listing_if)
        except FileNotFoundError:
            cache[key] = None
    return cache[key]


def _stat_of(fs, path, cache):
    """A store path's stat, or None if absent, asked of the store once per walk: an output
    is looked at as its task's output and as other tasks' input (one HEAD on S3)."""
    key = ("stat", fs.key(path))
    if key not in cache:
        # While Luigi schedules, nothing runs: the walks from each root share what the store
        # said, so a lattice's no-op build asks once per output, not once per edge.
        build = _active_memo()
        shared = build.stats if build is not None and not build.running else {}
        if key not in shared:
            try:
                shared[key] = fs.stat(path)
            except FileNotFoundError:
                shared[key] = None
        cache[key] = shared[key]
    return cache[key]


def _compare_entry(fs, path, recorded, algorithm, trust_mtime, cache, excluded=None, home=None, output=False):
    """Compare the ``recorded`` entry of ``path`` with what is there now.

    :param excluded: what a folder leaves out; by default, what the entry says it left out.
    :param home: the records folder of the record that holds ``recorded``, where a folder
        that no task made has its listing.
    :param output: ``path`` is the output of the task whose record holds ``recorded``, and
        a changed output means the task reruns and lists it anew: a folder's new listing is
        only made if its digest is as recorded.
    :returns: (change, current): change is None while the digest matches, else "missing",
        "excluded" (what is left out changed) or "changed"; current is the entry as now found.
    """
    if excluded is None:
        excluded = tuple(recorded.get("excluded", ()))
    current = _look(fs, path, algorithm, recorded, trust_mtime, cache, excluded=excluded, home=home, listing_if=recorded["digest"] if output else None)
    if current is None:
        return "missing", None
    if current.get("excluded", []) != recorded.get("excluded", []):
        return "excluded", current
    if current["digest"] != recorded["digest"]:
        return "changed", current
    return None, current


def _digests(recorded, current, shown=10):
    """What a changed digest looks like in every message: ``old -> new``, eight digits each;
    for a folder, then the first ``shown`` files changed and their count, when the listing
    of the recorded folder was there to compare with, else the count of its files."""
    text = f"{recorded['digest'][:8]} -> {current['digest'][:8]}"
    if current.get("kind") != "dir" or recorded.get("kind") != "dir":
        return text
    files = _changed_files(recorded, current)
    if files is None:
        return f"{text}; {current.get('count', '?')} files, no listing of the recorded ones to compare with"
    count, first = files
    more = f" and {count - shown} more" if count > shown else ""
    return f"{text}; {count} files changed: {', '.join(first[:shown])}{more}"


def _changed_files(recorded, current):
    """(count, first names) of the files changed in a folder since ``recorded``, or None
    when the scan had no listing of the recorded folder to compare with."""
    changes = getattr(current, "changes", None)
    if changes is None or getattr(current, "base", None) != recorded.get("digest"):
        return None
    return changes


def _param_changes(recorded, family, params):
    """Each recorded parameter added, removed or changed, as ``name: old -> new``, each value
    cut to 80 characters; "(none)" stands for a parameter one side does not have."""

    def shown(value):
        if value is _ABSENT:
            return "(none)"
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    old = recorded["params"]
    changes = [f"task family: {shown(recorded['family'])} -> {shown(family)}"] if recorded["family"] != family else []
    for name in dict.fromkeys([*old, *params]):
        before, after = old.get(name, _ABSENT), params.get(name, _ABSENT)
        if before != after:
            changes.append(f"{name}: {shown(before)} -> {shown(after)}")
    return ", ".join(changes)


def _change_reason(change, what, recorded, current):
    """The reason for a ``change`` that _compare_entry found in the input ``recorded``."""
    if change == "changed":
        return _reason("changed", what=what, name=recorded["path"], digests=_digests(recorded, current))
    return _reason(change, what=what, name=recorded["path"])


def _stat_refreshed(recorded, current):
    """The recorded entry with the current stat fields, when only those would let the next
    process skip a hash; otherwise the recorded entry unchanged."""
    if current is recorded or current["kind"] != recorded["kind"]:
        return recorded
    if current["kind"] == "dir":
        # A new listing, written by the scan, when it spares the next check a hash, or new
        # stats, which spare it the listing; the old format's inline files stay until the
        # record is written for another reason.
        moved = "stats" in current and (current["stats"], current.get("listing_digest")) != (recorded.get("stats"), recorded.get("listing_digest"))
        if getattr(current, "worth", False) or moved:
            return {**{k: v for k, v in recorded.items() if k not in _LISTED_KEYS}, **current, "path": recorded["path"]}
        return recorded
    if current.get("token", recorded.get("token")) != recorded.get("token") or current.get("tokens", {}) != recorded.get("tokens", {}):
        # Same bytes under a new token (a re-upload): the new token spares the next hash.
        return {**recorded, **current, "path": recorded["path"]}
    if current["kind"] == "file":
        old = (recorded["size"], recorded["mtime_ns"], recorded["inode"], recorded["hashed_ns"])
        if _worth_refreshing(old, (current["size"], current["mtime_ns"], current["inode"], current["hashed_ns"])):
            return {**recorded, **current, "path": recorded["path"]}  # keeps keys such as "recorded"
    return recorded


def _worth_refreshing(old, new):
    """Whether the stat fields ``new`` ([size, mtime_ns, inode, hashed_ns]) would spare the
    next process a hash that ``old`` (as recorded, or None) would not. Two entries that both
    vouch for the same file differ only in when it was hashed: rewriting a record for that
    would make no-op builds write."""

    def vouches(fields):
        return fields is not None and fields[1] is not None and fields[3] - fields[1] >= _TICK_NS

    return vouches(new) and not (vouches(old) and tuple(old[:3]) == tuple(new[:3]))


def _settle(deps, bad):
    """The one rule for staleness from upstream: which nodes are stale only because
    something they depend on is.

    :param deps: node -> the nodes it depends on, in order (tasks by task_id, or records).
    :param bad: the nodes stale in themselves.
    :returns: node -> the first of its dependencies, in order, that is stale. Cycles are
        fine: each node changes at most once.
    """
    dependents = collections.defaultdict(list)
    for node, children in deps.items():
        for child in children:
            dependents[child].append(node)
    stale = set(bad)
    todo = list(stale)
    while todo:
        for node in dependents[todo.pop()]:
            if node not in stale:
                stale.add(node)
                todo.append(node)
    return {node: next(child for child in deps[node] if child in stale) for node in stale.difference(bad)}


# What a task is, as the checks see it: its parameters, outputs, dependencies and inputs,
# each found once per build.


def _require_hashable(task, targets, inputs=()):
    """Refuse a target we cannot hash; among ``inputs``, also one that has no hash_content()."""
    for target in targets:
        if not isinstance(target, (luigi.target.FileSystemTarget, HashableTarget)):
            raise UnhashableTargetError(task, target)
    for target in inputs:
        if not isinstance(target, luigi.LocalTarget) and getattr(type(target), "hash_content", None) is HashableTarget.hash_content:
            raise UnhashableTargetError(task, target, "has no hash_content(): an input must say what its content is")


def _task_of(dep):
    """The task a record names as a dynamic dependency, or None. Never imports anything: a
    record is data, so only classes the pipeline has already imported are looked up. The
    parameters it had by default get their default of today (see _dynamic_dependency)."""
    defaulted = dep.get("defaulted", ())
    try:
        return Register.get_task_cls(dep["family"]).from_str_params({k: v for k, v in dep["params"].items() if k not in defaulted})
    except Exception:  # noqa: BLE001 - unknown class or parameters: the record is stale
        return None


def _checked(task):
    """Whether ``task`` is judged by its records: a HashCheckingTask, unless it is also an
    ExternalTask, which is complete when its outputs exist (and hashed as an input below),
    or a WrapperTask, which is complete when what it wraps is."""
    return isinstance(task, HashCheckingTask) and not luigi.worker._is_external(task) and not isinstance(task, luigi.WrapperTask)


def _params(task):
    """The significant public parameters as strings: ``task.to_str_params(only_significant=True,
    only_public=True)``, the ones task_id uses, without Luigi's slow walk of the class."""
    cls = type(task)
    spec = _param_specs.get(cls)
    if spec is None:
        public = luigi.parameter.ParameterVisibility.PUBLIC
        spec = _param_specs[cls] = [(n, p) for n, p in cls.get_params() if p.significant and p.visibility == public]
    return {name: param.serialize(task.param_kwargs[name]) for name, param in spec}


def _outputs(task):
    """``flatten(task.output())``, made once per task and build: each task's outputs are
    also the inputs of every task that requires it."""
    build = _active_memo()
    if build is None:
        return flatten(task.output())
    found = build.outputs.get(task.task_id)
    if found is None:
        found = build.outputs[task.task_id] = flatten(task.output())
    return found


def _deps_and_inputs(task):
    """Return ``task.deps()``, ``flatten(task.input())`` and, when both come from
    ``requires()`` alone, a function giving ``task.input()``.

    ``requires()`` is called once per task and build: it makes every dependency anew,
    which costs more than a record check, and Luigi would call it three times.
    """
    build = _active_memo()
    known = build.graph.get(task.task_id) if build is not None else None
    if known is not None:
        return known
    cls = type(task)
    # Past HashCheckingTask's deps() and input(), which answer from this very memo.
    base = super(HashCheckingTask, task) if isinstance(task, HashCheckingTask) else task
    find_deps = base.deps if cls.deps is HashCheckingTask.deps else task.deps
    find_input = base.input if cls.input is HashCheckingTask.input else task.input
    plain = (getattr(find_deps, "__func__", None), getattr(find_input, "__func__", None)) == (luigi.Task.deps, luigi.Task.input)
    _finding.add(id(task))  # a deps() or input() of its own may call the other one
    try:
        if plain and cls._requires is luigi.Task._requires:
            # deps() is flatten(requires()) and input() getpaths(requires()); flattening that
            # gives the same targets in the same order as flattening each dependency's output.
            # Listed: an iterator in it would serve flatten() once and leave input() nothing.
            required = _listed(task.requires())
            deps = flatten(required)
            found = deps, [target for dep in deps for target in _outputs(dep)], functools.partial(getpaths, required)
        else:
            found = find_deps(), flatten(find_input()), None
    finally:
        _finding.discard(id(task))
    extra = _extra_inputs(task) if isinstance(task, HashCheckingTask) else []
    if extra:
        found = found[0], list(found[1]) + extra, found[2]
    if build is not None:
        build.graph[task.task_id] = found
    return found


# luigi.DynamicRequirements came with Luigi 3.2.0; an older run() cannot yield one.
_DYNAMIC_REQUIREMENTS = getattr(luigi, "DynamicRequirements", ())


def _listed(value):
    """``value`` with every iterator in it, at any depth, replaced by a list.

    Luigi flattens a yielded value to schedule it and maps it to paths to send back, so an
    iterator would be spent by the first and give the second, and our record, nothing.
    Tasks, dicts, lists and tuples that hold no iterator are returned as they are.
    """
    if isinstance(value, _DYNAMIC_REQUIREMENTS):
        listed = _listed(value.requirements)
        if listed is not value.requirements:
            value.requirements = listed
            value._flat_requirements = value._paths = None  # Luigi's caches, made of the iterator
        return value
    if value is None or isinstance(value, (luigi.Task, str)):
        return value
    if isinstance(value, dict):
        items = {key: _listed(item) for key, item in value.items()}
        same = all(items[key] is item for key, item in value.items())
        return value if same else type(value)(items)
    if isinstance(value, (list, tuple)):
        listed = [_listed(item) for item in value]
        if all(new is old for new, old in zip(listed, value)):
            return value
        return type(value)(*listed) if hasattr(value, "_fields") else type(value)(listed)
    try:
        items = iter(value)
    except TypeError:
        return value  # not a structure: Luigi will say what is wrong with it
    return [_listed(item) for item in items]


def _own_paths(task):
    """The normalised paths of ``task``'s local outputs, which its folder inputs leave out."""
    return tuple(_norm(t.path) for t in _outputs(task) if isinstance(t, luigi.LocalTarget))


def _excluded(folder, own):
    """The outputs ``own`` of a task that lie inside its input ``folder``, as sorted relative
    posix paths, or ().

    They are left out of the folder's digest, or the task's own run() would change its
    input, and listed in the input's entry, so ``verify`` and ``accept`` leave them out too.
    Nothing is left out of another task's recorded folder output: no output may lie inside one.
    """
    prefix = folder.rstrip(os.sep) + os.sep
    inside = [path for path in own if path.startswith(prefix)]
    if not inside or _folder_record(folder) is not None:
        return ()
    return tuple(sorted({os.path.relpath(path, folder).replace(os.sep, "/") for path in inside}))


def _recorded_paths(task):
    """The paths of the outputs of ``task``'s dependencies that keep records of their own."""
    deps = _deps_and_inputs(task)[0]
    return {_path_of(t) for dep in deps if _checked(dep) for t in _outputs(dep)} - {None}


def _path_of(target):
    """A file-like target's normalised path (local) or store path, else None."""
    if isinstance(target, luigi.LocalTarget):
        return _norm(target.path)
    found = _storage_of(target)
    return found[1] if found else None


def _absent_outputs(task, memo):
    """A walk cache that knows which of ``task``'s store outputs this build found absent:
    the check before run() takes them as absent without asking the store again, as Luigi's
    own scheduling would. Local outputs are looked at again."""
    cache: dict = {}
    for target in _outputs(task):
        if not isinstance(target, luigi.LocalTarget) and (found := _storage_of(target, task)) and found[0].key(found[1]) in memo.absent:
            cache[("stat", found[0].key(found[1]))] = None
    return cache


# The verdicts.

# ok: whether the task is up to date; reason: why not, from _REASONS; deps: the tasks to
# check next (static, and when ok the recorded dynamic ones); made_ns: when its oldest record
# was written; inputs: flatten(task.input()); refreshes: (record path, refreshed record, record
# read) for records whose stat fields a caller may save; hint: an output with no record.
_Verdict = collections.namedtuple("_Verdict", "ok reason deps made_ns inputs refreshes hint", defaults=((), 0, None, (), None))


def _judge(task, settings, cache):
    """The verdict on ``task``'s own records against its outputs, inputs, parameters and
    code. Its dependencies are not judged, and nothing is written.

    :param cache: shared by the judgements of one walk (see ``_look``).
    """
    if not _checked(task):
        # Any other task is complete by its own rule.
        deps = list(task.deps())
        if task.complete():
            return _Verdict(True, "", deps)
        return _Verdict(False, _reason("external" if luigi.worker._is_external(task) else "incomplete"), deps)
    _counts["record_checks"] += 1
    deps, inputs, _input = _deps_and_inputs(task)
    outputs = _outputs(task)
    if not outputs:
        _warn_task("no outputs", task, f"Task {task!r} without outputs is never complete")
        return _Verdict(False, _reason("no outputs"), deps)
    _require_hashable(task, outputs + inputs, inputs)
    records = []
    for output in outputs:
        found = _storage_of(output, task)
        if found is None:
            if not output.exists():
                return _Verdict(False, _reason("output missing"), deps, inputs=inputs)
            records.append((output, None, None, None))
            continue
        fs, path = found
        if fs is not _LOCAL and _stat_of(fs, path, cache) is None:
            # On a store, the output first (one HEAD), and its record only if it is there.
            if (build := _active_memo()) is not None:
                build.absent.add(fs.key(path))
            return _Verdict(False, _reason("output missing"), deps, inputs=inputs)
        record_path = _record_path(path, fs)
        try:
            record = _read_record(record_path, fs)
            aside = None
            if record is None and fs is _LOCAL:  # copies set aside are local only
                aside = _restored(task, settings)
                if aside == "restored":
                    record = _read_record(record_path, fs)
        except _DamagedRecord as exc:
            _log_once(
                key=("damaged", record_path, os.lstat(record_path).st_mtime_ns if fs is _LOCAL and os.path.lexists(record_path) else 0),
                level=logging.WARNING,
                message=f"luigi_hashcheck: damaged record {record_path} ({exc}); {task} will be rebuilt",
            )
            return _Verdict(False, _reason("damaged"), deps, inputs=inputs)
        if record is None:
            if aside == "aside":
                return _Verdict(False, _reason("aside", name=path), deps, inputs=inputs)
            if fs is _LOCAL and not os.path.exists(path):  # with a record, _compare finds this out
                return _Verdict(False, _reason("output missing"), deps, inputs=inputs)
            return _Verdict(False, _reason("no record"), deps, inputs=inputs, hint=path)
        records.append((output, path, record, fs))
    family = task.task_family
    params = _params(task)
    code = _fingerprint(type(task))
    dynamic = {}
    made_ns = None
    refreshes = []
    own = tuple(path for _output, path, _record, fs in records if fs is _LOCAL)
    for output, path, record, fs in records:
        if path is None:  # a third-party HashableTarget: the input hash is all there is
            pairs = []
            for index, target in enumerate(inputs):
                entry = _entry(target, settings.algorithm, None, settings, cache, own=own)
                if entry is None:
                    return _Verdict(False, _reason("missing", what="input", name=_name(target, None, index)), deps, inputs=inputs)
                pairs.append([_name(target, None, index), entry["digest"]])
            try:
                recorded_hash = output.get_current_input_hash()
            except HashableTargetException:  # the proof of concept's "no usable record"
                return _Verdict(False, _reason("no record"), deps, inputs=inputs)
            if recorded_hash != _input_hash(settings.algorithm, family, params, code, pairs):
                return _Verdict(False, _reason("input hash"), deps, inputs=inputs)
            made_ns = 0
            continue
        reason, fresh = _compare(task, record, path, inputs, family, params, code, settings, cache, dynamic, own, fs)
        if reason:
            return _Verdict(False, reason, deps, inputs=inputs)
        if fresh is not record:
            refreshes.append((_record_path(path) if fs is _LOCAL else _StorePath(_record_path(path, fs), fs), fresh, record))
        made_ns = record["created_ns"] if made_ns is None else min(made_ns, record["created_ns"])
    return _Verdict(True, "", list(deps) + list(dynamic.values()), made_ns or 0, inputs, refreshes)


def _recorded_dynamic_tasks(task):
    """The dynamic dependencies the readable records of ``task`` name, made again."""
    found = {}
    for output in _outputs(task):
        if (stored := _storage_of(output, task)) is not None:
            fs, path = stored
            try:
                record = _read_record(_record_path(path, fs), fs)
            except _DamagedRecord:
                continue
            for dep in record["dynamic"] if record else ():
                dep_task = _task_of(dep)
                if dep_task is not None:
                    found.setdefault(dep_task.task_id, dep_task)
    return list(found.values())


def _entry(target, algorithm, known, settings, cache, rechecked=False, own=(), task=None):
    """Return ``target``'s current entry, or None if it does not exist (see ``_look``);
    ``own`` holds the normalised paths of the reading task's outputs (see ``_excluded``)."""
    if isinstance(target, luigi.LocalTarget):
        path = _norm(target.path)
        return _look(_LOCAL, path, algorithm, known, settings.trust_mtime, cache, rechecked, _excluded(path, own) if own else ())
    found = _storage_of(target, task)
    if found is not None:
        return _look(found[0], found[1], algorithm, known, settings.trust_mtime, cache, rechecked)
    key = (id(target), algorithm)
    if key not in cache:
        entry = None
        if target.exists():
            entry = {"kind": "custom", "digest": target.hash_content(), "size": None, "mtime_ns": None, "inode": None, "hashed_ns": time.time_ns()}
        cache[key] = (target, entry)  # holding the target keeps its id from being reused
    return cache[key][1]


def _compare(task, record, path, inputs, family, params, code, settings, cache, dynamic, own=(), fs=_LOCAL):
    """Compare one output's record with the world; return (reason or None, refreshed record)."""
    algorithm = record["algorithm"]
    folder = os.path.dirname(path) if fs is _LOCAL else posixpath.dirname(path)
    home = (os.path.dirname if fs is _LOCAL else posixpath.dirname)(_record_path(path, fs))
    change, output = _compare_entry(fs, path, record["output"], algorithm, settings.trust_mtime, cache, excluded=(), home=home, output=True)
    if change == "missing":
        return _reason("output missing"), None
    if change:
        return _reason("output modified", digests=_digests(record["output"], output)), None
    if record["task"]["family"] != family or record["task"]["params"] != params:
        return _reason("parameters", changes=_param_changes(record["task"], family, params)), None
    if record["code"] != code:
        return _reason("code"), None
    root = _project_root(folder, settings) if fs is _LOCAL else None
    names = [_name(target, folder, index, root, fs) for index, target in enumerate(inputs)]
    if not _same_inputs(names, record["inputs"], folder, fs):
        if sorted(_resolve(folder, n, fs) for n in names) != sorted(_resolve(folder, e["path"], fs) for e in record["inputs"]):
            return _reason("inputs"), None
        # Order stays significant (a run() may concatenate its inputs), but the likely cause
        # is a requires() built from a set, whose order changes with every interpreter.
        _log_once(
            key=("reordered", task.task_family),
            level=logging.WARNING,
            message=f"luigi_hashcheck: {task} has the same inputs as recorded, in another order, so it "
            "will run again; if requires() iterates over a set or a dict built from one, sort it",
        )
        return _reason("reordered"), None
    inputs_now = []
    for target, recorded in zip(inputs, record["inputs"]):
        reason, entry = _compare_target(target, recorded, algorithm, settings, cache, "input", own, task, home)
        if reason:
            return reason, None
        inputs_now.append(entry)
    dynamic_now = []
    for dep in record["dynamic"]:
        dep_task = _task_of(dep)
        if dep_task is None:
            return _reason("dynamic lost", family=dep["family"]), None
        targets = flatten(dep_task.output())
        _require_hashable(dep_task, targets)
        _require_hashable(task, (), targets)
        if not _same_inputs([_name(t, folder, i, root, fs) for i, t in enumerate(targets)], dep["outputs"], folder, fs):
            return _reason("dynamic outputs", task=dep_task), None
        entries = []
        for target, recorded in zip(targets, dep["outputs"]):
            reason, entry = _compare_target(target, recorded, algorithm, settings, cache, "dynamic input", own, task, home)
            if reason:
                return reason, None
            entries.append(entry)
        dynamic_now.append(dict(dep, outputs=entries))
        dynamic[dep_task.task_id] = dep_task
    output_now = _stat_refreshed(record["output"], output)
    if output_now is record["output"] and all(a is b for a, b in zip(inputs_now, record["inputs"])) and all(
        a["outputs"] == b["outputs"] for a, b in zip(dynamic_now, record["dynamic"])
    ):
        return None, record
    return None, _remade(record, output=output_now, inputs=inputs_now, dynamic=dynamic_now)


def _compare_target(target, recorded, algorithm, settings, cache, what, own=(), task=None, home=None):
    """Compare an input target with its ``recorded`` entry: (reason or None, refreshed entry)."""
    if isinstance(target, luigi.LocalTarget):
        path = _norm(target.path)
        change, current = _compare_entry(_LOCAL, path, recorded, algorithm, settings.trust_mtime, cache, _excluded(path, own) if own else (), home)
    elif (found := _storage_of(target, task)) is not None:
        change, current = _compare_entry(found[0], found[1], recorded, algorithm, settings.trust_mtime, cache, (), home)
    else:
        current = _entry(target, algorithm, recorded, settings, cache)
        change = "missing" if current is None else "changed" if current["digest"] != recorded["digest"] else None
    if change:
        return _change_reason(change, what, recorded, current), None
    return None, _stat_refreshed(recorded, current)


# The walk.

# verdicts: task_id -> final _Verdict; children: task_id -> the tasks it was walked into;
# order: the tasks judged, dependencies first; upstream: task_id -> the task_id of the
# dependency that alone makes it stale.
_Walk = collections.namedtuple("_Walk", "verdicts children order upstream")


def _walk(roots, memo, explore=False):
    """The one walk: a final verdict for every task reachable from ``roots``, each judged
    once, with an explicit stack, so a chain thousands of tasks deep needs no recursion.

    Without ``explore``, as a build asks: a task the memo knows is not judged again (but a
    remembered "incomplete" is, while tasks run), and the tasks below a stale one are left
    alone, as Luigi schedules those itself. With ``explore``, as explain and adopt ask,
    every task below is judged. Nothing is written.
    """
    settings = memo.settings
    cache: dict = {}  # one look at each file in this walk
    own, children, order, known = {}, {}, [], {}
    stack = [(root, False) for root in reversed(roots)]
    while stack:
        task, expanded = stack.pop()
        tid = task.task_id
        if expanded:
            order.append(task)
            continue
        if tid in own or tid in known:
            continue
        cached = memo.answers.get(tid)
        if not explore and (cached is True or (cached is False and not memo.running)):
            known[tid] = cached
            continue
        verdict = own[tid] = _judge(task, settings, cache)
        deps = list(verdict.deps) if verdict.ok or explore else []
        if explore and not verdict.ok and _checked(task):
            # The dynamic dependencies its records name: a build reaches them when run()
            # yields them again, and explain and adopt must see them first.
            ids = {dep.task_id for dep in deps}
            deps += [dep for dep in _recorded_dynamic_tasks(task) if dep.task_id not in ids]
        if not explore and verdict.ok and cached is False and verdict.made_ns >= memo.started_ns:
            # Luigi scheduled it in this build and its records were written since the build
            # started: it ran after Luigi saw its dependencies done, so its own records do.
            deps = []
        children[tid] = deps
        stack.append((task, True))
        stack.extend((dep, False) for dep in reversed(deps))
    bad = {tid for tid, verdict in own.items() if not verdict.ok} | {tid for tid, ok in known.items() if not ok}
    upstream = _settle({tid: [dep.task_id for dep in deps] for tid, deps in children.items()}, bad)
    verdicts = {}
    for tid, verdict in own.items():
        if tid in upstream:
            dep = next(d for d in children[tid] if d.task_id == upstream[tid])
            verdict = verdict._replace(ok=False, reason=_reason("upstream", task=dep))
        verdicts[tid] = verdict
    memo.answers.update((tid, verdict.ok) for tid, verdict in verdicts.items())
    return _Walk(verdicts, children, order, upstream)


def _is_complete(root, memo):
    """The build's question: whether ``root`` and everything below it is up to date. Saves
    the refreshed stat fields the walk found, and logs what users must hear once."""
    walk = _walk([root], memo)
    if memo.inspecting:
        return memo.answers[root.task_id]
    by_id = {task.task_id: task for task in walk.order}
    for tid, verdict in walk.verdicts.items():
        task = by_id[tid]
        if tid not in memo.verdicts:  # the first verdict is the scheduling-time one
            memo.verdicts[tid] = (task, verdict, walk.upstream.get(tid), [d.task_id for d in walk.children[tid]])
        if not verdict.ok:
            logger.debug("luigi_hashcheck: %s is stale: %s", task, verdict.reason)
        for record_path, fresh, old in verdict.refreshes:
            _save_refresh(record_path, fresh, old, memo.settings)
        if verdict.hint and ("norecord", tid) not in _logged:  # the message looks at the folder
            _log_once(key=("norecord", tid), level=logging.WARNING, message=_no_record_message(task, verdict.hint))
        if tid in walk.upstream and not _checked(task):
            _warn_hiding(task)
    return memo.answers[root.task_id]


# The summary after each build: what the walks found while Luigi scheduled, and what the
# records say now. It is made in the parent process, which sees neither the run-time checks
# nor the memos of forked workers, only the records they wrote: a record dated after the
# build started means its task ran, unless early cutoff confirmed it (``confirmed_ns``).
_SUMMARY_TASKS = 20  # tasks listed; the rest are counted


def _outcome(task, started_ns, done, failed=()):
    """What became of a task found stale while scheduling: ("ran", "cutoff" or "not run",
    and the reason its run-time check gave, as its record keeps it, or None).

    :param done: the task_ids Luigi's worker saw finish in this build, for a task whose
        outputs are all third-party targets and so have no record to read.
    :param failed: the task_ids Luigi's worker saw fail in this build.
    """
    if task.task_id in failed:
        return "failed", None
    dated = []
    for output in _outputs(task):
        if isinstance(output, luigi.LocalTarget):
            try:
                record = _read_record(_record_path(_norm(output.path)))
            except (_DamagedRecord, OSError):
                record = None
            if record is None or record["created_ns"] < started_ns:
                return "not run", None
            dated.append(record)
    if not dated:
        return "ran" if task.task_id in done else "not run", None
    if all(r.get("confirmed_ns") == r["created_ns"] for r in dated):
        return "cutoff", None
    reason = dated[0].get("reason")
    return "ran", reason if isinstance(reason, str) else None


def _summary(memo, done=(), failed=()):
    """The summary of one build, or None if it checked no HashCheckingTask."""
    checked = {tid: found for tid, found in memo.verdicts.items() if _checked(found[0])}
    if not checked:
        return None
    # Dependencies first, as the build ran them.
    order, placed = [], set()
    for start in reversed(list(memo.verdicts)):
        stack = [(start, False)]
        while stack:
            tid, expanded = stack.pop()
            if expanded:
                order.append(tid)
            elif tid not in placed and tid in memo.verdicts:
                placed.add(tid)
                stack.append((tid, True))
                stack.extend((dep, False) for dep in reversed(memo.verdicts[tid][3]))
    found = {tid: ("ok", None) if v[1].ok else _outcome(v[0], memo.started_ns, done, failed) for tid, v in checked.items()}
    outcomes = {tid: outcome for tid, (outcome, _reason_text) in found.items()}
    lines = []
    for wanted in ("ran", "cutoff", "failed", "not run"):
        for tid in (t for t in order if outcomes.get(t) == wanted):
            task, verdict, upstream, _deps = checked[tid]
            # Why it ran, as its run-time check found (a task below a rerun finds its input
            # changed); the scheduling-time verdict where no record kept that.
            reason = found[tid][1] or verdict.reason
            if not found[tid][1] and upstream is not None and outcomes.get(upstream) == "ran":
                reason = _reason("reran", task=memo.verdicts[upstream][0])
            if wanted == "cutoff":
                reason = _reason("cutoff")
            elif wanted in ("failed", "not run"):
                reason = _reason(wanted, reason=reason)
            lines.append(f"  {task}: {reason}")
    counts = collections.Counter(outcomes.values())
    head = f"luigi_hashcheck: {counts['ran']} ran, {counts['ok']} up to date, {counts['cutoff']} skipped by early cutoff"
    if counts["failed"]:
        head += f", {counts['failed']} failed"
    if counts["not run"]:
        head += f", {counts['not run']} did not run"
    if len(lines) > _SUMMARY_TASKS:
        lines[_SUMMARY_TASKS:] = [f"  ... and {len(lines) - _SUMMARY_TASKS} more"]
    return "\n".join([head, *lines])


def _log_summary(memo, worker):
    """Log the build's summary, unless ``[hashcheck] summary = false``."""
    if not memo.verdicts or memo.inspecting:
        return
    try:
        if not memo.settings.summary:
            return
        history = getattr(worker, "_add_task_history", ())
        done = {task.task_id for task, status, _runnable in history if status == luigi.worker.DONE}
        failed = {task.task_id for task, status, _runnable in history if status == luigi.worker.FAILED}
        text = _summary(memo, done, failed)
    except HashCheckError as exc:  # a bad configuration has failed the build already
        logger.warning("luigi_hashcheck: no summary: %s", exc)
        return
    if text:
        logger.info(text)


class _StorePath(str):
    """A record path on a store, carrying its storage through the verdict's refreshes."""

    def __new__(cls, path, fs):
        made = super().__new__(cls, path)
        made.fs = fs
        return made


def _save_refresh(record_path, fresh, old, settings):
    """Rewrite a record whose files were touched but not changed, unless another process
    has rewritten it since it was read."""
    try:
        _write_record(record_path, fresh, settings, replacing=old, fs=getattr(record_path, "fs", _LOCAL))
    except HashCheckError as exc:
        # Only a shortcut is lost: the next check hashes again.
        logger.warning("luigi_hashcheck: could not refresh %s: %s", record_path, exc)


def _warn_hiding(task):
    """Warn that ``task``, not a HashCheckingTask, hides a stale one below it."""
    _log_once(
        key=("hiding", task.task_id),
        level=logging.WARNING,
        message=f"luigi_hashcheck: {task} is not a HashCheckingTask and its outputs exist, so Luigi "
        "will not rebuild the stale tasks below it; make it a HashCheckingTask, or remove its outputs",
    )


def _no_record_message(task, path):
    """The warning for an output without a record. Plain Luigi may have built it, and then
    adopt keeps it; or a run() wrote it and then failed, and then adopt would record a
    partial output as good. A temporary file of an interrupted write beside it, Luigi's or
    ours, points to the second."""
    folder, name = os.path.split(path)
    text = f"luigi_hashcheck: {path} has no record, so {task} will run again and replace it. "
    luigi_tmp, ours = _interrupted_writes(folder)
    if name in luigi_tmp or _temporary_prefix(_record_name(name)) in ours:
        return text + "A temporary file of an interrupted write lies beside it: probably a run that failed left it."
    return text + (
        "Either it was built before luigi_hashcheck: to keep such outputs, run `python -m luigi_hashcheck adopt "
        f"--module {task.task_module} {task.task_family} ...` before building. Or a run that failed left it: then let it run again."
    )


def _interrupted_writes(folder):
    """The names in ``folder`` that Luigi's temporary files (``NAME-luigi-tmp-N``) lie beside,
    and how the names of our temporary files in its records folder begin. Listed once per
    folder and build: a build over outputs without records warns of each one."""
    build = _active_memo()
    found = build.leftovers.get(folder) if build is not None else None
    if found is None:
        found = (set(), set())
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            found[0].update(e.name.rpartition("-luigi-tmp-")[0] for e in entries if "-luigi-tmp-" in e.name)
        with contextlib.suppress(OSError), os.scandir(os.path.join(folder, RECORD_DIR)) as entries:
            # .<record>~<host>~<pid>~<random>.tmp, as _replace names them
            found[1].update(e.name[:-4].rsplit("~", 3)[0] + "~" for e in entries if e.name.endswith(".tmp") and e.name.count("~") >= 3)
        if build is not None:
            build.leftovers[folder] = found
    return found




###############################################################################
# The task ####################################################################
###############################################################################


class _Run:
    """What a task's run() carries from its start to its end."""

    def __init__(self, settings, inputs, entries, reason=None):
        self.settings = settings
        self.inputs = inputs
        self.entries = entries
        self.reason = reason  # why it runs, from the run-time check
        self.dynamic = []  # (task, outputs, entries) of each dynamic dependency handed back
        self.aside = []  # paths of the outputs set aside, whose .stale-lock this run holds
        self.watch = _Watch() if settings.audit_reads else None  # the files run() opens


# A rerun sets its stale local outputs aside instead of deleting them: each output and its
# record are renamed into the .luigi_hashes/ folder beside it, as <record>.stale-output and
# <record>.stale-record (<record> the record's name without .json), so nothing is copied and
# temporary_path() still finds the path free (luigi issue #2997). Every end of the rerun
# settles them (_put_back): an output that got a new record keeps it and its copy goes; any
# other is put back with its old record, so it stays stale for its real reason. A killed
# rerun cannot put anything back, so the rerun holds <record>.stale-lock until it is settled,
# and only a build's check that can take that lock puts the copies back (_restored).
_STALE_OUTPUT, _STALE_RECORD, _STALE_LOCK = ".stale-output", ".stale-record", ".stale-lock"


def _stale_paths(path):
    """The set-aside copy of the output at ``path``, that of its record, and their lock file."""
    base = _record_path(path)[: -len(".json")]
    return base + _STALE_OUTPUT, base + _STALE_RECORD, base + _STALE_LOCK


def _take_stale_lock(lock):
    """Take the lock file ``lock`` without waiting; False when a rerun, in this process or
    another, holds it. The file is never deleted: that would split its takers across inodes."""
    with _stale_guard:
        if lock in _stale_held:
            return False
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _BINARY, 0o644)
        try:
            got = _try_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if not got:
            os.close(fd)
            return False
        _stale_held[lock] = fd
        return True


def _release_stale_lock(lock):
    with _stale_guard:
        fd = _stale_held.pop(lock, None)
    if fd is not None:
        _unlock(fd)
        os.close(fd)


def _discard(path):
    """Remove a file or a folder (not what a link points to), if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _set_aside(task, paths, settings):
    """Before a rerun, set the stale outputs at ``paths`` aside with their records, holding
    each one's lock; return the paths set aside. If anything fails, what was moved is put
    back and the task fails before run(), so nothing is lost."""
    held = _abandoned.pop(task.task_id, [])  # its abandoned generator run() set these aside
    taken = list(held)
    try:
        for path in paths:
            if path in held:
                _discard(path)  # what the abandoned run left
                continue
            record_path = _record_path(path)
            copy, record_copy, lock = _stale_paths(path)
            has_record, has_copy = os.path.lexists(record_path), os.path.lexists(copy) or os.path.lexists(record_copy)
            if not (has_record or has_copy or os.path.lexists(path)):
                continue  # nothing to keep: a first build takes no lock
            folder = _records_folder(os.path.dirname(path))
            if not _take_stale_lock(lock):
                raise HashCheckError(f"another run of {task} holds {lock}; it is being rerun elsewhere, so this run was not started")
            taken.append(path)
            if has_copy and not has_record:
                # A copy an earlier try set aside is kept as it is; what lies at the path
                # now, that try left.
                logger.info("luigi_hashcheck: keeping the copy of %s an earlier run of %s set aside", path, task)
                _discard(path)
                continue
            if has_copy:
                # A record is newer than the copy: a try that recorded its outputs was
                # killed before it removed the copy.
                _discard(copy)
                _discard(record_copy)
            logger.info("luigi_hashcheck: setting the stale output %s of %s aside before it reruns", path, task)
            if has_record:
                with _locked(folder, settings.lock_timeout):
                    os.replace(record_path, record_copy)
            if os.path.lexists(path):
                os.replace(path, copy)
    except BaseException as exc:
        _put_back(task, taken, settings)
        if isinstance(exc, OSError):
            raise HashCheckError(f"could not set the stale outputs of {task} aside ({exc}); nothing was changed, and it did not run") from exc
        raise
    return taken


def _put_back(task, paths, settings):
    """Settle the outputs a rerun set aside, and release their locks: an output that got a
    new record keeps it and its copy goes; any other is put back with its record, replacing
    whatever the run left at its path. Return the paths put back."""
    restored = []
    for path in paths:
        record_path = _record_path(path)
        copy, record_copy, lock = _stale_paths(path)
        try:
            if os.path.lexists(record_path):  # its old record was set aside: this one is new
                _discard(copy)
                _discard(record_copy)
                continue
            if os.path.lexists(copy):
                if os.path.lexists(path) and not (os.path.isfile(copy) and os.path.isfile(path) and not os.path.islink(path)):
                    # os.replace overwrites a file with a file, but not a non-empty folder.
                    _discard(path)
                os.replace(copy, path)
                restored.append(path)
            if os.path.lexists(record_copy):
                with _locked(os.path.dirname(record_path), settings.lock_timeout):
                    os.replace(record_copy, record_path)
                if path not in restored:
                    restored.append(path)
        except OSError as exc:
            # The copy stays where it is, and the next build's check puts it back.
            logger.error("luigi_hashcheck: could not put %s of %s back from %s: %s", path, task, copy, exc)
        finally:
            _release_stale_lock(lock)
    return restored


def _end_rerun(task, state):
    """Settle what ``task``'s rerun set aside, at whichever end it came to."""
    restored = _put_back(task, state.aside, state.settings)
    state.aside = []
    if restored:
        logger.warning(
            "luigi_hashcheck: %s ended without new records; its last outputs were restored with their records: %s. "
            "It is still stale, and runs again next build",
            task,
            ", ".join(restored),
        )


def _settle_set_aside(memo):
    """At the end of a build, put back what its reruns left set aside: the outputs of a
    generator run() Luigi abandoned here for dynamic dependencies that then failed, and those
    of a rerun in a forked child that ended without records. Only copies whose lock this
    process can take go back; a rerun still running elsewhere keeps its own."""
    if memo.inspecting:
        return
    try:
        settings = memo.settings
    except HashCheckError:
        return  # a bad configuration has failed the build already
    for task_id in [tid for tid in _abandoned if tid in memo.verdicts]:
        task = memo.verdicts[task_id][0]
        restored = _put_back(task, _abandoned.pop(task_id), settings)
        if restored:
            logger.warning(
                "luigi_hashcheck: the build ended before %s ran again, so its last outputs were restored with their records: %s. "
                "It is still stale, and runs again next build",
                task,
                ", ".join(restored),
            )
    for task, verdict, _upstream, _deps in list(memo.verdicts.values()):
        if not verdict.ok and _checked(task) and settings.keep_stale:
            _restored(task, settings, why="did not finish")


def _restored(task, settings, why="was killed"):
    """For a check that found an output of ``task`` without its record: put back the outputs
    a killed rerun set aside, if this check can take their locks. Return "restored", "aside"
    (copies a live rerun holds, or that an inspection only reports) or None (no copies)."""
    found = "none"
    build = _active_memo()
    for output in _outputs(task):
        if not isinstance(output, luigi.LocalTarget):
            continue
        path = _norm(output.path)
        copy, record_copy, lock = _stale_paths(path)
        if not (os.path.lexists(copy) or os.path.lexists(record_copy)):
            continue
        if (build is not None and build.inspecting) or not _take_stale_lock(lock):
            found = "aside"
            continue
        if _put_back(task, [path], settings):
            found = "restored" if found == "none" else found
            logger.warning(
                "luigi_hashcheck: restored %s of %s from %s, set aside by a rerun that %s; "
                "it is still stale, and runs again",
                path,
                task,
                copy,
                why,
            )
    return None if found == "none" else found


# Undeclared reads. While a run() runs, Python's audit hook (PEP 578) reports the files it
# opens; at its end, when dynamic dependencies count as declared, a read that looks like data
# but is no declared input gets a warning. Imports raise the same event (io.open_code), hence
# the filters. The hook stays for the life of the process, so when no run() is active it
# costs one global lookup and one comparison per audit event.
_NEVER_READ_EXTENSIONS = (".so", ".pth")
_NEVER_READ_FOLDERS = ("/dev", "/proc", "/sys", "/etc", "/usr")


class _Watch:
    """The files one run() opened: (path, mode, flags) as the ``open`` audit event gives them."""

    def __init__(self):
        self.thread = threading.get_ident()  # Luigi's keep-alive thread is another
        self.started_ns = time.time_ns()
        self.opened = []
        self.shared = False  # another run() was active meanwhile, so no read can be told apart


def _audit(event, args):
    watch = _watch
    if watch is None or event != "open" or threading.get_ident() != watch.thread:
        return
    watch.opened.append(args)


@contextlib.contextmanager
def _watching_reads(watch):
    """Feed ``watch`` for the length of the block, if it is the only run() active."""
    global _watch, _hooked
    if watch is None:
        yield
        return
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    _watching.append(watch)
    if len(_watching) > 1:
        for each in _watching:
            each.shared = True
    _watch = _watching[0] if len(_watching) == 1 else None
    try:
        yield
    finally:
        _watching.remove(watch)
        _watch = _watching[0] if len(_watching) == 1 else None


def _extra_inputs(task):
    """The targets of ``task.extra_inputs()``: files its run() reads that no task makes."""
    extra = getattr(task, "extra_inputs", None)
    if not callable(extra):
        return []
    return [t if isinstance(t, luigi.Target) else luigi.LocalTarget(os.fspath(t)) for t in flatten(extra())]


def _undeclared_reads(task, state):
    """The files ``task``'s run() read, as its watch saw them, that look like data it does not
    declare: regular files under the current folder or a declared input's or output's folder,
    there before run() began and not opened for writing by it."""
    watch = state.watch
    if watch is None or watch.shared:
        return []
    declared = [_norm(t.path) for t in state.inputs if isinstance(t, luigi.LocalTarget)]
    declared += [_norm(t.path) for _dep, targets, _e in state.dynamic for t in targets if isinstance(t, luigi.LocalTarget)]
    own = list(_own_paths(task))
    folders = {_norm(os.getcwd())} | {os.path.dirname(p) for p in declared + own}
    never = {_norm(p) for p in (sys.prefix, sys.base_prefix, tempfile.gettempdir(), *_NEVER_READ_FOLDERS)}
    config = {_norm(p) for p in getattr(luigi.configuration.LuigiConfigParser, "_config_paths", ())}
    if os.environ.get("LUIGI_CONFIG_PATH"):
        config.add(_norm(os.environ["LUIGI_CONFIG_PATH"]))
    written, read = set(), []
    for path, mode, flags in watch.opened:
        if isinstance(path, int):
            continue
        try:
            path = _norm(os.fsdecode(path))
        except (TypeError, ValueError):
            continue
        writes = isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
        if writes or (isinstance(mode, str) and any(c in mode for c in "wax+")):
            written.add(path)
        else:
            read.append(path)
    found = []
    for path in dict.fromkeys(read):
        name = os.path.basename(path)
        parts = path.split("/")
        if (
            path in written
            or path in config
            or "-luigi-tmp-" in name
            or RECORD_DIR in parts  # our own records
            or os.path.splitext(name)[1].startswith(".py")
            or name.endswith(_NEVER_READ_EXTENSIONS)
            or "site-packages" in parts
            or "dist-packages" in parts
            or any(_within(path, folder) for folder in never)
            or not any(_within(path, folder) for folder in folders)
            or any(_within(path, known) for known in declared + own)
        ):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mtime_ns < watch.started_ns:
            found.append(path)
    return found


def _warn_undeclared(task, state):
    for path in _undeclared_reads(task, state):
        _log_once(
            key=("undeclared", task.task_id, path),
            level=logging.WARNING,
            message=f"luigi_hashcheck: {task} read {path}, which it does not declare, so editing it reruns nothing; "
            "declare it in requires(), or list it in extra_inputs()",
        )


def _before_run(task):
    """Skip run() if the task is now up to date; otherwise clear its stale outputs and
    snapshot its inputs. Return the snapshot, or None to skip."""
    memo = _memo()
    settings = memo.settings
    verdict = _judge(task, settings, _absent_outputs(task, memo))
    pending = next((dep for dep in verdict.deps if not _is_complete(dep, memo)), None) if verdict.ok else None
    if verdict.ok and pending is None:
        # Its upstream reran and made byte-identical outputs ("early cutoff").
        logger.info("luigi_hashcheck: %s is up to date, its inputs did not change; skipping run()", task)
        _tell(task, f"luigi_hashcheck: run() {_reason('cutoff')} (its upstream reran and made the same outputs)")
        memo.answers[task.task_id] = True
        for record_path, fresh, old in verdict.refreshes:
            _save_refresh(record_path, fresh, old, settings)
        _confirm(task, settings)
        return None
    inputs = verdict.inputs if verdict.inputs is not None else _deps_and_inputs(task)[1]
    cache: dict = {}
    entries = []
    own = _own_paths(task)
    for index, target in enumerate(inputs):
        entry = _entry(target, settings.algorithm, None, settings, cache, rechecked=True, own=own, task=task)
        if entry is None:
            raise HashCheckError(f"input {_name(target, None, index)} of {task} does not exist")
        entries.append(entry)
    outputs = _outputs(task)
    _refuse_nesting(task, outputs, inputs)
    state = _Run(settings, inputs, entries)
    # temporary_path() refuses to replace an existing output (luigi issue #2997).
    if settings.keep_stale:
        state.aside = _set_aside(task, [_norm(o.path) for o in outputs if isinstance(o, luigi.LocalTarget)], settings)
    for output in outputs:
        if isinstance(output, luigi.LocalTarget):
            if settings.keep_stale:
                continue
            path = _norm(output.path)
            if os.path.lexists(path):
                logger.info("luigi_hashcheck: removing stale output %s of %s before it reruns", path, task)
                _LOCAL.remove_output(path)
            _remove_record(_record_path(path), settings)
        elif (found := _storage_of(output, task)) is not None:
            _clear_stale(task, *found, memo, settings)
        elif output.exists() and callable(getattr(output, "remove", None)):
            # A store where a move is a copy (S3, GCS) keeps the delete.
            output.remove()
    # A task downstream of a rerun finds its input changed here, and says so.
    reason = verdict.reason or _reason("upstream", task=pending)
    _tell(task, f"luigi_hashcheck: running because {reason}")
    state.reason = reason
    return state


def _tell(task, text):
    """Show ``text`` as the task's status message in luigid's visualiser, which inserts it
    as HTML. Luigi sets ``set_status_message`` only while a worker runs the task; a
    user's own call in run() comes later and replaces ours."""
    callback = getattr(task, "set_status_message", None)
    if not callable(callback):
        return
    try:
        callback(html.escape(text))
    except Exception as exc:  # noqa: BLE001 - a message lost must not fail the task
        logger.warning("luigi_hashcheck: could not set the status message of %s: %s", task, exc)


def _clear_stale(task, fs, path, memo, settings):
    """Remove a stale store output and its record before its task reruns; nothing to do for
    one this build found absent, which costs no request."""
    if fs.key(path) in memo.absent:
        return
    try:
        fs.stat(path)
    except FileNotFoundError:
        pass
    else:
        logger.info("luigi_hashcheck: removing stale output %s of %s before it reruns", path, task)
        fs.remove_output(path)
    fs.remove_record(_record_path(path, fs), settings.lock_timeout)


def _refuse_nesting(task, outputs, inputs):
    """Make sure ``task``'s folder outputs hold nothing of others: no input of the task, and no
    record of another output. Checked before a rerun clears them, and again before their
    records are written.

    A record of ``task`` itself (same family and parameters) for a path that is no longer
    one of its outputs is its own stale record, left from before its file output became
    this folder: it goes with the folder's other stale contents.
    """
    own = _own_paths(task)
    for output in outputs:
        path = _norm(output.path) if isinstance(output, luigi.LocalTarget) else None
        if path is None or not os.path.isdir(path) or os.path.islink(path):
            continue
        inside = [t.path for t in inputs if isinstance(t, luigi.LocalTarget) and _norm(t.path).startswith(path + os.sep)]
        if inside:
            raise HashCheckError(
                f"{inside[0]} lies inside {path}, the folder output of {task}; "
                "a folder output may not hold an input of its own task"
            )
        for folder, dirs, _files in os.walk(path):
            if RECORD_DIR in dirs:
                _refuse_records(task, path, os.path.join(folder, RECORD_DIR), own)


def _refuse_records(task, path, records, own):
    """Refuse the records folder ``records`` inside ``task``'s folder output ``path`` unless
    each record in it is a stale one of ``task``: see _refuse_nesting."""
    if os.path.islink(records) or not os.path.isdir(records):
        raise HashCheckError(f"{records} lies inside {path}, the folder output of {task}; an output may not lie inside a folder output")
    for name in sorted(os.listdir(records)):
        if not name.endswith(".json"):  # a .lock, or a temporary file, goes with the folder
            continue
        record_path = os.path.join(records, name)
        try:
            record = _read_record(record_path)
        except _DamagedRecord:
            record = None  # whose it is cannot be told: another task's, as far as we know
        inner = _output_of(record_path)
        if record and (record["task"]["family"], record["task"]["params"]) == (task.task_family, _params(task)):
            if inner not in own:
                continue
            raise HashCheckError(
                f"{inner} lies inside {path}, both outputs of the same task {task}; "
                "an output may not lie inside a folder output, not even one of its own task"
            )
        owner = f"the output of {_task_named(record)}" if record else "an output"
        raise HashCheckError(
            f"{inner}, {owner} recorded in {record_path}, lies inside {path}, the folder output of {task}; "
            "an output may not lie inside another task's folder output. If it is no longer an output, "
            f"`python -m luigi_hashcheck forget {shlex.quote(inner)}` removes its record"
        )


def _task_named(record):
    """The task of ``record``, as Luigi shows a task: ``Family(key=value, ...)``."""
    family, params = record["task"]["family"], record["task"]["params"]
    return f"{family}({', '.join(f'{key}={value}' for key, value in params.items())})"


def _confirm(task, settings):
    """Date the records of a task found up to date at run time, as if just written.

    Forked workers do not share their memos; a fresh ``created_ns`` lets their checks
    take the records on trust (see _walk) instead of walking everything below.
    """
    for output in _outputs(task):
        if (found := _storage_of(output, task)) is not None:
            fs = found[0]
            record_path = _record_path(found[1], fs)
            try:
                record = _read_record(record_path, fs)
                if record:
                    now = time.time_ns()
                    # confirmed_ns equal to created_ns tells the build's summary, in the
                    # parent, that early cutoff dated this record rather than a run.
                    _write_record(record_path, {**_remade(record, created_ns=now), "confirmed_ns": now}, settings, replacing=record, fs=fs)
            except (_DamagedRecord, HashCheckError) as exc:
                logger.warning("luigi_hashcheck: could not confirm %s: %s", record_path, exc)


def _snapshot_dynamic(task, requirement, state):
    """Digest the outputs of the dynamic dependencies Luigi has just found complete."""
    if isinstance(requirement, _DYNAMIC_REQUIREMENTS):
        deps = requirement.flat_requirements
    else:
        deps = flatten(requirement)
    cache = {}
    own = _own_paths(task)
    for dep in deps:
        targets = flatten(dep.output())
        _require_hashable(dep, targets)
        _require_hashable(task, (), targets)
        entries = [_entry(t, state.settings.algorithm, None, state.settings, cache, rechecked=True, own=own, task=task) for t in targets]
        state.dynamic.append((dep, targets, entries))


def _validator(task):
    """The task's own ``validate()`` to call, or None for the empty default. A ``validate``
    that is a Parameter, or that needs arguments, gets a warning (once per class) and is
    not called: it cannot be the hook."""
    cls = type(task)
    found = inspect.getattr_static(cls, "validate", None)
    if found is HashCheckingTask.__dict__["validate"]:
        return None
    hook = getattr(task, "validate", None)
    problem = None
    if isinstance(found, luigi.Parameter):
        problem = "is a Parameter"
    elif not callable(hook):
        problem = "is not callable"
    else:
        try:
            inspect.signature(hook).bind()
        except TypeError:
            problem = "needs arguments"
        except ValueError:
            pass  # no signature to read (a builtin): call it
    if problem:
        _log_once(
            key=("validate", cls),
            level=logging.WARNING,
            message=f"luigi_hashcheck: {cls.__name__}.validate {problem}, so it is not called; "
            "the hook is a method taking no arguments",
        )
        return None
    return hook


def _validate(task):
    """Call ``task``'s validate() hook; raise ValidationError if it raises or returns False."""
    hook = _validator(task)
    if hook is None:
        return
    try:
        result = hook()
    except Exception as exc:  # whatever it raises, the outputs are refused
        raise ValidationError(task, str(exc) or type(exc).__name__) from exc
    if result is False:
        raise ValidationError(task, "it returned False")


def _after_run(task, state):
    """Validate the outputs, check the inputs did not change during run(), then write the
    records."""
    _validate(task)
    settings = state.settings
    algorithm = settings.algorithm
    _warn_undeclared(task, state)
    cache = {}
    read = list(zip(state.inputs, state.entries))
    read += [pair for _dep, targets, entries in state.dynamic for pair in zip(targets, entries)]
    own = _own_paths(task)
    for path in own:
        # Before the inputs: an output written into another task's folder output, which
        # this task reads, would otherwise be blamed on that input as an edit during run().
        _check_not_nested(path, task, settings)
    after = []
    for index, (target, before) in enumerate(read):
        entry = _entry(target, algorithm, before, settings, cache, own=own, task=task)
        if before is None or entry is None or entry["digest"] != before["digest"]:
            raise InputChangedError(task, _name(target, None, index))
        after.append(entry)
    # The later entries: the older a file was when hashed, the likelier its stat lets the
    # next check skip hashing it.
    rest = iter(after[len(state.inputs):])
    dynamic = [(dep, targets, [next(rest) for _ in targets]) for dep, targets, _entries in state.dynamic]
    written = _write_records(task, settings, state.inputs, after[: len(state.inputs)], dynamic, state.reason)
    if (build := _active_memo()) is not None and build.absent:
        build.absent.difference_update(found[0].key(found[1]) for t in _outputs(task) if (found := _storage_of(t, task)))
    # Complete only with a record for every output: check_complete_on_run must see a
    # missing output as plain Luigi would.
    if len(written) == len(_outputs(task)):
        _memo().answers[task.task_id] = True


def _write_records(task, settings, inputs, entries, dynamic, reason=None):
    """Write the records of ``task``'s existing outputs; return the paths of those written.

    :param inputs: the input targets, in ``flatten(task.input())`` order.
    :param entries: their entries, as digested before the task ran.
    :param dynamic: (task, output targets, entries) of each dynamic dependency.
    :param reason: why it ran, kept in the record for the build's summary.
    """
    algorithm = settings.algorithm
    family = task.task_family
    params = _params(task)
    code = _fingerprint(type(task))
    outputs = _outputs(task)
    _require_hashable(task, outputs)
    _refuse_nesting(task, outputs, inputs)
    recorded = _recorded_paths(task)
    written = []
    for output in outputs:
        found = _storage_of(output, task)
        if found is None:
            if not output.exists():
                logger.warning("luigi_hashcheck: %s finished without writing its output %s; no input hash stored", task, output)
                continue
            pairs = [[_name(t, None, i), e["digest"]] for i, (t, e) in enumerate(zip(inputs, entries))]
            output.store_input_hash(_input_hash(algorithm, family, params, code, pairs))
            written.append(_name(output, None, 0))
            continue
        fs, path = found
        if fs is _LOCAL:
            if not os.path.exists(path):
                logger.warning("luigi_hashcheck: %s finished without writing its output %s; no record written", task, path)
                continue
            _check_not_nested(path, task, settings)
            folder = os.path.dirname(path)
            root = _project_root(folder, settings)
            output_entry = _named(_digest(path, algorithm, trust_mtime=settings.trust_mtime), os.path.basename(path))
        else:
            try:
                output_entry = _named(_digest_written(fs, path, algorithm, settings.trust_mtime), posixpath.basename(path))
            except FileNotFoundError:
                logger.warning("luigi_hashcheck: %s finished without writing its output %s; no record written", task, path)
                continue
            if output_entry["kind"] == "dir" and not output.exists():
                # MockTarget's exists(), and Azure's, are true only for an object: Luigi would
                # call this folder missing, and run its task at every build, record or not.
                raise UnhashableTargetError(task, output, missing=f"{path} is a folder, and this target's exists() is false for a folder, so Luigi "
                                            "would run the task again at every build; give each file its own target, or make the folder a LocalTarget or an S3Target")
            folder, root = posixpath.dirname(path), None
        named_inputs = [_named(e, _name(t, folder, i, root, fs), _path_of(t) in recorded) for i, (t, e) in enumerate(zip(inputs, entries))]
        named_dynamic = [
            _dynamic_dependency(dep, [_named(e, _name(t, folder, i, root, fs), _checked(dep) and _path_of(t) is not None) for i, (t, e) in enumerate(zip(targets, dep_entries))])
            for dep, targets, dep_entries in dynamic
        ]
        record = _make_record(algorithm, family, params, code, output_entry, named_inputs, named_dynamic, reason=reason)
        _write_record(_record_path(path, fs), record, settings, fs=fs)
        written.append(path)
        if output_entry["kind"] == "dir" and (build := _active_memo()) is not None:
            build.unnested.clear()  # an output found outside folder outputs may now be inside one
    return written


def _dynamic_dependency(dep, outputs):
    """How a record names a dynamic dependency: enough to make the task again.

    Its parameters are all but private ones, which may be secrets. Those whose value is what
    Luigi would give without them (the default, or luigi.cfg's ``[Family] name``) are listed
    in ``defaulted`` and left to Luigi when the task is made again, so that a change to
    luigi.cfg reaches the task as it would reach the run() that yields it.
    """
    params = dep.to_str_params()
    family = dep.task_family
    defaulted = [
        name
        for name, param in dep.get_params()
        if name in params and param.has_task_value(family, name) and param.serialize(param.task_value(family, name)) == params[name]
    ]
    found = {"family": family, "params": params, "outputs": outputs}
    if defaulted:
        found["defaulted"] = defaulted
    return found


def _check_not_nested(path, task=None, settings=None):
    """Refuse an output that lies inside another task's directory output.

    A directory record of ``task`` itself (same family and parameters) for a folder that is
    no longer one of its outputs is its own stale record, left from before its folder
    output became a file inside that folder: with ``settings``, that record is removed.
    """
    # Once per folder and build: _record forgets these folders whenever it writes the
    # record of a folder output.
    build = _active_memo()
    if build is not None and os.path.dirname(path) in build.unnested:
        return
    inner = path
    parent = os.path.dirname(inner)
    while parent != inner:
        record = _folder_record(inner) if inner != path else None
        if record:
            family, params = record["task"]["family"], record["task"]["params"]
            record_path = _record_path(inner)
            same = task is not None and (family, params) == (task.task_family, _params(task))
            its_own = same and inner not in _own_paths(task)
            if same and not its_own:
                raise HashCheckError(
                    f"{path} lies inside {inner}, both outputs of the same task {task}; "
                    "an output may not lie inside a directory output, not even one of its own task"
                )
            if not (its_own and settings):
                named = _task_named(record)
                raise HashCheckError(
                    f"{path} lies inside {inner}, the directory output of {named} recorded in {record_path}; "
                    "an output may not lie inside another task's directory output. If that folder is no "
                    f"longer an output, `python -m luigi_hashcheck forget {shlex.quote(inner)}` removes its record"
                )
            logger.info("luigi_hashcheck: removing %s, the record of %s's old folder output %s, which now holds its output %s", record_path, task, inner, path)
            _remove_record(record_path, settings)
        inner, parent = parent, os.path.dirname(parent)
    if build is not None:
        build.unnested.add(os.path.dirname(path))


def _drive(task, generator, state):
    """Run a generator run() to its end, noting each dynamic dependency Luigi hands back.

    If Luigi abandons the generator to schedule new dependencies, GeneratorExit ends
    this one at its ``yield`` and nothing is recorded.
    """
    reply = None
    try:
        while True:
            _running.add(id(task))
            try:
                with _watching_reads(state.watch):
                    requirement = _listed(generator.send(reply))
            except StopIteration:
                break
            finally:
                _running.discard(id(task))
            reply = yield requirement
            # Luigi sends the paths back only once these dependencies are complete.
            _snapshot_dynamic(task, requirement, state)
        _after_run(task, state)
    except GeneratorExit:
        # Abandoned for new dynamic dependencies: the outputs stay aside, locked, until the
        # task runs again in this process. A forked worker never runs it again, and Luigi
        # may start the rerun in another child before this one has exited, so its locks go
        # now, not with the process; the copies stay aside for the rerun's check to put back.
        if isinstance(multiprocessing.current_process(), luigi.worker.TaskProcess):
            for path in state.aside:
                _release_stale_lock(_stale_paths(path)[2])
        else:
            _abandoned[task.task_id] = state.aside
        state.aside = []
        raise
    finally:
        _end_rerun(task, state)


def _reporter(task):
    """``task.set_progress_percentage`` while a worker runs it, else None: scheduling-time
    checks, and a run() called by hand, have nowhere to report to."""
    callback = getattr(task, "set_progress_percentage", None)
    if not callable(callback):
        return None

    def report(percent):
        try:
            callback(percent)
        except Exception as exc:  # noqa: BLE001 - progress lost must not fail the task
            logger.debug("luigi_hashcheck: could not report the progress of %s: %s", task, exc)

    return report


def _reporting(task, generator):
    """``generator``, each step of it with ``task``'s progress reporter active: a
    generator run() hashes its dynamic dependencies and writes its records inside it."""
    reply = None
    try:
        while True:
            progress = _reporting_to.set(_reporter(task))
            try:
                requirement = generator.send(reply)
            except StopIteration:
                return
            finally:
                _reporting_to.reset(progress)
            reply = yield requirement
    finally:
        generator.close()  # Luigi abandoned this one to schedule new dependencies


def _wrap_run(run):
    @functools.wraps(run)
    def wrapper(self):
        if id(self) in _running:  # an inner run() reached through super().run()
            return run(self)
        progress = _reporting_to.set(_reporter(self))
        try:
            state = _before_run(self)
        finally:
            _reporting_to.reset(progress)
        if state is None:
            return None
        driven = False
        try:
            _running.add(id(self))
            try:
                with _watching_reads(state.watch):
                    result = run(self)
            finally:
                _running.discard(id(self))
            if isinstance(result, collections.abc.Generator):
                driven = True  # _drive settles what was set aside
                return _reporting(self, _drive(self, result, state))
            progress = _reporting_to.set(_reporter(self))
            try:
                _after_run(self, state)
            finally:
                _reporting_to.reset(progress)
        finally:
            if not driven:
                _end_rerun(self, state)
        return result

    wrapper._hashcheck = True
    return wrapper


class HashCheckingTask(luigi.Task):
    """A task that is complete only when its outputs match its inputs, parameters and code.

    Each ``run()`` a subclass defines is wrapped: before it, the task is skipped if it is up
    to date after all, or its stale outputs are removed; after it, the records are written.
    """

    #: Change to force a rerun, for a change the fingerprint cannot see.
    code_version: object = None
    #: Functions, classes or modules whose source joins the code fingerprint.
    code_dependencies: "tuple[object, ...] | list[object]" = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Wrap the run() this class will use, its own or one from a mixin, unless a base
        # already wrapped it.
        run = cls.run
        if callable(run) and run is not luigi.Task.run and not getattr(run, "_hashcheck", False):
            cls.run = _wrap_run(run)
        _fingerprint(cls)
        # Not cls.batch_param_names(): ABCMeta has not finished making the class yet.
        params = (value for klass in cls.__mro__ for value in vars(klass).values())
        if any(isinstance(value, luigi.Parameter) and value._is_batchable() for value in params):
            _log_once(
                key=("batch", cls),
                level=logging.WARNING,
                message=f"luigi_hashcheck: {cls.__name__} has batch_method parameters, which luigi_hashcheck "
                "does not support: only the task a batch runs as gets records, so the others run again",
            )

    def complete(self) -> bool:
        """Whether the outputs exist and match their records, and every task this one
        depends on, recursively, is complete too."""
        if luigi.worker._is_external(self):  # data made outside Luigi: it has no record
            return super().complete()
        if isinstance(self, luigi.WrapperTask):  # mixed in: it has no outputs to record
            return luigi.WrapperTask.complete(self)
        return _is_complete(self, _memo())

    def extra_inputs(self):
        """Files ``run()`` reads that no task makes: paths or targets, hashed as inputs, so an
        edit to one reruns the task. None by default."""
        return []

    def deps(self) -> list:
        """As ``luigi.Task.deps()``; within one build, from the one call to ``requires()``
        made for the checks (Luigi asks again before ``run()``)."""
        if _active_memo() is None or type(self).deps is not HashCheckingTask.deps or id(self) in _finding:
            return super().deps()
        return list(_deps_and_inputs(self)[0])

    def input(self):
        """As ``luigi.Task.input()``; within one build, from the one call to ``requires()``
        made for the checks."""
        ours = _active_memo() is not None and type(self).input is HashCheckingTask.input and id(self) not in _finding
        paths = _deps_and_inputs(self)[2] if ours else None
        return super().input() if paths is None else paths()

    def validate(self) -> object:
        """Check the outputs once ``run()`` has ended (a generator ``run()`` once it is
        exhausted), before anything is recorded; ``adopt`` calls it too. Raise, or return
        exactly False, to fail the task with :class:`ValidationError` and record nothing.
        Empty by default. Its code is part of the class, so editing it reruns the task."""
        return None


# The proof of concept's names, so that its users can replace its file with this one.
TaskWithCheckingInputHash = HashCheckingTask


class HashableExternalFile(luigi.ExternalTask):
    """A file made outside Luigi, at ``fn``: the proof of concept's external input."""

    fn = luigi.Parameter()

    def output(self):
        return HashableLocalTarget(self.fn)


class WrapperTask(luigi.WrapperTask):
    """:class:`luigi.WrapperTask`, complete when each requirement's own ``complete()`` says
    so, walking chains of wrappers with a stack instead of recursion.

    A plain task below is judged by its own rule, never ours: a plain task whose output
    exists, over a stale :class:`HashCheckingTask`, is complete, as Luigi will not rerun it;
    judged stale, it would leave this wrapper never complete.
    """

    def complete(self) -> bool:
        seen = {self.task_id}
        stack: list = [self]
        while stack:
            for dep in flatten(stack.pop().requires()):
                if dep.task_id in seen:
                    continue
                seen.add(dep.task_id)
                if type(dep).complete in (WrapperTask.complete, luigi.WrapperTask.complete):
                    stack.append(dep)  # the same rule, one level down
                elif not dep.complete():
                    return False
        return True




###############################################################################
# Command line ################################################################
###############################################################################


_STATUSES = ("ok", "stale", "modified", "missing", "corrupt", "unrecorded")


class _UsageError(HashCheckError):
    """A bad command line or path: exit code 2."""


def _show(path):
    """A path as the user will read it: relative to the current folder when inside it."""
    if "://" in path:
        return path
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if relative.startswith("..") else relative


def _find_records(paths):
    """Return the record paths that ``paths`` name, in a stable order.

    A path with a record is that one output, even a directory output; any other folder is
    searched for ``.luigi_hashes`` folders. A ``.luigi_hashes`` that is a symbolic link is
    skipped: records are only ever read where they were written.
    """
    found = []
    for given in paths:
        if "://" in given:
            found.extend(_find_store_records(given))
            continue
        path = _norm(given)
        if os.path.lexists(_record_path(path)):
            found.append(_record_path(path))
        elif os.path.isdir(path):
            for folder, dirs, _files in os.walk(path):
                dirs.sort()
                if RECORD_DIR in dirs:
                    dirs.remove(RECORD_DIR)
                    records = os.path.join(folder, RECORD_DIR)
                    if os.path.islink(records):
                        print(f"luigi-hashcheck: skipping {_show(records)}: a symbolic link", file=sys.stderr)
                        continue
                    for name in sorted(os.listdir(records)):
                        if name.endswith(".json"):  # not .lock, nor a temporary .tmp
                            found.append(os.path.join(records, name))
        elif os.path.lexists(path):
            raise _UsageError(f"{given} has no record and is not a folder")
        else:
            raise _UsageError(f"{given}: no such file or folder")
    return list(dict.fromkeys(found))


def _find_copies(paths):
    """The outputs that ``paths`` name, or that lie in the folders they name, which a rerun
    set aside (see _set_aside): (output path, its copies), in a stable order."""
    found = {}

    def look(folder, name):
        for suffix in (_STALE_OUTPUT, _STALE_RECORD):
            if name.endswith(suffix):
                record_path = os.path.join(folder, name[: -len(suffix)] + ".json")
                with contextlib.suppress(ValueError):
                    found.setdefault(_output_of(record_path), []).append(os.path.join(folder, name))

    for given in paths:
        path = _norm(given)
        copy, record_copy, _lock = _stale_paths(path)
        if os.path.lexists(copy) or os.path.lexists(record_copy):
            found[path] = [c for c in (copy, record_copy) if os.path.lexists(c)]
        if os.path.isdir(path) and not os.path.islink(path):
            for folder, dirs, _files in os.walk(path):
                dirs.sort()
                if RECORD_DIR in dirs:
                    dirs.remove(RECORD_DIR)  # nor is a folder set aside searched
                    records = os.path.join(folder, RECORD_DIR)
                    if not os.path.islink(records):
                        for name in sorted(os.listdir(records)):
                            look(records, name)
    return [(output, sorted(set(copies))) for output, copies in found.items()]


# Stores named by URL on the command line, with clients made as Luigi makes them: S3Client()
# reads [s3] of luigi.cfg. Other schemes need --client-factory MODULE:FUNC, a function
# given the scheme that returns the Luigi client (GCSClient, ...) for it.
_S3_SCHEMES = ("s3", "s3a", "s3n")
_cli_stores: dict = {}  # scheme -> storage, for one command
_client_factory = None


def _located(path):
    """(storage, path) of a command-line path or a resolved input name: a URL names a store."""
    if "://" not in path:
        return _LOCAL, _norm(path)
    scheme = path.split("://", 1)[0].lower()
    if scheme not in _cli_stores:
        _cli_stores[scheme] = _cli_storage(scheme)
    return _cli_stores[scheme], path.rstrip("/")


def _cli_storage(scheme):
    if _client_factory is not None:
        client = _client_factory(scheme)
    elif scheme in _S3_SCHEMES:
        # Found, never imported by us: Luigi's client imports it when it needs it.
        if importlib.util.find_spec("boto3") is None:
            raise _UsageError(f"{scheme}:// URLs need boto3: pip install boto3")
        import luigi.contrib.s3

        client = luigi.contrib.s3.S3Client()
    elif scheme == "hdfs":
        if importlib.util.find_spec("hdfs") is None:  # WebHDFS's client library, which Luigi imports
            raise _UsageError("hdfs:// URLs need the hdfs package: pip install hdfs")
        import luigi.contrib.hdfs

        client = luigi.contrib.hdfs.get_autoconfig_client()  # [hdfs] client = webhdfs
    else:
        raise _UsageError(f"{scheme}:// URLs need --client-factory MODULE:FUNC, a function returning the Luigi client for a URL scheme")
    store = _client_storage(client)
    if store is None:
        raise _UsageError(f"{scheme}://: luigi_hashcheck cannot read a {type(client).__name__} from the command line")
    return store


def _load_factory(text):
    import importlib

    module, _sep, name = text.partition(":")
    if not module or not name:
        raise _UsageError(f"--client-factory {text}: MODULE:FUNC expected")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise _UsageError(f"--client-factory {text}: {exc}") from None


def _find_store_records(given):
    """The record paths a store URL names: its own record, or those below it."""
    fs, path = _located(given)
    own = _record_path(path, fs)
    if fs.read_record(own, _MAX_RECORD_BYTES) is not None:
        return [own]
    try:
        fs.stat(path)
    except FileNotFoundError:
        raise _UsageError(f"{given}: no such object or folder") from None
    prefix = path.rstrip("/") + "/"
    found = [full for full, _st in fs._list(prefix) if full.endswith(".json") and full.rsplit("/", 2)[-2:-1] == [RECORD_DIR]]
    if not found and fs._head(path) is not None:
        raise _UsageError(f"{given} has no record and is not a folder")
    return sorted(found)


def _input_path(folder, name, fs):
    """What an input's recorded ``name`` stands for, for an output in ``folder`` of ``fs``."""
    return os.path.join(folder, name) if fs is _LOCAL else _resolve(folder, name, fs)


class _Verification:
    """verify's view of the records: each one's status and reason, staleness propagated.

    It has no pipeline code, so it walks records, not tasks; it judges each entry with the
    build's own comparison (_compare_entry) and upstream staleness with its rule (_settle).
    """

    def __init__(self, trust_mtime, progress=None):
        self.trust_mtime = trust_mtime
        self.progress = progress
        self.results = {}  # record path -> (status, reason, record or None)
        self.unrecorded = {}  # record path -> output, for the outputs whose record is gone
        self.cache = {}  # one look at each file, as an output and as an input
        self.upstream = {}  # record path -> records of its inputs, once run() has walked them
        self.dynamic_edges = set()  # (record path, record of an input a dynamic dependency made)
        self.settled = {}  # record path -> the upstream record that alone makes it stale
        self.files = {}  # record path -> (count, first names) of the files changed in its folder

    def own(self, record_path):
        """Check one record against the files alone, not its upstream."""
        if record_path in self.results:
            return self.results[record_path]
        try:
            fs = _located(record_path)[0]
            record = _read_record(record_path, fs)
        except _DamagedRecord as exc:
            result = ("corrupt", _reason("record damaged", error=exc), None)
        except OSError as exc:
            result = ("corrupt", _reason("record unreadable", error=exc.strerror or exc), None)
        else:
            result = self._check(record_path, record) if record else ("corrupt", _reason("record vanished"), None)
        self.results[record_path] = result
        if self.progress:
            self.progress(len(self.results))
        return result

    def _check(self, record_path, record):
        output = _output_of(record_path)
        folder = os.path.dirname(output)
        fs = _located(output)[0]
        algorithm = record["algorithm"]
        home = (os.path.dirname if fs is _LOCAL else posixpath.dirname)(record_path)
        change, reason = self._compare(output, record["output"], algorithm, home, record_path, output=True)
        if change == "missing":
            return ("missing", _reason("output missing"), record)
        if change:
            return ("modified", reason, record)
        for entry in record["inputs"] + [e for dep in record["dynamic"] for e in dep["outputs"]]:
            change, reason = self._compare(_input_path(folder, entry["path"], fs), entry, algorithm, home, record_path)
            if change:
                return ("stale", reason, record)
        return ("ok", "", record)

    def _compare(self, path, entry, algorithm, home, record_path, output=False):
        """(change, reason) for the ``entry`` of ``path``, an input or the ``output``, by the
        build's comparison and with the build's texts."""
        if entry["kind"] == "custom":
            return None, None  # a third-party target: only the pipeline can hash it
        what = "output" if output else f"input {entry['path']}"
        try:
            change, current = _compare_entry(*_located(path), entry, algorithm, self.trust_mtime, self.cache, home=home)
            if change == "changed" and (files := _changed_files(entry, current)) is not None:
                self.files[record_path] = files
        except StoreError as exc:
            return "unreadable", f"cannot be read ({exc})"
        except HashCheckError:
            return "unhashable", _reason("unhashable", what=what)
        except (OSError, ValueError) as exc:
            return "unreadable", _reason("unreadable", what=what, error=getattr(exc, "strerror", None) or exc)
        if not change or (output and change == "missing"):
            return change, None
        if output:
            return change, _reason("output modified", digests=_digests(entry, current))
        return change, _change_reason(change, "input", entry, current)

    def run(self, record_paths):
        """Check ``record_paths`` and every record upstream of them; return their results,
        then those of the outputs upstream whose record is gone."""
        todo = list(record_paths)
        upstream = self.upstream
        seen = set(todo)
        while todo:
            record_path = todo.pop()
            _status, _reason_text, record = self.own(record_path)
            upstream[record_path] = []
            if record is None:
                continue
            output_fs, _output = _located(_output_of(record_path))
            folder = os.path.dirname(_output_of(record_path))
            dynamic = [e for dep in record["dynamic"] for e in dep["outputs"]]
            for entry in record["inputs"] + dynamic:
                try:
                    fs, path = _located(_input_path(folder, entry["path"], output_fs))
                    source = _record_path(path, fs)
                    exists = os.path.lexists(source) if fs is _LOCAL else fs._head(source) is not None
                except (ValueError, StoreError):
                    continue
                if any(entry is e for e in dynamic):
                    self.dynamic_edges.add((record_path, source))
                if exists:
                    upstream[record_path].append(source)
                    if source not in seen:
                        seen.add(source)
                        todo.append(source)
                elif entry.get("recorded") is True:
                    # A HashCheckingTask made this input, so a build would rerun it; raw data
                    # never has a record, and its entries never have the key.
                    upstream[record_path].append(source)
                    if source not in self.results:
                        output = path
                        reason = _reason("unrecorded", reader=_show(_output_of(record_path)))
                        self.results[source] = ("unrecorded", reason, None)
                        self.unrecorded[source] = output
        # A record whose input comes from a record that is not ok is stale, as a rebuild
        # would make it: the build's rule.
        bad = {p for p, (status, _, _) in self.results.items() if status != "ok"}
        stale = self.settled = _settle(upstream, bad)
        for record_path, source in stale.items():
            status = "stale" if source in stale else self.results[source][0]
            reason = _reason("record upstream", output=_show(self.output_of(source)), status=status)
            self.results[record_path] = ("stale", reason, self.results[record_path][2])
        # Records no PATH can name, so they are listed after the ones asked for.
        listed = dict.fromkeys([*record_paths, *self.unrecorded])
        return [(p, *self.results[p][:2]) for p in listed]

    def output_of(self, record_path):
        """The output of a record, or of a record that is gone."""
        return self.unrecorded.get(record_path) or _output_of(record_path)


def _progress(total):
    """A progress callback for stderr, shown only on a terminal and after a second."""
    if not sys.stderr.isatty():
        return None
    started = time.monotonic()
    last = [started]

    def report(done):
        now = time.monotonic()
        if now - started > 1 and now - last[0] > 0.2:
            last[0] = now
            print(f"\rchecked {done} records of {total}+", end="", file=sys.stderr, flush=True)

    return report


def _files_progress():
    """A progress callback(done, total, folder) for the files of large folders, on stderr:
    files checked, their rate and the time left; shown only on a terminal, after a second."""
    if not sys.stderr.isatty():
        return None
    started = {}
    last = [0.0]

    def report(done, total, folder):
        now = time.monotonic()
        began = started.setdefault(folder, now)
        if now - began > 1 and now - last[0] > 0.2:
            last[0] = now
            rate = done / (now - began)
            left = f", {(total - done) / rate:.0f} s left" if total and rate else ""
            print(f"\rchecked {done} files of {total} in {_show(folder)}, {rate:.0f} files/s{left}\033[K", end="", file=sys.stderr, flush=True)

    return report


# What verify, which has no pipeline code, cannot see: said once after its summary.
_VERIFY_NOTE = (
    "luigi-hashcheck: verify compares records with the files only; it cannot see code or parameter "
    "changes without the pipeline: `python -m luigi_hashcheck explain --module MODULE TASK` can"
)


def _cmd_verify(args):
    records = _find_records(args.paths or ["."])
    progress = None if args.quiet else _progress(len(records))
    trust_mtime = not args.no_trust_mtime and _settings().trust_mtime
    verification = _Verification(trust_mtime, progress)
    # verify writes nothing, and so keeps no new listing; a large folder shows its progress.
    kept = _keeping_listings.set(False)
    shown = _folder_progress.set(None if args.quiet else _files_progress())
    try:
        results = verification.run(records)
    finally:
        _keeping_listings.reset(kept)
        _folder_progress.reset(shown)
    if progress:
        print("\r\033[K", end="", file=sys.stderr)
    counts = collections.Counter(status for _, status, _ in results)
    if args.dot:
        print(_dot(*_record_graph(verification)), end="")
    elif args.json:
        def shown(record_path, status, reason):
            found = {"path": _show(verification.output_of(record_path)), "record": _show(record_path), "status": status, "reason": reason}
            if status != "ok" and record_path in verification.files:
                count, first = verification.files[record_path]
                found["files"] = {"changed": first[:_SHOWN_CHANGES], "count": count}
            return found

        document = {
            "outputs": [shown(*result) for result in results],
            "counts": {status: counts[status] for status in _STATUSES},
        }
        print(json.dumps(document, indent=1))
    else:
        for record_path, status, reason in results:
            if status != "ok":
                print(f"{status:<9} {_show(verification.output_of(record_path))}: {reason}")
        print(f"{len(results)} outputs: " + ", ".join(f"{counts[status]} {status}" for status in _STATUSES))
        if records:
            print(_VERIFY_NOTE, file=sys.stderr)
    copies = _find_copies(args.paths or ["."])
    for output, _copies in copies:
        # Only a build, which can tell a dead rerun from a live one by its lock, puts them back;
        # copies of an output that has a record again go when a record is next written beside.
        later = (
            "the next record written beside it removes them"
            if os.path.lexists(_record_path(output))
            else "the next build puts it back"
        )
        print(
            f"set aside {_show(output)}: by a rerun that was killed or is running, in {', '.join(_show(c) for c in _copies)}; "
            f"{later}, `forget` deletes it",
            file=sys.stderr if args.json else sys.stdout,
        )
    if copies and not records:
        return 1
    if not records:
        # A tree that plain Luigi built, or the wrong folder: nothing here vouches for anything.
        print(f"luigi-hashcheck: no records under {' '.join(args.paths or ['.'])}", file=sys.stderr)
        return 1
    return 0 if counts["ok"] == len(results) and not copies else 1


def _cmd_forget(args):
    settings = _settings()
    removed = 0
    failed = 0
    copies = _find_copies(args.paths)
    for output, found in copies:
        lock = _stale_paths(output)[2]
        if not _take_stale_lock(lock):
            print(f"cannot forget the copy of {_show(output)}: a rerun running now holds {_show(lock)}")
            failed += 1
            continue
        try:
            for copy in found:
                _discard(copy)
        finally:
            _release_stale_lock(lock)
        print(f"forgot the copy of {_show(output)} a rerun set aside")
    # An output whose only trace is its copy has nothing more to forget.
    aside = {output for output, _found in copies}
    paths = [p for p in args.paths if not (_norm(p) in aside and not os.path.lexists(_norm(p)))]
    for record_path in _find_records(paths):
        output = _show(_output_of(record_path))
        try:
            if _remove_record(record_path, settings, _located(record_path)[0]):
                removed += 1
                print(f"forgot {output}")
        except HashCheckError as exc:
            if os.path.islink(os.path.dirname(record_path)):
                raise
            print(f"cannot forget {output}: {exc}")
            failed += 1
    print(f"{removed} records removed; their tasks will run again")
    return 1 if failed else 0


def _cmd_accept(args):
    settings = _settings()
    failed = 0
    for record_path in _find_records(args.paths):
        output = _output_of(record_path)
        fs = _located(record_path)[0]
        try:
            record = _read_record(record_path, fs)
        except _DamagedRecord as exc:
            print(f"cannot accept {_show(output)}: record damaged: {exc}")
            failed += 1
            continue
        folder = os.path.dirname(output)
        algorithm = record["algorithm"]
        changes: list[str] = []
        accepted = functools.partial(_accepted, algorithm=algorithm, trust_mtime=settings.trust_mtime, cache={}, changes=changes)
        now = {}
        try:
            now["output"] = accepted(os.path.basename(output), output, record["output"])
            now["inputs"] = [accepted(e["path"], _input_path(folder, e["path"], fs), e) for e in record["inputs"]]
            now["dynamic"] = [
                dict(dep, outputs=[accepted(e["path"], _input_path(folder, e["path"], fs), e) for e in dep["outputs"]]) for dep in record["dynamic"]
            ]
        except (OSError, ValueError, HashCheckError) as exc:
            print(f"cannot accept {_show(output)}: {getattr(exc, 'strerror', None) or exc}")
            failed += 1
            continue
        _write_record(record_path, _remade(record, created_ns=time.time_ns(), **now), settings, fs=fs)
        print(f"accepted {_show(output)}: " + ("; ".join(changes) if changes else "no digest changed"))
    return 1 if failed else 0


def _accepted(name, path, entry, algorithm, trust_mtime, cache, changes):
    """The ``entry`` of ``path`` as found now, by the build's comparison, with the keys the
    record gave it; what changed is added to ``changes``."""
    if entry["kind"] == "custom":
        raise HashCheckError(f"{name} is a third-party target; only a build can hash it")
    change, found = _compare_entry(*_located(path), entry, algorithm, trust_mtime, cache)
    if change == "missing":
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    if change:
        changes.append(f"{name} {_digests(entry, found)}")
    if found["kind"] == "dir":  # a new scan's listing keys replace the old ones, all together
        entry = {k: v for k, v in entry.items() if k not in _LISTED_KEYS}
    return {**entry, **found, "path": entry["path"]}


@contextlib.contextmanager
def _luigi_task(luigi_args):
    """Build the task Luigi's own command line names: ``--module M TASK --param value``.

    Luigi applies the command line's config flags, ``--hashcheck-algorithm`` among them,
    only while its parser is active, so the command runs inside this block.
    """
    from luigi.cmdline_parser import CmdlineParser

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as the luigi command does, to find --module
    with contextlib.ExitStack() as stack:
        try:
            task = stack.enter_context(CmdlineParser.global_instance(luigi_args)).get_task_obj()
        except SystemExit as exc:
            raise _UsageError(f"cannot parse the task: {' '.join(luigi_args)}") from exc
        except (ImportError, ValueError, luigi.task_register.TaskClassException, luigi.parameter.ParameterException) as exc:
            raise _UsageError(f"cannot build the task: {exc}") from exc
        yield task


def _status(verdict):
    """How explain shows a verdict: ok, missing (external data) or will run."""
    if verdict.ok:
        return "ok"
    return "missing" if verdict.reason == _reason("external") else "will run"


def _cmd_explain(args):
    with _luigi_task(args.luigi_args) as root:
        return _explain(root, _settings(), "dot" if args.dot else "mermaid" if args.mermaid else None)


def _explain(root, settings, graph=None):
    """Print the tree below ``root`` with each task's verdict, from the build's own walk;
    or, with ``graph`` "dot" or "mermaid", the same verdicts as a picture."""
    kept = _keeping_listings.set(False)  # explain writes nothing
    try:
        with _inspection(settings) as memo:
            walk = _walk([root], memo, explore=True)
            if graph:
                # The recorded dynamic dependencies an up-to-date task was walked into, for
                # dashed edges: those beyond its static ones.
                dynamic = {}
                for task in walk.order:
                    if _checked(task) and walk.verdicts[task.task_id].ok:
                        static = {dep.task_id for dep in _deps_and_inputs(task)[0]}
                        dynamic[task.task_id] = {d.task_id for d in walk.children[task.task_id]} - static
    finally:
        _keeping_listings.reset(kept)
    if graph:
        nodes, edges = _task_graph(walk, dynamic)
        print((_dot if graph == "dot" else _mermaid)(nodes, edges), end="")
        return 0 if all(verdict.ok for verdict in walk.verdicts.values()) else 1
    printed = set()
    stack = [(root, 0)]
    while stack:
        task, depth = stack.pop()
        verdict = walk.verdicts[task.task_id]
        again = task.task_id in printed
        line = f"{'  ' * min(depth, 40)}{_status(verdict):<9} {task}"
        if again:
            line += " (see above)"
        elif verdict.reason:
            line += f": {verdict.reason}"
        print(line)
        if not again:
            printed.add(task.task_id)
            stack.extend((child, depth + 1) for child in reversed(walk.children[task.task_id]))
    counts = collections.Counter(_status(walk.verdicts[task.task_id]) for task in walk.order)
    print(f"{len(walk.verdicts)} tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0 if counts["ok"] == len(walk.verdicts) else 1


# Graphs, for explain --dot, explain --mermaid and verify --dot: one node per task or record,
# coloured by verdict, and one edge per dependency, from it to the task that needs it, as
# data flows; dynamic ones dashed. A node is (label lines, kind, family); kind is one of
# _GRAPH_KINDS.
_GRAPH_KINDS = {"ok": ("up to date", "#b8e186"), "run": ("will run", "#f4a582"), "upstream": ("will run because of upstream", "#fee08b"), "missing": ("external data missing", "#d9d9d9")}
_GRAPH_FOLD = 200  # past this many nodes, a family whose tasks are all up to date is one node


def _task_graph(walk, dynamic):
    """Nodes and edges of the tasks ``walk`` judged, dependencies first."""
    nodes, edges = {}, []
    for task in walk.order:
        tid = task.task_id
        verdict = walk.verdicts[tid]
        kind = "upstream" if tid in walk.upstream else {"ok": "ok", "missing": "missing"}.get(_status(verdict), "run")
        nodes[tid] = ([str(task)] + ([verdict.reason] if verdict.reason else []), kind, task.task_family)
        edges.extend((child.task_id, tid, child.task_id in dynamic.get(tid, ())) for child in walk.children[tid])
    return _fold(nodes, edges)


def _record_graph(verification):
    """Nodes and edges of the records ``verification`` checked, and of outputs whose record is gone."""
    nodes, edges = {}, []
    for record_path, (status, reason, record) in verification.results.items():
        kind = "ok" if status == "ok" else "upstream" if record_path in verification.settled else "run"
        label = [_show(verification.output_of(record_path))] + ([f"{status}: {reason}"] if status != "ok" else [])
        nodes[record_path] = (label, kind, record["task"]["family"] if record else None)
    for record_path, sources in verification.upstream.items():
        edges.extend((source, record_path, (record_path, source) in verification.dynamic_edges) for source in sources if source in nodes)
    return _fold(nodes, edges)


def _fold(nodes, edges):
    """Past _GRAPH_FOLD nodes, fold each family whose nodes are all up to date into one
    node with a count; edges between folded nodes become one, and none leads to itself."""
    if len(nodes) <= _GRAPH_FOLD:
        return nodes, list(dict.fromkeys(edges))
    families = collections.defaultdict(list)
    for key, (_label, _kind, family) in nodes.items():
        if family is not None:
            families[family].append(key)
    folded, into = {}, {}
    for key, node in nodes.items():
        members = families.get(node[2], ())
        if len(members) > 1 and all(nodes[m][1] == "ok" for m in members):
            into[key] = ("folded", node[2])
            folded[into[key]] = ([f"{node[2]} ({len(members)} tasks)"], "ok", node[2])
        else:
            folded[key] = node
    moved = ((into.get(a, a), into.get(b, b), dynamic) for a, b, dynamic in edges)
    return folded, list(dict.fromkeys((a, b, dynamic) for a, b, dynamic in moved if a != b))


def _graph_text(text):
    """One line of a node's label: the graph's own line breaks are the only ones."""
    return " ".join(str(text).splitlines())


def _dot(nodes, edges):
    """The graph in Graphviz DOT."""
    ids = {key: f"n{index}" for index, key in enumerate(nodes)}

    def quoted(lines):
        return '"' + "\\n".join(_graph_text(line).replace("\\", "\\\\").replace('"', '\\"') for line in lines) + '"'

    out = ["digraph luigi_hashcheck {", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for key, (label, kind, _family) in nodes.items():
        out.append(f'  {ids[key]} [label={quoted(label)}, fillcolor="{_GRAPH_KINDS[kind][1]}", tooltip={quoted([_GRAPH_KINDS[kind][0]])}];')
    for a, b, dynamic in edges:
        out.append(f"  {ids[a]} -> {ids[b]}{' [style=dashed]' if dynamic else ''};")
    out.append("}")
    return "\n".join(out) + "\n"


# Characters a Mermaid label must not hold as they are, and their entity codes; "#" first,
# as every code begins with it.
_MERMAID_CODES = (("#", "#35;"), ('"', "#quot;"), ("&", "#amp;"), ("<", "#lt;"), (">", "#gt;"), ("`", "#96;"))


def _mermaid(nodes, edges):
    """The graph as a Mermaid flowchart, which GitHub and GitLab draw in Markdown."""
    ids = {key: f"n{index}" for index, key in enumerate(nodes)}

    def quoted(lines):
        escaped = []
        for line in lines:
            line = _graph_text(line)
            for char, code in _MERMAID_CODES:
                line = line.replace(char, code)
            escaped.append(line)
        return '"' + "<br/>".join(escaped) + '"'

    out = ["flowchart TD"]
    for key, (label, kind, _family) in nodes.items():
        out.append(f"  {ids[key]}[{quoted(label)}]:::{kind}")
    for a, b, dynamic in edges:
        out.append(f"  {ids[a]} {'-.->' if dynamic else '-->'} {ids[b]}")
    out.extend(f"  classDef {kind} fill:{colour},stroke:#555" for kind, (_text, colour) in _GRAPH_KINDS.items())
    return "\n".join(out) + "\n"


def _cmd_adopt(args):
    with _luigi_task(args.luigi_args) as root:
        return _adopt(root, _settings(), args.dry_run)


def _adopt(root, settings, dry_run):
    """Record the existing outputs of the tasks the walk finds stale in themselves."""
    with _inspection(settings) as memo:
        walk = _walk([root], memo, explore=True)
    left = done = 0
    verb = "would record" if dry_run else "recorded"
    for task in walk.order:  # dependencies first
        verdict = walk.verdicts[task.task_id]
        if not _checked(task) or verdict.ok or task.task_id in walk.upstream:
            continue  # up to date, or stale only through an upstream task, adopted before it
        missing = [t for t in flatten(task.output()) if not t.exists()]
        inputs = flatten(task.input()) + _extra_inputs(task)
        cache: dict = {}
        own = _own_paths(task)
        entries = [_entry(t, settings.algorithm, None, settings, cache, own=own) for t in inputs]
        if missing or None in entries:
            gone = [("output", t) for t in missing] + [("input", t) for t, entry in zip(inputs, entries) if entry is None]
            print(f"left alone {task}: " + "; ".join(_reason("missing", what=what, name=_show(getattr(t, "path", str(t)))) for what, t in gone))
            left += 1
            continue
        dynamic = _recorded_dynamic(task, settings, cache)
        if dynamic is None:
            print(f"left alone {task}: its run() yields dynamic dependencies, which only a run can record")
            left += 1
            continue
        try:
            _validate(task)
        except ValidationError as exc:
            print(f"left alone {task}: {_reason('validate', error=exc.message)}")
            left += 1
            continue
        done += 1
        if dry_run:
            print(f"{verb} {task}: {verdict.reason}")
            continue
        written = _write_records(task, settings, inputs, entries, dynamic)
        print(f"{verb} {task}: " + ", ".join(_show(p) for p in written))
    if not (done or left):  # else each task has had its line
        counts = collections.Counter(_status(walk.verdicts[task.task_id]) for task in walk.order)
        print(f"nothing to record; {len(walk.verdicts)} tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 1 if left else 0


def _recorded_dynamic(task, settings, cache):
    """The dynamic dependencies of ``task``, with current digests, for adopt.

    An empty list for a run() that is not a generator. For one that is, the list an earlier
    record names, or None when there is no such record or one of its dependencies cannot be
    rebuilt or has lost an output: only a run can say what it yields.
    """
    if not inspect.isgeneratorfunction(inspect.unwrap(type(task).run)):
        return []
    own = _own_paths(task)
    for output in flatten(task.output()):
        found = _storage_of(output, task)
        if found is None:
            continue
        try:
            record = _read_record(_record_path(found[1], found[0]), found[0])
        except _DamagedRecord:
            return None
        if record is None:
            return None
        found = []
        for dep in record["dynamic"]:
            dep_task = _task_of(dep)
            if dep_task is None:
                return None
            targets = flatten(dep_task.output())
            entries = [_entry(t, settings.algorithm, None, settings, cache, own=own) for t in targets]
            if None in entries:
                return None
            found.append((dep_task, targets, entries))
        return found
    return None


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="luigi-hashcheck",
        description="Inspect and maintain luigi_hashcheck records. Exit 0: all good; 1: something is stale or would run; 2: usage error or bad path.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser("verify", help="check records against the files on disk; runs nothing")
    verify.add_argument("paths", nargs="*", metavar="PATH", help="an output, or a folder to search (default: .)")
    shown = verify.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print one JSON document")
    shown.add_argument("--dot", action="store_true", help="print the graph of records in Graphviz DOT")
    verify.add_argument("--quiet", action="store_true", help="no progress on stderr")
    verify.add_argument("--no-trust-mtime", action="store_true", help="hash every file, whatever its stat says (as [hashcheck] trust_mtime = false does)")
    verify.set_defaults(func=_cmd_verify)
    factory_help = "for URLs other than s3://: MODULE:FUNC, a function given the URL scheme that returns its Luigi client"
    verify.add_argument("--client-factory", metavar="MODULE:FUNC", help=factory_help)

    for name, func, text in (
        ("explain", _cmd_explain, "print the task's dependency tree and why each task would run"),
        ("adopt", _cmd_adopt, "record existing outputs as they are, without running anything"),
    ):
        command = commands.add_parser(
            name, help=text, description=f"{text}. TASK and its parameters use Luigi's command-line syntax.", allow_abbrev=False,
            usage=f"luigi-hashcheck {name} {'[--dry-run] ' if name == 'adopt' else '[--dot | --mermaid] '}--module MODULE TASK [--param value ...]",
        )
        if name == "adopt":
            command.add_argument("--dry-run", action="store_true", help="print what would be recorded; write nothing")
        else:
            shown = command.add_mutually_exclusive_group()
            shown.add_argument("--dot", action="store_true", help="print the dependency graph in Graphviz DOT")
            shown.add_argument("--mermaid", action="store_true", help="print the dependency graph as a Mermaid flowchart")
        command.set_defaults(func=func, luigi_args=[])

    forget = commands.add_parser("forget", help="delete the records of outputs, so their tasks run again")
    forget.add_argument("paths", nargs="+", metavar="PATH", help="an output, or a folder to clear")
    forget.add_argument("--client-factory", metavar="MODULE:FUNC", help=factory_help)
    forget.set_defaults(func=_cmd_forget)

    accept = commands.add_parser("accept", help="re-record current digests, accepting a harmless change")
    accept.add_argument("paths", nargs="+", metavar="PATH", help="an output, or a folder of outputs")
    accept.add_argument("--client-factory", metavar="MODULE:FUNC", help=factory_help)
    accept.set_defaults(func=_cmd_accept)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``luigi-hashcheck`` command line and return its exit code.

    :param argv: the arguments, without the program name; ``sys.argv[1:]`` by default.
    """
    parser = _parser()
    try:
        # explain and adopt hand what they do not know, the task and its flags, to Luigi.
        args, rest = parser.parse_known_args(argv)
        if rest and args.command not in ("explain", "adopt"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command in ("explain", "adopt"):
            if not rest:
                raise _UsageError(f"{args.command} needs a task: --module MODULE TASK [--param value ...]")
            args.luigi_args = rest
        global _client_factory
        _cli_stores.clear()
        _client_factory = _load_factory(args.client_factory) if getattr(args, "client_factory", None) else None
        return args.func(args)
    except SystemExit as exc:  # argparse and Luigi's parser exit; we return codes instead
        return 0 if exc.code in (0, None) else 2
    except (_UsageError, ConfigError) as exc:
        print(f"luigi-hashcheck: {exc}", file=sys.stderr)
        return 2
    except HashCheckError as exc:
        print(f"luigi-hashcheck: {exc}", file=sys.stderr)
        return 1


###############################################################################
# Platform ####################################################################
###############################################################################
#
# What differs by platform, chosen once: _try_lock(fd) takes a lock without waiting and
# returns False when another process holds it; _unlock(fd) releases it; _pid_alive(pid)
# says whether a process on this host may be alive.

if os.name == "nt":
    import msvcrt

    def _try_lock(fd):
        # msvcrt locks bytes from the current position, so always lock byte 0.
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd):
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    def _pid_alive(pid):
        return True  # os.kill(pid, 0) would terminate it on Windows: trust age alone

else:
    import fcntl

    def _try_lock(fd):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def _unlock(fd):
        fcntl.lockf(fd, fcntl.LOCK_UN)

    def _pid_alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass  # EPERM: alive, and someone else's
        return True


"""The stage protocol, the same in every stage and tool that writes an output: decide, lock, run, record, publish.

  done already  the output is finished (its done marker OUT.done.json matches it) with the same arguments and inputs
                (compared by content: `fingerprint`): one line, exit 0, nothing loaded
  refused       made with other arguments or inputs, or present without a marker: one line, unless --overwrite
  locked        another process is writing the output (it holds OUT.lock): one line naming it
  resumed       `st.work(path)`: work a killed run left (01's partial file, 04's checkpoints) is resumed when it was
                started with the same settings
  published     the stage writes its whole output to `st.tmp`; the marker is written, then `st.tmp` is renamed onto
                OUT. On an error nothing is published and nothing half-written is left.
A hub model or dataset input (NAME or NAME@REVISION) counts as the commit its revision resolves to now: the marker
records that commit (inputs.NAME.revision), and a rerun after the commit changed upstream is a changed input.
"""
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time

from dice import DiceError, models

MODEL_INPUTS = ("model", "policy", "reference")  # the stages' model inputs; any other hub id is a dataset


def refuse_overwrite(path, overwrite):
    """Never silently replace a finished output (for the tools; the stages use `stage`)."""
    if os.path.exists(path) and not overwrite:
        raise DiceError(f"{path} already exists; pass --overwrite to replace it")


def done_marker(path):
    """The file that says `path` is finished: written by `stage` just before `path` is published."""
    return str(path).rstrip("/") + ".done.json"


class AlreadyDone(Exception):
    """Raised by `stage` when the output is finished with the same arguments and inputs: `cli` prints it, exit 0."""


def fingerprint(path, kind="model"):
    """What identifies an input or output by content: sha256 of a file; of a folder, its file names and sizes plus the
    content of every file up to 16 MiB (config, tokenizer, records: not the weights, which would take minutes); of a
    hub id (a `kind` "model" or "dataset"), its name and the commit its revision resolves to (models.hub_revision);
    anything else is its own name. 16 hex digits."""
    h = hashlib.sha256()
    path = str(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif os.path.isdir(path):
        for folder, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(folder, name)
                size = os.path.getsize(full)
                h.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
                if size <= 16 << 20:
                    with open(full, "rb") as f:
                        h.update(f.read())
    else:
        commit = models.hub_revision(path, kind)
        h.update((f"hub:{models.split_revision(path)[0]}@{commit}" if commit else "name:" + path).encode())
    return h.hexdigest()[:16]


def _comparable(args, inputs, ignore):
    """The arguments a rerun must repeat: all but the input paths (compared by content), --out and `ignore`."""
    skip = set(inputs) | {"out", "overwrite"} | set(ignore)
    return json.loads(json.dumps({k: v for k, v in args.items() if k not in skip}, default=str))


def _differences(before, now):
    keys = sorted(set(before) | set(now), key=str)
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class Stage:
    """One run of a stage script on one output. See `stage`."""

    def __init__(self, name, out, args, inputs, overwrite, seed, ignore, main_process):
        self.name, self.out, self.seed, self.main = name, str(out).rstrip("/"), seed, main_process
        self.args, self.inputs, self.overwrite = args, {k: v for k, v in inputs.items() if v is not None}, overwrite
        self.ignore, self.marker, self.tmp = tuple(ignore), done_marker(self.out), self.out + ".tmp"
        self.record, self.works, self.started, self._lock = {}, [], time.time(), None

    # -- the start: who holds the output, is it done already, may it be replaced
    def begin(self):
        if self.main:
            self._acquire()
        kinds = {k: "model" if k in MODEL_INPUTS else "dataset" for k in self.inputs}
        self.revisions = {k: models.hub_revision(v, kinds[k]) for k, v in self.inputs.items()}  # None: not the hub's
        self.input_fingerprints = {k: fingerprint(v, kinds[k]) for k, v in self.inputs.items()}
        self.settings = {"args": _comparable(self.args, self.inputs, self.ignore), "inputs": self.input_fingerprints}
        finished = finished_marker(self.out)
        if finished is not None:
            inputs = {k: v.get("fingerprint") for k, v in finished.get("inputs", {}).items()}
            changed = self._changes({"args": finished.get("settings", {}).get("args", {}), "inputs": inputs})
            if not changed:
                raise AlreadyDone(f"{self.out}: done already (same arguments and inputs; see {self.marker})")
            if not self.overwrite:
                raise DiceError(f"{self.out} was made with other arguments or inputs ({'; '.join(changed)}); "
                                "pass --overwrite to redo it")
        elif os.path.lexists(self.out) and not self.overwrite:
            raise DiceError(f"{self.out} already exists but is not a finished output of this stage (no matching "
                            f"{os.path.basename(self.marker)}); pass --overwrite to replace it")
        if self.main:
            _remove(self.tmp)  # left by a run that was killed: never resumed, always rebuilt

    def _changes(self, before):
        """What differs from the settings `before` ({"args", "inputs": {name: fingerprint}}), one string each."""
        changed = _differences(before.get("args", {}), self.settings["args"])
        return changed + [f"input --{k} changed" for k in sorted(set(before.get("inputs", {})) | set(self.inputs))
                          if before.get("inputs", {}).get(k) != self.input_fingerprints.get(k)]

    def _acquire(self):
        import fcntl

        path = self.out + ".lock"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise DiceError(f"{self.out} is being written right now by {holder}; wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} ({' '.join(sys.argv)[:200]})\n")
        f.flush()
        self._lock = f

    def release(self):
        if self._lock is not None:
            os.remove(self._lock.name)  # removed while still held: no second process can slip in between
            self._lock.close()
            self._lock = None

    def writing_beside(self):
        """Call before writing files beside the output (03's stats.json and plots). When this run replaces an output
        (--overwrite; an unchanged one was done already in `begin`), the old one stops counting as finished now (its
        done marker goes), so a run killed from here on never leaves new side files beside an output whose marker
        still vouches for it: the next run must redo it."""
        if self.main and self.overwrite:
            _remove(self.marker)

    # -- resumable work (01's partial file, 04's checkpoints)
    def work(self, path, keep=False):
        """Register `path` (a file or folder a killed run leaves behind) and say whether to resume it: True when it
        exists and was started with the same arguments and inputs; absent, it is started now (False); started with
        other settings, it is discarded with --overwrite, else refused. Removed when the stage finishes (with its
        settings file PATH.args.json) unless `keep`."""
        path, record = str(path).rstrip("/"), str(path).rstrip("/") + ".args.json"
        if not keep:
            self.works.append(path)
        if not os.path.lexists(path):
            if self.main:
                write_json(record, self.settings)
            return False
        try:
            with open(record, encoding="utf-8") as f:
                before = json.load(f)
        except (OSError, ValueError):
            before = None
        if before == self.settings:
            return True
        changed = "its settings file is missing" if before is None else "; ".join(self._changes(before))
        if not self.overwrite:
            raise DiceError(f"{path} holds an unfinished run with other settings ({changed}); rerun with the same "
                            "settings to resume it, or pass --overwrite to start again")
        if self.main:
            _remove(path)
            write_json(record, self.settings)
        return False

    # -- the end: marker first, then the output renamed into place
    def finish(self):
        if not os.path.lexists(self.tmp):
            raise DiceError(f"internal error: {self.name} wrote no output at {self.tmp}")
        marker = {
            "stage": self.name, "args": self.args, "settings": self.settings,
            "inputs": {k: {"path": str(v), "fingerprint": self.input_fingerprints[k],
                           **({"revision": self.revisions[k]} if self.revisions[k] else {})}
                       for k, v in self.inputs.items()},
            "output": {"path": self.out, "fingerprint": fingerprint(self.tmp)}, "seed": self.seed,
            "versions": package_versions("torch", "transformers", "trl", "accelerate", "datasets", "numpy"),
            **self.record,
            "seconds": round(time.time() - self.started, 1),
        }
        write_json(self.marker, marker)
        if os.path.isdir(self.out) and not os.path.islink(self.out):
            _remove(self.out + ".old")
            os.replace(self.out, self.out + ".old")
        os.replace(self.tmp, self.out)
        _remove(self.out + ".old")
        for path in self.works:
            _remove(path)
            _remove(path + ".args.json")


@contextlib.contextmanager
def stage(name, out, args, inputs=None, overwrite=False, seed=None, ignore=(), main_process=True):
    """The protocol of the module docstring around a stage's body, which writes its whole output to `st.tmp` (a file
    or a folder) and puts counts into `st.record` (the marker also gets the stage, arguments, input fingerprints
    (`inputs`: {argument: path}, compared by content), output fingerprint, seed, versions and seconds).
    `main_process`: False in the other processes of a multi-process run, which decide the same but never lock, delete
    or write."""
    st, made = Stage(name, out, args, inputs or {}, overwrite, seed, ignore, main_process), _missing_folder(out)
    try:
        st.begin()
        try:
            yield st
        except BaseException:
            if main_process:
                _remove(st.tmp)  # nothing half-written is left behind
            raise
        if main_process:
            st.finish()
            made = None
    finally:
        st.release()
        if made and main_process:  # a folder this run made for its output, still empty after an error: gone too
            for folder, _, _ in sorted(os.walk(made), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def _missing_folder(path):
    """The outermost folder above `path` that does not exist yet (None when its folder exists)."""
    folder, missing = os.path.dirname(os.path.abspath(str(path))), None
    while not os.path.isdir(folder):
        missing, folder = folder, os.path.dirname(folder)
    return missing


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Write to `path.tmp.PID` and rename onto `path` only when the block finishes without an error."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def write_jsonl(path, rows):
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def package_versions(*names):
    """Python and the installed versions of `names` (those not installed are left out), for done markers."""
    import importlib.metadata as md

    found = {"python": sys.version.split()[0]}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def read_marker(path):
    """The done marker of the output `path` (a dict), or None when there is none or it cannot be read."""
    try:
        with open(done_marker(path), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def finished_marker(path, current=None):
    """The done marker of the output `path` when it vouches for the output as it is now (the fingerprint it records is
    the output's: `current`, when the caller has computed it, else computed here); None for a missing, unreadable or
    stale marker (the output was changed or replaced since)."""
    marker = read_marker(path)
    if marker is None or not os.path.lexists(path) or not isinstance(marker.get("output"), dict):
        return None
    return marker if marker["output"].get("fingerprint") == (current or fingerprint(path)) else None

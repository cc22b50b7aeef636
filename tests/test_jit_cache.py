"""The JIT cache is verified, never trusted (issue 10, item 2).

LLVM aborts the whole process (LLVM ERROR, SIGABRT) when handed a damaged object, so every corruption
is loaded in a subprocess: an abort there fails the test instead of killing pytest. Each damaged entry
must give a JitCacheWarning, a recompile (cache_hit False), the right answer, exit 0, and a fresh valid
entry in its place. A cache folder others can write to is not used at all.
"""
import json
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import graphcnn as gc  # noqa: E402
from backends.llvm import jit  # noqa: E402
from ir.ops import emit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runs in the subprocess: compile a small graph on the LLVM backend after each corruption of the cache
SCRIPT = r'''
import glob, json, os, sys, warnings
import numpy as np
import graphcnn as gc
from backends.llvm import jit
from ir.ops import emit

folder = os.environ["GRAPHCNN_CACHE"]
rng = np.random.default_rng(7)
g = gc.Graph("cached")
x = g.input("x", (None, 13))
w = g.param("w", (13, 5))
g.output(emit("relu", emit("dense", x, w)))
wv = rng.standard_normal((13, 5)).astype(np.float32)
xv = rng.standard_normal((3, 13)).astype(np.float32)
ref = np.maximum(xv.astype(np.float64) @ wv.astype(np.float64), 0)


def entries():
    return sorted(glob.glob(os.path.join(folder, "*" + jit.ENTRY_SUFFIX)))


def corrupt(mode):
    for path in entries():
        data = bytearray(open(path, "rb").read())
        if mode == "truncated":
            data = data[:len(data) // 2]
        elif mode == "empty":
            data = b""
        elif mode == "header_only":
            data = data[:jit._HEADER.size]
        elif mode == "zeroed":
            data = bytes(len(data))
        elif mode == "bitflip_object":
            data[len(data) * 2 // 3] ^= 0x10
        elif mode == "bitflip_digest":
            data[8 + 64 + 8] ^= 0x01
        elif mode == "bad_length":
            data[8 + 64] ^= 0x01
        elif mode == "padded":
            data += b"\0" * 64
        elif mode == "raw_object":              # an entry of the old, unverified format
            data = data[jit._HEADER.size:]
        elif mode == "other_key":               # a verified entry, but for different code
            obj = bytes(data[jit._HEADER.size:])
            jit.write_cache_entry(folder, "0" * 64, obj)
            data = open(os.path.join(folder, "0" * 64 + jit.ENTRY_SUFFIX), "rb").read()
            os.unlink(os.path.join(folder, "0" * 64 + jit.ENTRY_SUFFIX))
        elif mode == "symlink":
            os.unlink(path)
            os.symlink("/dev/zero", path)
            continue
        elif mode == "shared_file":             # group/world-writable: someone else may have written it
            os.chmod(path, 0o666)
            continue
        else:
            raise SystemExit("unknown mode " + mode)
        with open(path, "wb") as f:
            f.write(data)


def run():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = gc.compile(g, "llvm", {"w": wv})
        y = fn(x=xv)
    keys = [os.path.basename(p)[:-len(jit.ENTRY_SUFFIX)] for p in entries()]
    return {"hits": [p.jit.cache_hit for p in fn._parts],
            "kernel_hits": [p.kernels_cached for p in fn._parts],
            "modules": sum(1 + len(p.jit.kernel_irs) for p in fn._parts),
            "max_err": float(np.abs(y - ref).max()),
            "warnings": [str(m.message) for m in caught if issubclass(m.category, jit.JitCacheWarning)],
            "valid_entries": sum(jit.read_cache_entry(folder, k) is not None for k in keys),
            "entries": len(keys)}


results = {"cold": run(), "warm": run()}
for mode in sys.argv[1:]:
    corrupt(mode)
    results[mode] = run()
print(json.dumps(results))
'''

MODES = ["truncated", "empty", "header_only", "zeroed", "bitflip_object", "bitflip_digest", "bad_length",
         "padded", "raw_object", "other_key", "symlink", "shared_file"]


@pytest.fixture(scope="module")
def corruption_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jitcache")
    os.chmod(folder, 0o700)
    env = dict(os.environ, GRAPHCNN_CACHE=str(folder), PYTHONPATH=ROOT, GRAPHCNN_THREADS="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT] + MODES, capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, f"exit {res.returncode} (negative: killed by a signal)\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cold_then_warm(corruption_runs):
    cold, warm = corruption_runs["cold"], corruption_runs["warm"]
    assert cold["hits"] == [False] and warm["hits"] == [True]
    # one entry per module: the graph's own and each kernel's (backends/llvm/compile_pool.py)
    modules = cold["modules"]
    assert modules >= 2 and cold["kernel_hits"] == [0] and warm["kernel_hits"] == [modules - 1]
    assert cold["entries"] == cold["valid_entries"] == modules
    assert cold["warnings"] == [] and warm["warnings"] == []
    assert cold["max_err"] < 1e-4 and warm["max_err"] < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_damaged_entry_is_deleted_and_recompiled(corruption_runs, mode):
    r = corruption_runs[mode]
    print(mode, r)
    assert r["hits"] == [False] and r["kernel_hits"] == [0], "a damaged entry was loaded"
    # every entry (the graph's and each kernel's) was damaged: one warning each
    assert len(r["warnings"]) == r["modules"] and all("recompiling" in w for w in r["warnings"]), r["warnings"]
    assert r["max_err"] < 1e-4
    assert r["entries"] == r["valid_entries"] == r["modules"]     # replaced by fresh, verified entries


# -- the folder itself ------------------------------------------------------------------------------

def _graph():
    g = gc.Graph("folder_check")
    x = g.input("x", (None, 6))
    g.output(emit("relu", emit("scale", x, factor=3.0)))
    return g


def _compile_and_check(g):
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = gc.compile(g, "llvm")
        np.testing.assert_array_equal(fn(x=x), np.maximum(x * np.float32(3), 0))
    # per part: (graph module loaded from the cache, kernel modules loaded from it, kernel modules)
    hits = [(p.jit.cache_hit, p.kernels_cached, len(p.jit.kernel_irs)) for p in fn._parts]
    assert all(k >= 1 for *_, k in hits)
    return hits, [str(m.message) for m in caught if issubclass(m.category, jit.JitCacheWarning)]


def _none_cached(hits):
    return all(not main and kernels == 0 for main, kernels, _ in hits)


def _all_cached(hits):
    return all(main and kernels == count for main, kernels, count in hits)


def _plant_valid_entries(folder, g, monkeypatch):
    """Compile once into a private copy, then copy its (valid) entries into `folder`, as an attacker
    sharing the folder could."""
    private = folder.parent / (folder.name + "_private")
    private.mkdir(mode=0o700)
    monkeypatch.setenv("GRAPHCNN_CACHE", str(private))
    _compile_and_check(g)
    for p in private.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
        os.chmod(folder / p.name, 0o600)
    return len(list(private.iterdir()))


@pytest.mark.parametrize("problem", ["world_writable", "group_writable", "other_owner", "symlink", "file"])
def test_unsafe_cache_folder_is_not_used(tmp_path, monkeypatch, problem):
    monkeypatch.setattr(jit, "_refused_folders", set())
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    g = _graph()
    assert _plant_valid_entries(folder, g, monkeypatch) >= 1
    monkeypatch.setenv("GRAPHCNN_CACHE", str(folder))
    target = folder
    if problem == "world_writable":
        os.chmod(folder, 0o777)
    elif problem == "group_writable":
        os.chmod(folder, 0o770)
    elif problem == "other_owner":
        real_uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)
    elif problem == "symlink":
        target = tmp_path / "link"
        os.symlink(folder, target)
        monkeypatch.setenv("GRAPHCNN_CACHE", str(target))
    else:
        target = tmp_path / "plain_file"
        target.write_bytes(b"not a folder")
        monkeypatch.setenv("GRAPHCNN_CACHE", str(target))
    before = sorted(os.listdir(folder))
    hits, warned = _compile_and_check(g)
    assert _none_cached(hits), "code was loaded from an unsafe folder"
    assert len(warned) == 1 and "compiling without the cache" in warned[0] and str(target) in warned[0]
    assert sorted(os.listdir(folder)) == before         # nothing written there either
    hits, warned = _compile_and_check(g)                 # one warning per folder and process
    assert _none_cached(hits) and warned == []


def test_private_folder_is_created_private_and_used(tmp_path, monkeypatch):
    folder = tmp_path / "new" / "cache"
    monkeypatch.setenv("GRAPHCNN_CACHE", str(folder))
    g = _graph()
    hits, warned = _compile_and_check(g)
    assert _none_cached(hits) and warned == []
    assert stat.S_IMODE(os.stat(folder).st_mode) & 0o077 == 0
    files = list(folder.iterdir())
    assert len(files) == sum(1 + k for *_, k in hits)           # the graph's module and each kernel's
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    hits, warned = _compile_and_check(g)
    assert _all_cached(hits) and warned == []


def test_cache_disabled_with_zero(monkeypatch):
    monkeypatch.setenv("GRAPHCNN_CACHE", "0")
    assert jit.trusted_cache_dir() is None
    hits, warned = _compile_and_check(_graph())
    assert _none_cached(hits) and warned == []


def test_entry_format_checks_key_length_and_digest(tmp_path):
    os.chmod(tmp_path, 0o700)
    key, other = "a" * 64, "b" * 64
    jit.write_cache_entry(str(tmp_path), key, b"object bytes")
    assert jit.read_cache_entry(str(tmp_path), key) == b"object bytes"
    assert jit.read_cache_entry(str(tmp_path), other) is None                 # absent: silently None
    os.replace(tmp_path / (key + jit.ENTRY_SUFFIX), tmp_path / (other + jit.ENTRY_SUFFIX))
    with pytest.warns(jit.JitCacheWarning, match="another key"):
        assert jit.read_cache_entry(str(tmp_path), other) is None
    assert not (tmp_path / (other + jit.ENTRY_SUFFIX)).exists()               # deleted

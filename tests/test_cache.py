"""The content-addressed compile cache (`paracompile._cache`, `paracompile._driver`).

* A second `load` of a cell in a fresh process neither analyses nor renders, and numba loads
  every kernel from its cache (NUMBA_DEBUG_CACHE=1 shows "data loaded", never "data saved").
* The keys change with the cell text, the target, the dtype, the templates and the analysis
  sources — and not with anything else.
* Files are written atomically; PARACOMPILE_DUMP_DIR receives a copy of generated sources.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CELLS_DIR, ROOT

import paracompile
from paracompile import _cache, _codegen, _driver

# Loads a cell, runs every CPU kernel (sequential and Newton forward, backward) and prints the
# stage counters as JSON on its last line.
PROGRAM = """
import json, sys, torch
import paracompile
from paracompile import _driver
cell = paracompile.load(sys.argv[1])
counts_after_load = dict(_driver.STAGE_COUNTS)
B, T, D = 2, 200, 3
g = torch.Generator().manual_seed(0)
xs = {n: torch.randn(B, T, D, dtype=torch.float64, generator=g, requires_grad=True)
      for n in cell.inputs}
ps = {n: 0.5 * torch.randn(D, dtype=torch.float64, generator=g) for n in cell.params}
for method in ("sequential", "newton"):
    out = cell.apply(xs, ps, method=method, backend="cpu")
    sum(v.sum() for v in out.values()).backward()
print(json.dumps({"after_load": counts_after_load, "after_apply": dict(_driver.STAGE_COUNTS)}))
"""


def run_program(cell: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROGRAM, cell], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300)


def test_second_load_in_a_fresh_process_compiles_nothing():
    cell = str(CELLS_DIR / "paragru.cell")
    first = run_program(cell)  # compiles, unless an earlier test already did
    assert first.returncode == 0, first.stderr
    second = run_program(cell, NUMBA_DEBUG_CACHE="1")
    assert second.returncode == 0, second.stderr
    counts = json.loads(second.stdout.strip().splitlines()[-1])
    zero = {"analyse": 0, "render": 0}
    assert counts == {"after_load": zero, "after_apply": zero}
    log = second.stdout + second.stderr
    assert "data loaded" in log and "index loaded" in log
    assert "data saved" not in log and "index saved" not in log, log
    # every kernel the program ran came from the cache
    for kernel in ("forward_sequential", "newton_linearise", "newton_carry", "newton_fixup",
                   "backward_adjoint"):
        assert f".{kernel}-" in log, kernel


def test_cell_warnings_belong_to_the_load():
    """An unused declaration warns when the cell is loaded. With its metadata cached and a
    kernel module not (new templates, another dtype), rendering the module parses the cell
    again: that must not warn again from inside the first apply (an error under -W error)."""
    text = f"# {uuid.uuid4()}\ncell Unused\nstate h\ninput x\nparam w\nh' = tanh(0.5 * h + x)\n"
    with pytest.warns(paracompile.CellWarning, match="param 'w' is never used"):
        paracompile.load(text)
    cell = paracompile.load(text)  # the metadata from the cache: nothing parsed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = cell._module("cpu", torch.float64)  # rendered now: parses the cell again
    assert hasattr(module, "backward_adjoint")


def test_first_load_analyses_and_renders_once():
    text = f"# {uuid.uuid4()}\ncell Fresh\nstate h\ninput x\nh' = tanh(0.5 * h + x)\n"
    before = dict(_driver.STAGE_COUNTS)
    cell = paracompile.load(text)
    cell._modules("cpu", "float64")
    cell._modules("cpu", "float32")
    assert _driver.STAGE_COUNTS["analyse"] == before["analyse"] + 1
    assert _driver.STAGE_COUNTS["render"] == before["render"] + 3  # torch, cpu × 2
    again = paracompile.load(text)
    again._modules("cpu", "float64")
    assert again.key == cell.key
    assert _driver.STAGE_COUNTS["analyse"] == before["analyse"] + 1
    assert _driver.STAGE_COUNTS["render"] == before["render"] + 3


# -- keys ----------------------------------------------------------------------------------------

BASE = "cell K\nstate h\ninput x\nparam a\nh' = tanh(a * h + x)\n"


@pytest.fixture
def module_keys(monkeypatch):
    """key(text, target, dtype): the key of the generated module a freshly loaded cell asks
    for, found without rendering or importing anything but the torch reference step."""
    seen: list[str] = []
    real = _cache.load_module

    def load_module(key, stem, render):
        if "_torch_" in stem:
            return real(key, stem, render)
        seen.append(key)
        return object(), False

    monkeypatch.setattr(_cache, "load_module", load_module)

    def key(text, target, dtype):
        paracompile.load(text)._modules(target, dtype)  # a new cell: no memoised modules
        return seen.pop()

    return key


@pytest.fixture
def fresh_fingerprints():
    """Clear the memoised fingerprints around a test (request it before monkeypatch, so its
    teardown runs after the patches are undone)."""
    _driver.target_fingerprint.cache_clear()
    _driver.analysis_fingerprint.cache_clear()
    yield
    _driver.target_fingerprint.cache_clear()
    _driver.analysis_fingerprint.cache_clear()


def test_key_changes_with_the_cell_text():
    a = paracompile.load(BASE)
    b = paracompile.load(BASE.replace("tanh", "sigmoid"))
    c = paracompile.load(BASE + "# a comment\n")
    assert len({a.key, b.key, c.key}) == 3
    assert paracompile.load(BASE).key == a.key


def test_key_changes_with_target_and_dtype(module_keys):
    keys = {(t, d): module_keys(BASE, t, d) for t in ("cpu", "cudasim", "cuda")
            for d in ("float32", "float64")}
    assert len(set(keys.values())) == len(keys)
    assert module_keys(BASE, "cpu", "float32") == keys["cpu", "float32"]  # deterministic
    assert module_keys(BASE + "\n", "cpu", "float32") != keys["cpu", "float32"]


def test_key_changes_with_the_templates(fresh_fingerprints, module_keys, monkeypatch):
    cell = paracompile.load(BASE)
    before = {t: module_keys(BASE, t, "float64") for t in ("cpu", "cuda")}
    real = _codegen.template_sources
    monkeypatch.setattr(_codegen, "template_sources",
                        lambda family: real(family) + ("# edited" if family == "cpu" else ""))
    _driver.target_fingerprint.cache_clear()
    after = {t: module_keys(BASE, t, "float64") for t in ("cpu", "cuda")}
    assert after["cpu"] != before["cpu"]
    assert after["cuda"] == before["cuda"]
    assert paracompile.load(BASE).key == cell.key  # the analysis does not depend on templates


@pytest.mark.parametrize("edited,changes", [
    ("cpu.py.jinja", {"cpu"}),
    ("_cpu_common.jinja", {"cpu"}),
    ("module.py.jinja", {"cpu", "cuda"}),
    ("cuda.py.jinja", {"cuda"}),
    ("cuda_dense.py.jinja", {"cuda"}),
    ("cpu_dense.py.jinja", {"cpu"}),
])
def test_editing_a_template_file_changes_its_targets(tmp_path, monkeypatch, edited, changes):
    """The fingerprint covers the files on disk: copy the templates, edit one, compare."""
    copy = tmp_path / "templates"
    copy.mkdir()
    for f in _codegen.templates_dir().glob("*.jinja"):
        (copy / f.name).write_text(f.read_text())
    monkeypatch.setattr(_codegen, "templates_dir", lambda: copy)
    before = {f: _codegen.template_sources(f) for f in ("cpu", "cuda")}
    with open(copy / edited, "a") as fh:
        fh.write("{# edited #}\n")
    after = {f: _codegen.template_sources(f) for f in ("cpu", "cuda")}
    assert {f for f in before if before[f] != after[f]} == changes


def test_key_changes_with_the_analysis_sources(fresh_fingerprints, monkeypatch):
    a = paracompile.load(BASE)
    monkeypatch.setattr(_driver, "analysis_fingerprint", lambda: "another compiler version")
    assert paracompile.load(BASE).key != a.key


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PARACOMPILE_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert _cache.cache_dir() == tmp_path / "elsewhere"
    cell = paracompile.load(BASE)
    assert list((tmp_path / "elsewhere").rglob(f"*{cell.key[:20]}*.json"))


def test_session_cache_is_a_temporary_directory(paracompile_cache_dir):
    assert _cache.cache_dir() == paracompile_cache_dir
    assert Path.home() / ".cache" not in paracompile_cache_dir.parents


# -- atomic writes -------------------------------------------------------------------------------

def leftovers(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.name.endswith(".tmp"))


def test_write_atomic_success(tmp_path):
    path = tmp_path / "sub" / "mod.py"
    _cache.write_atomic(path, "x = 1\n")
    _cache.write_atomic(path, "x = 2\n")
    assert path.read_text() == "x = 2\n"
    assert leftovers(tmp_path) == []


def test_write_atomic_failure_mid_write_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "mod.py"
    _cache.write_atomic(path, "old\n")
    real_fdopen = os.fdopen

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError("disk full")

    monkeypatch.setattr(_cache.os, "fdopen", lambda fd, *a, **k: Failing(real_fdopen(fd, *a, **k)))
    with pytest.raises(OSError, match="disk full"):
        _cache.write_atomic(path, "new content " * 1000)
    assert path.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_write_atomic_failure_on_encoding_and_on_replace(tmp_path, monkeypatch):
    path = tmp_path / "mod.py"
    with pytest.raises(UnicodeEncodeError):
        _cache.write_atomic(path, "ok\n" + "\ud800")  # a lone surrogate cannot be UTF-8
    assert not path.exists()

    def fail(*args):
        raise OSError("replace failed")

    monkeypatch.setattr(_cache.os, "replace", fail)
    with pytest.raises(OSError, match="replace failed"):
        _cache.write_atomic(path, "x\n")
    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_readers_never_see_a_partial_file(tmp_path):
    path = tmp_path / "mod.py"
    texts = ["a" * 200_000 + "\n", "b" * 300_000 + "\n"]
    _cache.write_atomic(path, texts[0])
    seen: set[str] = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(path.read_text())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(100):
            _cache.write_atomic(path, texts[i % 2])
    finally:
        stop.set()
        thread.join()
    assert seen <= set(texts)
    assert leftovers(tmp_path) == []


def test_compiling_leaves_no_temporary_files(paracompile_cache_dir):
    cell = paracompile.load(BASE)
    cell._modules("cpu", "float64")
    assert leftovers(paracompile_cache_dir) == []


# -- dump directory ------------------------------------------------------------------------------

def test_dump_dir_receives_generated_sources(tmp_path, monkeypatch, paracompile_cache_dir):
    dump = tmp_path / "dump"
    monkeypatch.setenv("PARACOMPILE_DUMP_DIR", str(dump))
    text = BASE + f"# {uuid.uuid4()}\n"  # a new key: nothing of it is on disk yet
    cell = paracompile.load(text)
    cell._modules("cpu", "float32")
    dumped = sorted(p.name for p in dump.iterdir())
    assert len(dumped) == 2 and any("_torch_" in n for n in dumped)
    assert any("_cpu_float32_" in n for n in dumped), dumped
    for name in dumped:
        cached = list(paracompile_cache_dir.rglob(name))
        assert len(cached) == 1
        assert (dump / name).read_text() == cached[0].read_text()
    assert "def forward_sequential(" in next(dump.glob("*_cpu_float32_*")).read_text()
    # a second load finds the cache and dumps nothing new
    monkeypatch.setenv("PARACOMPILE_DUMP_DIR", str(tmp_path / "dump2"))
    paracompile.load(text)._modules("cpu", "float32")
    assert not (tmp_path / "dump2").exists()

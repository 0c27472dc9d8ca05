"""Regressions of the command line, `build` and the compile cache (issue 8, items 5, 9, 10).

* `paracompile build` never replaces a file it did not write, nor writes a module that would
  shadow another one, unless forced; the source file's name cannot break the built module.
* No input gives the CLI a traceback: user errors exit 1 with a message, anything unexpected
  exits 2 as an internal error.
* A cell name too long for file names is a positioned CellError (check, load and build).
* A built module refuses to load under another paracompile (its kernels were rendered for
  the launchers of the one that built it): an ImportError that says to rebuild.
* A damaged cache entry (generated module, metadata, numba's index or data file) is discarded
  with a CacheWarning and rebuilt; an unusable cache directory falls back to a private
  temporary one, with a warning naming PARACOMPILE_CACHE_DIR.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import paracompile
from paracompile import _cache, _cli, _driver
from paracompile._cache import CacheWarning
from paracompile._cli import main

# a dense cell
DENSE = "cell {name}\nstate h\ninput x\nparam W : matrix\nh' = tanh(W @ h + x)\n"


def write_cell(directory: Path, name: str, file: str | None = None) -> Path:
    path = directory / (file or f"{name.lower()}.cell")
    path.write_text(DENSE.format(name=name))
    return path


def import_path(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- a built module belongs to the paracompile that built it ------------------------------------

@pytest.mark.parametrize("edit", [
    ("PACKAGE = '", "PACKAGE = '0"),  # built by another paracompile's sources
    ("cell_from_sources(META, SOURCES, PACKAGE)", "cell_from_sources(META, SOURCES)"),  # older
])
def test_a_module_built_by_another_paracompile_says_rebuild(tmp_path: Path, edit) -> None:
    built = _driver.build(write_cell(tmp_path, "Stale"), tmp_path)
    assert import_path(built, "stale").cell.name == "Stale"  # as built: it loads
    text = built.read_text(encoding="utf-8")
    assert edit[0] in text
    built.write_text(text.replace(edit[0], edit[1], 1), encoding="utf-8")
    with pytest.raises(ImportError, match=r"cell Stale was built by another version of "
                       r"paracompile .*Rebuild it: paracompile build"):
        import_path(built, "stale_edited")


def test_the_package_fingerprint_covers_the_templates(monkeypatch) -> None:
    before = _cache.package_fingerprint()
    assert before == _cache.package_fingerprint()  # stable
    monkeypatch.setattr(_cache, "_package_fingerprint", _cache._package_fingerprint.__wrapped__)
    real = Path.read_text

    def edited(path, *args, **kwargs):  # noqa: ANN001, ANN202
        text = real(path, *args, **kwargs)
        return text + "#" if path.name == "cuda.py.jinja" else text

    monkeypatch.setattr(Path, "read_text", edited)
    assert _cache.package_fingerprint() != before


# -- build: never overwrite or shadow ------------------------------------------------------------

def test_build_refuses_to_overwrite_a_user_file(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cell = write_cell(tmp_path, "DenseA")
    mine = tmp_path / "out" / "dense_a.py"
    mine.parent.mkdir()
    mine.write_text("print('my own module')\n")
    with pytest.raises(SystemExit, match=r"^paracompile: error: .*dense_a\.py exists and is not "
                       r"an unedited module built by paracompile; .*--force"):
        main(["build", str(cell), "-o", str(mine.parent)])
    assert mine.read_text() == "print('my own module')\n"
    with pytest.raises(FileExistsError, match="dense_a.py exists"):  # the Python API
        _driver.build(cell, mine.parent)
    assert mine.read_text() == "print('my own module')\n"
    assert main(["build", str(cell), "-o", str(mine.parent), "--force"]) == 0
    assert capsys.readouterr().out == f"wrote {mine}\n"
    assert import_path(mine, "dense_a").structure == "dense"
    assert sorted(p.name for p in mine.parent.iterdir()) == ["dense_a.py"]  # no temporaries


def test_rebuild_replaces_its_own_unedited_module(tmp_path: Path) -> None:
    cell = write_cell(tmp_path, "DenseB")
    target = _driver.build(cell, tmp_path)
    first = target.read_text()
    cell.write_text(cell.read_text() + "# edited\n")
    assert _driver.build(cell, tmp_path) == target  # no force needed
    assert target.read_text() != first
    target.write_text(target.read_text() + "# my edit\n")  # now the user's: kept
    with pytest.raises(FileExistsError):
        _driver.build(cell, tmp_path)
    assert target.read_text().endswith("# my edit\n")


@pytest.mark.parametrize("name,module,what", [
    ("Json", "json", "a standard library module"),
    ("Torch", "torch", "an importable module"),
    ("Paracompile", "paracompile", "an importable module"),
])
def test_build_refuses_a_module_name_that_shadows(tmp_path: Path, name: str, module: str,
                                                  what: str) -> None:
    cell = write_cell(tmp_path, name)
    with pytest.raises(SystemExit, match=rf"^paracompile: error: the cell's module name "
                       rf"'{module}' is also the name of {what}.*--force"):
        main(["build", str(cell), "-o", str(tmp_path)])
    with pytest.raises(_driver.ShadowingError, match=f"{module}.py would shadow it"):
        _driver.build(cell, tmp_path)
    assert not (tmp_path / f"{module}.py").exists()


def test_write_atomic_without_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    _cache.write_atomic(path, "new\n", overwrite=False)
    with pytest.raises(FileExistsError):
        _cache.write_atomic(path, "newer\n", overwrite=False)
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["mod.py"]


@pytest.mark.parametrize("file", ['a"""b.cell', "back\\slash.cell", "new\nline.cell",
                                  "quote'\".cell"])
def test_built_module_escapes_the_file_name(tmp_path: Path, file: str) -> None:
    cell = write_cell(tmp_path, "DenseC", file)
    target = _driver.build(cell, tmp_path / "out")
    module = import_path(target, f"dense_c_{uuid.uuid4().hex}")
    assert f"from {file}." in module.__doc__
    assert module.name == "DenseC"


def test_build_refusal_in_a_subprocess(tmp_path: Path) -> None:
    """Exit status 1 and one line per problem on stderr; a cache warning is a line too."""
    cell = write_cell(tmp_path, "DenseG")
    (tmp_path / "dense_g.py").write_text("# mine\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = subprocess.run([sys.executable, "-m", "paracompile", "build", str(cell), "-o",
                          str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PARACOMPILE_CACHE_DIR": str(blocker / "c")})
    assert run.returncode == 1
    assert run.stdout == ""
    warning, error = run.stderr.splitlines()
    assert warning.startswith(f"paracompile: warning: cannot use the compile cache {blocker}")
    assert error.startswith(f"paracompile: error: {tmp_path / 'dense_g.py'} exists")
    assert (tmp_path / "dense_g.py").read_text() == "# mine\n"


# -- no tracebacks ---------------------------------------------------------------------------

def test_build_of_unreadable_inputs_gives_messages(tmp_path: Path) -> None:
    binary = tmp_path / "bin.cell"
    binary.write_bytes(b"cell A\n\x89PNG\x00\xff")
    a_file = write_cell(tmp_path, "DenseD")
    with pytest.raises(SystemExit, match=r"^paracompile: error: cannot read .*: Is a directory$"):
        main(["build", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^paracompile: error: cannot read .*missing.cell: "
                       "No such file or directory$"):
        main(["build", str(tmp_path / "missing.cell")])
    with pytest.raises(SystemExit, match=r"^paracompile: error: cannot write .*sub: "
                       "Not a directory$"):
        main(["build", str(a_file), "-o", str(a_file / "sub")])


def test_binary_file_is_a_positioned_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    binary = tmp_path / "bin.cell"
    binary.write_bytes(b"cell A\n\x89PNG\x00\xff")
    for command in ("check", "build"):
        assert main([command, str(binary)]) == 1
        assert capsys.readouterr().err == (f"{binary}:2:1: error: byte 0x89 is not UTF-8 text; "
                                           "save the file as UTF-8\n")


def test_load_of_a_directory_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a \.cell file"):
        paracompile.load(tmp_path)
    binary = tmp_path / "bin.cell"
    binary.write_bytes(b"cell A\n\xff")
    with pytest.raises(paracompile.CellError, match="2:1: error: byte 0xff is not UTF-8"):
        paracompile.load(str(binary))


def test_unexpected_exception_is_an_internal_error(tmp_path: Path, monkeypatch,  # noqa: ANN001
                                                   capsys) -> None:  # noqa: ANN001
    cell = write_cell(tmp_path, "DenseE")

    def broken(structure: str) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(_cli, "_kernels", broken)
    assert main(["check", str(cell)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("paracompile: internal error: RuntimeError: boom\n")
    assert "please report it" in err and "Traceback" not in err
    monkeypatch.setenv("PARACOMPILE_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["check", str(cell)])


def test_recursion_error_is_a_message(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    import paracompile._parse as parse

    cell = write_cell(tmp_path, "DenseF")

    def deep(*args: object, **kwargs: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(parse, "parse_cell", deep)
    assert main(["check", str(cell)]) == 1
    assert capsys.readouterr().err == (
        f"paracompile: error: {cell}: an expression is too long or too deeply nested to "
        "compile (Python's recursion limit); split it into intermediates\n")


def test_a_very_long_expression_gives_no_traceback(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "long.cell"
    path.write_text("cell A\nstate h\nh' = h" + " + h" * 20000 + "\n")
    assert main(["check", str(path)]) in (0, 1)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    assert err == "" or err.startswith((f"{path}:", "paracompile: error: "))


# -- cell names that cannot name files -----------------------------------------------------------

LONG = "A" * 300


def test_too_long_cell_name_is_a_cell_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "long.cell"
    path.write_text(f"# a comment mentioning {LONG}\n\n" + DENSE.format(name=LONG))
    message = "the cell name is 300 characters long; at most 100 fit in file names"
    for argv in (["check", str(path)], ["build", str(path), "-o", str(tmp_path)]):
        assert main(argv) == 1
        assert capsys.readouterr().err == f"{path}:3:6: error: {message}\n"
    with pytest.raises(paracompile.CellError, match=message) as err:
        paracompile.load(path)
    assert (err.value.line, err.value.column) == (3, 6)
    with pytest.raises(paracompile.CellError) as err:
        paracompile.load(f"cell \\\n   {LONG}\nstate h\nh' = h\n")  # a continued line
    assert (err.value.line, err.value.column) == (2, 4)
    assert list(tmp_path.iterdir()) == [path]
    ok = "B" * 100
    assert paracompile.load(f"cell {ok}\nstate h\nh' = 0.5 * h\n").name == ok


def test_too_long_name_of_a_traced_cell(tmp_path: Path) -> None:
    with pytest.raises(paracompile.CellError, match="300 characters long"):
        @paracompile.cell(states="h", name=LONG)
        def step(h):  # noqa: ANN001, ANN202
            return 0.5 * h


def test_keyword_module_name_is_a_cell_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    path = write_cell(tmp_path, "Import")
    assert main(["build", str(path), "-o", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"{path}:1:6: error: cell Import would be built as the module 'import', a Python "
        "keyword that cannot be imported; choose another name\n")


# -- a damaged cache heals -----------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:  # noqa: ANN001
    """A fresh, empty compile cache for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PARACOMPILE_CACHE_DIR", str(path))
    return path


def forget_modules(directory: Path) -> None:
    """Drop the modules imported from `directory`, so the next load reads its files again."""
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").is_relative_to(directory):
            del sys.modules[name]


TEXT = "cell Heal\nstate h\ninput x\nh' = tanh(0.5 * h + x)\n"


@pytest.fixture
def text() -> str:
    """TEXT with a new key: none of its modules is imported yet."""
    return f"{TEXT}# {uuid.uuid4()}\n"


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],  # truncated
    lambda text: "",
    lambda text: text.replace("torch", "torhc", 1),  # edited
    lambda text: text.rsplit("# paracompile-sha256", 1)[0],  # checksum line lost
])
def test_damaged_generated_module_is_rebuilt(cache: Path, text: str,
                                             damage) -> None:  # noqa: ANN001
    cell = paracompile.load(text)
    (path,) = cache.rglob("heal_torch_any_*.py")
    good = path.read_text()
    path.write_text(damage(good))
    forget_modules(cache)
    message = f"discarded the damaged generated module {path};"
    with pytest.warns(CacheWarning, match=re.escape(message)):
        again = paracompile.load(text)
    assert path.read_text() == good
    assert again.key == cell.key and again.structure == "diagonal"


@pytest.mark.parametrize("damage", ['{"name": "He', "", "[]", "{}", "\udcff"])
def test_damaged_metadata_is_rebuilt(cache: Path, text: str, damage: str) -> None:
    cell = paracompile.load(text)
    (path,) = cache.rglob("meta_*.json")
    good = json.loads(path.read_text())
    path.write_text(damage, errors="surrogateescape")
    message = f"discarded the damaged cell metadata {path};"
    with pytest.warns(CacheWarning, match=re.escape(message)):
        again = paracompile.load(text)
    assert json.loads(path.read_text()) == good
    assert again.key == cell.key and again.states == cell.states


NUMBA_SOURCE = "from numba import njit\n\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n"


@pytest.mark.parametrize("suffix,damage", [
    (".nbi", lambda data: data[: len(data) // 2]),
    (".nbi", lambda data: b""),
    (".nbc", lambda data: data[: len(data) // 2]),
    (".nbc", lambda data: b"not a pickle"),
])
def test_damaged_numba_cache_is_recompiled(cache: Path, suffix: str, damage) -> None:  # noqa: ANN001
    """numba itself fails on every later call (UnpicklingError, EOFError) once a cache file
    is damaged; the kernels of a cached module discard the entry and compile again."""
    key = _cache.key("built", f"numba-test {uuid.uuid4()}")

    def fresh_f():  # noqa: ANN202
        forget_modules(cache)
        module, _ = _cache.load_module(key, "nb", lambda: NUMBA_SOURCE)
        return module.f

    assert fresh_f()(1) == 2  # compiles and saves numba's index and data
    (damaged,) = cache.rglob(f"__pycache__/nb_*{suffix}")
    damaged.write_bytes(damage(damaged.read_bytes()))
    f = fresh_f()
    with pytest.warns(CacheWarning, match=r"discarded numba's damaged cache .*nb_.*\.nbi"):
        assert f(1) == 2
    assert fresh_f()(1) == 2  # saved afresh: loads without a warning
    assert len(list(cache.rglob("__pycache__/nb_*.nbi"))) == 1


# -- an unusable cache directory -----------------------------------------------------------------

def test_unwritable_cache_dir_falls_back_to_a_temporary_one(tmp_path: Path,
                                                            monkeypatch) -> None:  # noqa: ANN001
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    wanted = blocker / "cache"  # cannot be created, even by root
    monkeypatch.setenv("PARACOMPILE_CACHE_DIR", str(wanted))
    with pytest.warns(CacheWarning, match=re.escape(f"cannot use the compile cache {wanted} (Not a "
                      "directory)") + ".*Set PARACOMPILE_CACHE_DIR to a writable directory"):
        used = _cache.cache_dir()
    assert used.is_dir() and not used.is_relative_to(blocker)
    assert _cache.cache_dir() == used  # once per process: no second warning
    cell = paracompile.load(TEXT + f"# {uuid.uuid4()}\n")
    assert list(used.rglob(f"meta_{cell.key[:20]}.json"))


@pytest.mark.parametrize("broken_home", [False, True])
def test_unusable_default_cache_dir_falls_back(tmp_path: Path, monkeypatch,  # noqa: ANN001
                                               broken_home: bool) -> None:
    monkeypatch.delenv("PARACOMPILE_CACHE_DIR")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if broken_home:
        def no_home() -> Path:
            raise RuntimeError("Could not determine home directory.")

        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setattr(Path, "home", no_home)
        reason = "the default cache directory (Could not determine home directory.)"
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
        reason = f"{blocker / 'paracompile'} (Not a directory)"
    with pytest.warns(CacheWarning, match=re.escape(f"cannot use the compile cache {reason}")
                      + ".*PARACOMPILE_CACHE_DIR"):
        used = _cache.cache_dir()
    assert used.is_dir() and not used.is_relative_to(blocker)

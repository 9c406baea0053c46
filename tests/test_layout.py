"""The repository's top-level folders never shadow an installed package of the same name.

From the repository root (where the README, CI and these tests run) the current directory comes first
on ``sys.path``. transformers >= 5.25 imports Hugging Face's ``kernels`` whenever a model module loads,
so our ``kernels/`` (installed as ``lens_fast.kernels``) must not be importable as ``kernels`` there;
the same holds for every other top-level folder whose name another distribution may install.
"""
import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_FOLDERS = sorted(p.name for p in ROOT.iterdir()
                           if p.is_dir() and p.name.isidentifier() and p.name != "lens_fast"
                           and p.name not in ("build", "dist", "runs"))


def run_from_root(code: str, extra_path: str = "") -> str:
    """Run ``code`` in a fresh interpreter whose working directory is the repository root; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_top_level_folders_are_not_regular_packages():
    assert {"kernels", "configs", "tools", "bench", "tests"} <= set(TOP_LEVEL_FOLDERS)
    regular = [name for name in TOP_LEVEL_FOLDERS if (ROOT / name / "__init__.py").exists()]
    assert regular == [], f"{regular} would shadow installed packages of the same name from the repository root"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed")
def test_bare_kernels_is_hugging_faces_from_the_root():
    where = run_from_root("import kernels; print(kernels.__file__)")
    assert Path(where).resolve().parent != ROOT / "kernels"
    assert "site-packages" in where


def test_qwen2_5_vl_modelling_imports_from_the_root():
    out = run_from_root("import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as m; "
                        "print(m.Qwen2_5_VLForConditionalGeneration.__name__)")
    assert out == "Qwen2_5_VLForConditionalGeneration"


def test_lens_fast_kernels_and_configs_are_the_repository_folders():
    out = run_from_root(
        "import lens_fast.kernels.mask_stats as m, lens_fast.kernels as k; from importlib import resources; "
        "print(m.__file__); print(callable(m.tile_foreground)); "
        "print(resources.files('lens_fast.configs').joinpath('tiny.yaml').is_file())")
    kernel_file, has_kernel, has_config = out.splitlines()
    assert Path(kernel_file).resolve() == ROOT / "kernels" / "mask_stats.py"
    assert has_kernel == "True" and has_config == "True"


@pytest.mark.parametrize("name", TOP_LEVEL_FOLDERS)
def test_an_installed_package_of_the_same_name_wins(tmp_path, name):
    """A distribution (however badly packaged) that installs a top-level ``name`` is what ``import name``
    gives from the root, not our folder."""
    fake = tmp_path / name
    fake.mkdir()
    (fake / "__init__.py").write_text("WHO = 'installed'\n")
    assert run_from_root(f"import {name}; print({name}.WHO)", extra_path=str(tmp_path)) == "installed"


def product_files():
    for folder in ("lens_fast", "kernels"):
        yield from (ROOT / folder).rglob("*.py")


def test_the_product_never_imports_a_top_level_folder():
    forbidden = set(TOP_LEVEL_FOLDERS)
    found = []
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert found == []


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="setuptools is not installed")
def test_a_built_package_holds_kernels_and_configs(tmp_path):
    """What a wheel installs: ``lens_fast/kernels`` and ``lens_fast/configs`` (no ``kernels`` at the top),
    importable from any directory."""
    build = tmp_path / "lib"
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in build.iterdir()) == ["lens_fast"]
    assert (build / "lens_fast" / "kernels" / "mask_stats.py").is_file()
    assert (build / "lens_fast" / "configs" / "architectures" / "sam_vit_b.json").is_file()
    env = {**os.environ, "PYTHONPATH": str(build)}
    code = "import lens_fast.kernels.reward_iou as m; from importlib import resources; print(m.__file__); " \
           "print(resources.files('lens_fast.configs').joinpath('tiny.yaml').is_file())"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kernel_file, has_config = done.stdout.split()
    assert Path(kernel_file).resolve() == (build / "lens_fast" / "kernels" / "reward_iou.py").resolve()
    assert has_config == "True"

"""The package's layering (pyproject [tool.importlinter]) holds, a violation of it fails, and importing the library
never loads torch (it is imported only inside the functions that read a PyTorch-format file)."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def lint_imports(root: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]' (import-linter)")
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([exe, "--no-cache", "--config", os.path.join(root, "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layers_contract_holds():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_layers_contract_fails_on_an_upward_import(tmp_path):
    """A copy of the package whose forward process imports the command line: lint-imports must refuse it."""
    shutil.copytree(os.path.join(ROOT, "diffusion_jax"), tmp_path / "diffusion_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    target = tmp_path / "diffusion_jax" / "process" / "discrete.py"
    target.write_text(target.read_text() + "\n\ndef _violation():\n    from diffusion_jax.cli import main  # noqa\n")
    r = lint_imports(str(tmp_path))
    assert r.returncode != 0
    assert "diffusion_jax.process.discrete -> diffusion_jax.cli" in r.stdout.replace("\n", " ") or \
        "diffusion_jax.process.discrete" in r.stdout, r.stdout


def test_importing_every_module_leaves_torch_unloaded():
    code = ("import importlib, pkgutil, sys\n"
            "import diffusion_jax\n"
            "names = [m.name for m in pkgutil.walk_packages(diffusion_jax.__path__, 'diffusion_jax.')\n"
            "         if not m.name.endswith('__main__')]\n"
            "for n in names: importlib.import_module(n)\n"
            "loaded = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
            "print(len(names), loaded)\n"
            "sys.exit(1 if loaded else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split()[0]) > 100   # every module was imported


def test_no_code_outside_the_process_package_asks_a_process_its_type():
    """Samplers, objectives, editing and likelihood read the process protocol (kind, discrete, network_level,
    truncate, ...), never `isinstance(schedule, SomeProcess)`."""
    import ast

    package = os.path.join(ROOT, "diffusion_jax")
    process_classes = set()
    for name in os.listdir(os.path.join(package, "process")):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(package, "process", name)).read())
            process_classes |= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"DiscreteSchedule", "VPSDE", "EDMSchedule", "VDMSchedule"} <= process_classes

    def named(node):
        return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
                if isinstance(n, (ast.Name, ast.Attribute))}

    offenders = []
    for dirpath, _, files in os.walk(package):
        if os.path.join(package, "process") in dirpath:
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            for node in ast.walk(ast.parse(open(path).read())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                        and len(node.args) == 2 and named(node.args[1]) & process_classes):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not offenders, offenders

"""`megatron_eplb.patches` imports both from the installed package and from a source checkout (DESIGN §3)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = "import megatron_eplb.patches as p, megatron_eplb as m; print(p.__file__); print(m.__file__)"


def _run(cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", CODE], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.slow
def test_import_from_checkout():
    patches, package = _run(ROOT)
    assert Path(patches) == ROOT / "patches" / "__init__.py"
    assert Path(package) == ROOT / "megatron_eplb" / "__init__.py"


@pytest.mark.slow
def test_import_from_installed_package(tmp_path):
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u; s = u.find_spec('megatron_eplb'); print(s.origin if s else '')",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not probe or Path(probe).is_relative_to(ROOT / "megatron_eplb"):
        pytest.skip("megatron_eplb is not installed (run `make test`, which installs it)")
    patches, package = _run(tmp_path)
    assert "site-packages" in patches and patches.endswith(
        os.path.join("megatron_eplb", "patches", "__init__.py")
    )
    assert "site-packages" in package


@pytest.mark.slow
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "megatron-eplb"
    if not script.exists():
        pytest.skip("console script not installed (run `make test`)")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "validate-map" in out and "inspect" in out


@pytest.mark.slow
def test_core_imports_neither_megatron_nor_deepspeed():
    code = (
        "import sys, importlib, pkgutil, megatron_eplb\n"
        "for m in pkgutil.walk_packages(megatron_eplb.__path__, 'megatron_eplb.'):\n"
        "    if not m.name.startswith('megatron_eplb.patches.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('megatron', 'deepspeed')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_setup_lists_every_subpackage():
    """Every package folder of the checkout is in setup.py ``packages`` (else it is missing once installed)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(
        ast.literal_eval(kw.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "packages"
    )
    found = set()
    for top, name in (("megatron_eplb", "megatron_eplb"), ("patches", "megatron_eplb.patches")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found <= set(listed), f"setup.py packages lacks {sorted(found - set(listed))}"

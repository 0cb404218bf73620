"""The registries: declared built-in names, lazy imports, extension by decorator."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ffc_ray.registry import BACKBONES, HEADS, MARGINS, Registry


@pytest.mark.parametrize("reg", [BACKBONES, MARGINS, HEADS], ids=lambda r: r.kind)
def test_declared_names_are_exactly_what_the_modules_register(reg):
    for name, module in reg.builtin.items():
        assert callable(reg.get(name)), name
        assert reg.get(name).__module__ == module, name
    assert set(reg._entries) == set(reg.builtin)  # no module registers an undeclared name


def test_validating_a_config_imports_no_torch():
    code = (
        "import sys\n"
        "from ffc_ray.config import load_config\n"
        "cfg = load_config(None, ['head.type=fc', 'model.backbone=iresnet50'])\n"
        "assert cfg.head.type == 'fc'\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_names_list_the_known_ones_and_extensions_register():
    reg = Registry("thing", {"a": "ffc_ray.registry"})  # a module that registers nothing
    with pytest.raises(KeyError, match="unknown thing 'a'; known: a"):
        reg.get("a")

    @reg.register("b")
    def make_b():
        return "b"

    assert reg.names() == ["a", "b"]
    assert reg.build("b") == "b"
    with pytest.raises(KeyError, match="registered twice"):
        reg.register("b")(lambda: None)

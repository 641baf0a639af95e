"""The training-method registry: the built-in methods are listed in lorakit.methods itself,
and importing a method's own module registers nothing."""

import subprocess
import sys

from lorakit.adalora.method import export_adalora, on_adalora_step, prepare_adalora
from lorakit.methods import METHODS, get_method


def test_the_built_in_methods_are_registered_by_lorakit_methods():
    assert sorted(METHODS) == ["adalora", "full", "lora"]
    adalora = get_method("adalora")
    assert (adalora.prepare, adalora.export, adalora.on_step) == (prepare_adalora, export_adalora, on_adalora_step)
    assert adalora.saved_name == get_method("lora").saved_name == "adapter"


def test_importing_adalora_registers_nothing_and_imports_no_registry():
    code = "import sys, lorakit.adalora; print('lorakit.methods' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

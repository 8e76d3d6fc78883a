"""What the package ships: the kernels built ahead of time (used unless older than their source)
and the TorchX component (launch/components.py is an example built on it)."""

import importlib.machinery
import os
from pathlib import Path

from mdaf_dist.models import cpu_kernels

REPO = Path(__file__).resolve().parents[1]


def test_the_prebuilt_kernels_are_used_unless_older_than_their_source(monkeypatch, tmp_path):
    (tmp_path / "csrc").mkdir()
    source, library = tmp_path / "csrc" / "mamba_cpu.cpp", tmp_path / "_mamba_cpu.so"
    source.write_text("// kernels\n")
    library.write_bytes(b"")
    monkeypatch.setattr(cpu_kernels, "CSRC", tmp_path / "csrc")
    found = {cpu_kernels.PREBUILT: importlib.machinery.ModuleSpec(cpu_kernels.PREBUILT, None, origin=str(library))}
    monkeypatch.setattr(cpu_kernels.importlib.util, "find_spec", found.get)
    os.utime(source, (1000, 1000))
    os.utime(library, (2000, 2000))
    assert cpu_kernels.prebuilt_library() == library
    os.utime(source, (3000, 3000))  # the kernel was edited after the build: compile it on first use
    assert cpu_kernels.prebuilt_library() is None
    found.clear()  # not built ahead of time
    assert cpu_kernels.prebuilt_library() is None


def test_the_launch_example_builds_on_the_packaged_component():
    from torchx.specs.finder import get_component

    from mdaf_dist.launch import train

    example = get_component(f"{REPO / 'launch' / 'components.py'}:smoke")
    assert not example.validation_errors
    assert example.fn("train.max_steps=10", nproc_per_node=3) == train("configs/smoke.yaml", "train.max_steps=10", nproc_per_node=3)

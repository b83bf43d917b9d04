"""The npe2 manifest: discovered after install, valid, every contribution importable."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import npe2

REPO = Path(__file__).resolve().parents[1]


def test_manifest_is_discovered_and_matches_the_repo_file():
    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-esam")
    assert manifest.name == "napari-esam"
    on_disk = npe2.PluginManifest.from_file(REPO / "napari.yaml")
    assert manifest.contributions.commands == on_disk.contributions.commands


def test_every_command_is_importable():
    manifest = npe2.PluginManifest.from_file(REPO / "napari.yaml")
    assert len(manifest.contributions.commands) >= 6
    for cmd in manifest.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), cmd.id


def test_npe2_validate_with_imports():
    exe = Path(sys.executable).with_name("npe2")
    out = subprocess.run(
        [str(exe), "validate", "--imports", "napari-esam"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_plugin_discovery_does_not_import_torch():
    code = (
        "import sys, npe2; pm = npe2.PluginManager.instance(); pm.discover(); "
        "pm.get_manifest('napari-esam'); import napari_esam, napari_esam.cli; "
        "napari_esam.cli.build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

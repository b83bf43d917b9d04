"""Test set-up: headless Qt through Xvfb (pytest-xvfb) with the xcb platform."""

import os
import tempfile

# must happen before napari.settings is imported and before any QApplication exists
os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
# PyQt6: PySide6 6.12 on CPython 3.11 leaks references to None/True and aborts long suites
os.environ.setdefault("QT_API", "pyqt6")
os.environ.setdefault("NAPARI_CONFIG", os.path.join(tempfile.mkdtemp(), "settings.yaml"))
os.environ.setdefault("NAPARI_ESAM_CACHE", os.path.join(tempfile.mkdtemp(), "esam-cache"))


def pytest_collection_modifyitems(config, items):
    """Markers from where a test lives and what it uses: ``gui`` (tests/widgets, or a test that
    uses a napari viewer or qtbot), ``conformance`` (files named *conformance*), ``cluster``
    (files named *cluster*); ``slow`` is set on the tests themselves."""
    import pytest

    for item in items:
        path = item.path.as_posix()
        fixtures = getattr(item, "fixturenames", ())
        if "/tests/widgets/" in path or {"make_napari_viewer", "qtbot"} & set(fixtures):
            item.add_marker(pytest.mark.gui)
        if "conformance" in item.path.name:
            item.add_marker(pytest.mark.conformance)
        if "cluster" in item.path.name:
            item.add_marker(pytest.mark.cluster)

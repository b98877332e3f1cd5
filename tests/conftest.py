import os
from pathlib import Path

import pytest

DATA_DIR = Path(os.environ.get("EDGE_MFR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the shared real face data; tests needing it skip when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real face data not found at {DATA_DIR} (set EDGE_MFR_DATA to its path)")
    return DATA_DIR


@pytest.fixture(scope="session")
def lfw_dir(data_dir) -> Path:
    path = data_dir / "lfw"
    if not (path / "pairs.txt").is_file():
        pytest.skip(f"LFW view 2 not found at {path}")
    return path


@pytest.fixture(scope="module")
def model_package():
    """EDGE_MFR_TEST_MODEL (a package path) when set, else the bundled default model."""
    from edge_mfr.errors import ModelPackageError
    from edge_mfr.models.package import default_model, load_package

    if os.environ.get("EDGE_MFR_TEST_MODEL"):
        return load_package(os.environ["EDGE_MFR_TEST_MODEL"])
    try:
        return default_model()
    except ModelPackageError as exc:
        pytest.skip(f"no model package: {exc}")


@pytest.fixture()
def package_copy(tmp_path):
    """A copy of the bundled default model's files in tmp_path, to change without touching the bundled one."""
    import shutil

    from edge_mfr.models.package import default_model, load_package

    bundled = default_model()
    for path in bundled.files:
        shutil.copyfile(path, tmp_path / path.name)
    return load_package(tmp_path / bundled.onnx_path.name)

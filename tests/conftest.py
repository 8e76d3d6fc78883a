"""Fixtures shared by the training tests."""

import pytest

from tests.distributed import prepare_tiny_data


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A tiny prepared directory (synthetic rows through `mdaf prepare`), made once per run."""
    return prepare_tiny_data(tmp_path_factory.mktemp("tiny"))

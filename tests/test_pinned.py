"""The pinned torch / fbgemm-gpu / torchrec stack: checked at import, in one line; its known
harmless warnings muted, and only those."""

import logging
import subprocess
import sys
import warnings
from importlib import metadata

import pytest

from mdaf_dist import pinned
from mdaf_dist.errors import UserError


def test_this_environment_has_the_pinned_matrix():
    assert pinned.installed() == {"torch": "2.13.0", "fbgemm-gpu": "1.8.0", "torchrec": "1.8.0"}
    pinned.check_versions()


def test_a_mismatch_names_what_to_install(monkeypatch):
    found = {"torch": "2.12.1+cu121", "fbgemm-gpu": "1.8.0"}

    def version(name):
        if name not in found:
            raise metadata.PackageNotFoundError(name)
        return found[name]

    monkeypatch.setattr(pinned.metadata, "version", version)
    with pytest.raises(UserError) as error:
        pinned.check_versions()
    assert str(error.value) == (
        "mdaf_dist needs torch==2.13.0, fbgemm-gpu==1.8.0 (fbgemm-gpu-cpu==1.8.0 on CPU) and torchrec==1.8.0, "
        "found torch 2.12.1, torchrec missing: run `make install`, or pip install those pins (torchrec with --no-deps)"
    )


def test_the_cli_says_it_in_one_line(tmp_path):
    # a torchrec whose metadata says 1.7.0, first on the path
    (tmp_path / "torchrec-1.7.0.dist-info").mkdir()
    (tmp_path / "torchrec-1.7.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torchrec\nVersion: 1.7.0\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from mdaf_dist import cli; sys.exit(cli.main(['describe']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == (
        "mdaf describe: error: mdaf_dist needs torch==2.13.0, fbgemm-gpu==1.8.0 (fbgemm-gpu-cpu==1.8.0 on CPU) and torchrec==1.8.0, "
        "found torchrec 1.7.0: run `make install`, or pip install those pins (torchrec with --no-deps)\n"
    )


def test_the_known_warnings_are_muted_and_no_other(caplog):
    pinned.mute_known_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        pinned.mute_known_warnings()  # the filters of mute_known_warnings apply over "default"
        warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
        warnings.warn("`enforce_dtype` is deprecated. Please use `dtype` instead.", FutureWarning)
    assert [str(w.message) for w in caught] == ["`enforce_dtype` is deprecated. Please use `dtype` instead."]
    fx = logging.getLogger("torch.fx._symbolic_trace")
    with caplog.at_level(logging.WARNING):
        fx.warning("is_fx_tracing will return true for both fx.symbolic_trace and torch.export. Please use ...")
        fx.warning("another fx warning")
    assert [r.getMessage() for r in caplog.records] == ["another fx warning"]

"""Every wrong path a user can take through the CLI ends in exit code 2 and exactly one line on
stderr naming the file, key or value: no traceback. One table, run in-process through
`mdaf_dist.cli.main` (what the console script calls), on a tiny prepared directory and one
checkpoint of a one-epoch run."""

from __future__ import annotations

import bz2
import re
import shutil
from pathlib import Path
from typing import Dict, List

import pytest

from mdaf_dist.cli import main
from mdaf_dist.config import PrepareConfig
from mdaf_dist.data.layout import sample_files
from mdaf_dist.data.prepare import prepare
from mdaf_dist.distributed.env import distributed
from mdaf_dist.train.trainer import Trainer
from tests.distributed import prepare_tiny_data, tiny_config

TINY = ["model.embedding_dim=8", "model.history_length=8", "model.d_state=4", "train.device=cpu",
        "logging.tensorboard=false", "logging.progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> Dict[str, Path]:
    """The inputs of the cases: good ones (data, a checkpoint) and bad ones made from them."""
    root = tmp_path_factory.mktemp("bad_input")
    data = prepare_tiny_data(root)
    run = root / "run"
    with distributed("cpu") as env:
        Trainer(tiny_config(data, run, "train.max_steps=2"), env).fit()
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    p = {"root": root, "data": data, "run": run, "checkpoint": checkpoint, "raw": root / "raw.csv"}
    prepare(PrepareConfig(input=str(p["raw"]), out=str(root / "other_l"), samples_row_group=256), 4, progress=False)
    p["other_l"] = root / "other_l"

    p["file"] = root / "a_file.txt"
    p["file"].write_text("not a directory\n")
    (root / "bad.yaml").write_text("prepare: {neg_ratio: [1\n")
    (root / "list.yaml").write_text("- prepare\n- train\n")
    (root / "tabs.csv").write_text(p["raw"].read_text().replace(",", "\t"))
    (root / "cut.csv").write_bytes(bz2.compress(p["raw"].read_bytes())[:200])
    (root / "semicolons.csv").write_text(p["raw"].read_text().replace(",", ";"))
    (root / "not.parquet").write_text("user,label\n1,0\n")
    (root / "results.json").write_text('{"evaluations": [')

    for name in ("corrupt_meta", "damaged", "unfinished"):
        shutil.copytree(data, root / name)
    (root / "corrupt_meta" / "meta.json").write_text('{"vocab": ')
    part = sample_files(root / "damaged", "train")[0]
    part.write_bytes(part.read_bytes()[:-100])
    (root / "unfinished" / "meta.json").unlink()

    for name in ("no_distcp", "corrupt_trainer"):
        shutil.copytree(checkpoint, root / name)
    next((root / "no_distcp").glob("*.distcp")).unlink()
    (root / "corrupt_trainer" / "trainer.json").write_text("{")
    return p


def case(name: str, argv: List[str], expected: str, marks=()):
    """argv with {placeholders} from `paths`; the one line expected on stderr after "mdaf CMD:
    error: ", exact or (after "RE:") a regular expression."""
    return pytest.param(argv, expected, id=name, marks=marks)


CASES = [
    case("prepare: s3 without s3fs", ["prepare", "--input", "s3://bucket/UserBehavior.csv", "--out", "{root}/o"],
     "cannot read s3://bucket/UserBehavior.csv: Install s3fs to access S3"),
    case("prepare: gs without gcsfs", ["prepare", "--input", "gs://bucket/UserBehavior.csv", "--out", "{root}/o"],
     "cannot read gs://bucket/UserBehavior.csv: Please install gcsfs to access Google Storage"),
    case("prepare: https without its backend", ["prepare", "--input", "https://example.invalid/UserBehavior.csv", "--out", "{root}/o"],
     'cannot read https://example.invalid/UserBehavior.csv: HTTPFileSystem requires "requests" and "aiohttp" to be installed'),
    case("prepare: unknown protocol", ["prepare", "--input", "nosuch://x.csv", "--out", "{root}/o"],
     "cannot read nosuch://x.csv: Protocol not known: nosuch"),
    case("prepare: --out is a URI", ["prepare", "--input", "{raw}", "--out", "s3://bucket/out"],
     "prepare.out=s3://bucket/out: outputs are written to local directories only (a path or file:// URI)"),
    case("prepare: --out is a file", ["prepare", "--input", "{raw}", "--out", "{file}"],
     "prepare.out={file}: {file} is a file, not a directory"),
    case("prepare: --out under a file", ["prepare", "--input", "{raw}", "--out", "{file}/sub/dir"],
     "prepare.out={file}/sub/dir: {file} is a file, not a directory"),
    case("prepare: YAML that does not parse", ["prepare", "--config", "{root}/bad.yaml"],
     "{root}/bad.yaml is not valid YAML (line 2): did not find expected ',' or ']'"),
    case("prepare: YAML that is a list", ["prepare", "--config", "{root}/list.yaml"],
     "{root}/list.yaml must be a mapping of sections (prepare:, loader:, model:, ...), not a list"),
    case("prepare: max_bad_fraction < 0", ["prepare", "--input", "{raw}", "--out", "{root}/o", "prepare.max_bad_fraction=-0.1"],
     "prepare.max_bad_fraction must be in [0, 1], got -0.1"),
    case("prepare: max_bad_fraction nan", ["prepare", "--input", "{raw}", "--out", "{root}/o", "prepare.max_bad_fraction=nan"],
     "prepare.max_bad_fraction must be in [0, 1], got nan"),
    case("prepare: tab-separated", ["prepare", "--input", "{root}/tabs.csv", "--out", "{root}/o", "--quiet"],
     r"RE:{root}/tabs.csv: .*; first bad line 1 \(field_count\): .*; its fields are separated by tabs: the input must be comma-separated"),
    case("prepare: semicolon-separated", ["prepare", "--input", "{root}/semicolons.csv", "--out", "{root}/o", "--quiet", "prepare.max_bad_fraction=1"],
     r"RE:{root}/semicolons.csv: no data rows among \d+ lines; .*its fields are separated by semicolons: the input must be comma-separated"),
    case("prepare: truncated bzip2", ["prepare", "--input", "{root}/cut.csv", "--out", "{root}/o", "--quiet"],
     "cannot read {root}/cut.csv: Compressed file ended before the end-of-stream marker was reached"),
    case("train: output_dir is a file", ["train", "data_dir={data}", "output_dir={file}", *TINY],
     "output_dir={file}: {file} is a file, not a directory"),
    case("train: output_dir under a file", ["train", "data_dir={data}", "output_dir={file}/run", *TINY],
     "output_dir={file}/run: {file} is a file, not a directory"),
    case("train: loader.batch_size=0", ["train", "data_dir={data}", "output_dir={root}/r", "loader.batch_size=0", *TINY],
     "loader.batch_size must be >= 1, got 0"),
    case("train: YAML that is a list", ["train", "--config", "{root}/list.yaml"],
     "{root}/list.yaml must be a mapping of sections (prepare:, loader:, model:, ...), not a list"),
    case("train: corrupt meta.json", ["train", "data_dir={root}/corrupt_meta", "output_dir={root}/r", *TINY],
     "RE:{root}/corrupt_meta/meta.json is not valid JSON \\(prepared data\\): .*"),
    case("train: a data file cut short", ["train", "data_dir={root}/damaged", "output_dir={root}/r", *TINY],
     r"RE:{root}/damaged is a damaged prepared data directory: samples/train/part-00000-00000.parquet has \d+ bytes, its manifest says \d+"),
    case("train: prepare did not finish", ["train", "data_dir={root}/unfinished", "output_dir={root}/r", *TINY],
     "{root}/unfinished is not a prepared data directory (no meta.json); run `mdaf prepare` first"),
    case("predict: --out is a file", ["predict", "--checkpoint", "{checkpoint}", "--out", "{file}"],
     "--out={file}: {file} is a file, not a directory"),
    case("predict: --data of another history_length", ["predict", "--checkpoint", "{checkpoint}", "--data", "{other_l}", "--out", "{root}/p"],
     "RE:model.history_length=8 but {other_l} was prepared with history_length=4 .*"),
    case("evaluate: corrupt trainer.json", ["evaluate", "--checkpoint", "{root}/corrupt_trainer"],
     "RE:{root}/corrupt_trainer is a damaged checkpoint: trainer.json has 1 bytes, its manifest says \\d+"),
    case("evaluate: a .distcp missing", ["evaluate", "--checkpoint", "{root}/no_distcp"],
     "RE:{root}/no_distcp is not a complete checkpoint: __\\d+_\\d+\\.distcp is missing"),
    case("analyze: --predictions not Parquet", ["analyze", "--predictions", "{root}/not.parquet"],
     "RE:{root}/not.parquet is not a Parquet file \\(.*\\): give predictions written by `mdaf predict`"),
    case("analyze: --out is a file", ["analyze", "--predictions", "{root}/not.parquet", "--out", "{file}"],
     "--out={file}: {file} is a file, not a directory"),
    case("analyze: corrupt results.json", ["analyze", "--checkpoint", "{checkpoint}", "--results", "{root}/results.json", "--out", "{root}/a"],
     "RE:{root}/results.json is not valid JSON \\(a run's results.json\\): .*"),
]


@pytest.mark.parametrize("argv, expected", CASES)
def test_bad_input_is_exit_2_and_one_line(paths, capsys, argv, expected):
    names = {name: str(path) for name, path in paths.items()}
    code = main([arg.format(**names) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = f"mdaf {argv[0]}: error: "
    assert lines[0].startswith(prefix)
    message = lines[0][len(prefix):]
    if expected.startswith("RE:"):
        assert re.fullmatch(expected[3:].format(**{k: re.escape(v) for k, v in names.items()}), message), message
    else:
        assert message == expected.format(**names)

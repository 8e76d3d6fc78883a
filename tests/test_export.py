"""`mdaf export` and `mdaf predict --model`: the exported program scores like `mdaf predict` from
the checkpoint, in a fresh process without torchrec or a process group; a 2-rank row-wise
checkpoint exports the weights its shards hold; int8 tables are TorchRec's quantized rows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mdaf_dist.analysis.predict import prediction_metadata, read_predictions
from mdaf_dist.cli import main
from mdaf_dist.data.batch import CATEGORY, ITEM, USER
from mdaf_dist.distributed.env import distributed
from mdaf_dist.models.embeddings import EMBEDDINGS_KEY
from mdaf_dist.serving.export import export
from mdaf_dist.serving.inputs import split_inputs
from mdaf_dist.serving.load import WEIGHTS_FILE, export_info
from mdaf_dist.train.evaluate import checkpoint_config, load_model, resolve_checkpoint
from mdaf_dist.train.trainer import Trainer
from tests.distributed import run_ranks, tiny_config

TABLES = (USER, ITEM, CATEGORY)


@pytest.fixture(scope="module")
def run(tiny_data_dir, tmp_path_factory):
    """A tiny MDAF trained a few steps on one rank: its checkpoints folder, its export and its
validation predictions from the checkpoint."""
    root = tmp_path_factory.mktemp("export")
    with distributed("cpu") as env:
        Trainer(tiny_config(tiny_data_dir, root / "run", "train.max_steps=6"), env).fit()
    checkpoints = root / "run" / "checkpoints"
    assert main(["export", "--checkpoint", str(checkpoints), "--out", str(root / "export")]) == 0
    assert main(["predict", "--checkpoint", str(checkpoints), "--out", str(root / "ckpt.parquet")]) == 0
    return checkpoints, root / "export", read_predictions(root / "ckpt.parquet")


def test_predict_with_the_export_equals_predict_from_the_checkpoint(run, tmp_path):
    _, exported, from_checkpoint = run
    assert main(["predict", "--model", str(exported), "--out", str(tmp_path / "export.parquet")]) == 0
    from_export = read_predictions(tmp_path / "export.parquet")
    assert from_export.num_rows == from_checkpoint.num_rows > 0
    for name in ("user", "item", "label", "hist_len"):
        assert from_export.column(name).equals(from_checkpoint.column(name))
    for name in ("probability", "logit", "gate"):
        np.testing.assert_allclose(from_export.column(name).to_numpy(), from_checkpoint.column(name).to_numpy(), rtol=0, atol=1e-6)


SCORE_IN_A_FRESH_PROCESS = """
import sys, torch
from mdaf_dist.serving.load import load_export
inputs = torch.load(sys.argv[2])
probabilities = load_export(sys.argv[1])(**inputs)["probability"]
torch.save(probabilities, sys.argv[3])
assert not torch.distributed.is_initialized()
print(sorted(name for name in sys.modules if name.startswith(("torchrec", "fbgemm_gpu", "mdaf_dist.models", "mdaf_dist.distributed", "mdaf_dist.train"))))
"""


def test_the_export_scores_in_a_fresh_process_without_torchrec_or_a_process_group(run, tmp_path):
    checkpoints, exported, from_checkpoint = run
    cfg = checkpoint_config(resolve_checkpoint(str(checkpoints)))
    batches = [inputs for _, inputs in split_inputs(cfg.data_dir, "valid", cfg.loader, cfg.model.history_length)]
    inputs = {name: torch.cat([b[name] for b in batches]) for name in batches[0]}
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run(
        [sys.executable, "-c", SCORE_IN_A_FRESH_PROCESS, str(exported), str(tmp_path / "inputs.pt"), str(tmp_path / "p.pt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    probabilities = torch.load(tmp_path / "p.pt").numpy()
    np.testing.assert_allclose(probabilities, from_checkpoint.column("probability").to_numpy(), rtol=0, atol=1e-6)


def _train_row_wise(data_dir, out_dir):
    """2 ranks, every table row-wise: this rank's trained rows of each table, by global row."""
    with distributed("cpu") as env:
        trainer = Trainer(tiny_config(data_dir, out_dir, "train.max_steps=4", "sharding.default=row_wise"), env)
        trainer.fit()
        state = trainer.model.state_dict()
        shards = {}
        for table in TABLES:
            (shard,) = state[f"{EMBEDDINGS_KEY}.{table}.weight"].local_shards()
            shards[table] = (shard.metadata.shard_offsets[0], shard.tensor.clone())
        return shards


def test_a_two_rank_row_wise_checkpoint_exports_the_weights_of_its_shards(tiny_data_dir, tmp_path):
    shards_by_rank = run_ranks(2, _train_row_wise, tiny_data_dir, tmp_path / "run")
    checkpoint = resolve_checkpoint(str(tmp_path / "run" / "checkpoints"))
    export(str(checkpoint), str(tmp_path / "export"))
    weights = load_file(str(tmp_path / "export" / WEIGHTS_FILE))
    # the same checkpoint loaded by one rank (DCP reshards to one table-wise shard)
    cfg = checkpoint_config(checkpoint)
    with distributed("cpu") as env:
        one_rank = load_model(checkpoint, cfg, env).state_dict()
    for table in TABLES:
        key = f"{EMBEDDINGS_KEY}.{table}.weight"
        rows = sum(shards[table][1].shape[0] for shards in shards_by_rank)
        assert weights[key].shape[0] == rows and all(shards[table][1].numel() for shards in shards_by_rank)
        for shards in shards_by_rank:
            start, values = shards[table]
            assert torch.equal(weights[key][start : start + values.shape[0]], values)
        (whole,) = one_rank[key].local_shards()
        assert torch.equal(weights[key], whole.tensor)
    dense = {key: value for key, value in one_rank.items() if not key.startswith(EMBEDDINGS_KEY)}
    assert dense and all(torch.equal(weights[key], value) for key, value in dense.items())


def test_int8_tables_are_torchrecs_quantized_rows_and_report_size_and_auc(run, tmp_path, capsys):
    from torchrec import EmbeddingCollection, EmbeddingConfig
    from torchrec.inference.modules import quantize_inference_model
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    checkpoints, exported, _ = run
    assert main(["export", "--checkpoint", str(checkpoints), "--out", str(tmp_path / "int8"), "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    int8, float32 = load_file(str(tmp_path / "int8" / WEIGHTS_FILE)), load_file(str(exported / WEIGHTS_FILE))
    # TorchRec's own quantized module, looking up every row, against the rows the export dequantizes
    sizes = {t: float32[f"{EMBEDDINGS_KEY}.{t}.weight"].shape[0] for t in TABLES}
    collection = EmbeddingCollection(tables=[EmbeddingConfig(name=t, num_embeddings=n, embedding_dim=8, feature_names=[t]) for t, n in sizes.items()])
    collection.load_state_dict({f"embeddings.{t}.weight": float32[f"{EMBEDDINGS_KEY}.{t}.weight"] for t in TABLES})
    holder = torch.nn.Module()
    holder.embeddings = collection
    quantized = quantize_inference_model(holder).embeddings
    # every key needs the same batch size: each table's rows, repeated up to the largest table
    ids = {t: torch.arange(max(sizes.values())) % sizes[t] for t in TABLES}
    batch = max(sizes.values())
    lookup = quantized(KeyedJaggedTensor(keys=list(TABLES), values=torch.cat([ids[t] for t in TABLES]), lengths=torch.ones(batch * len(TABLES), dtype=torch.int64)))
    float_bytes = int8_bytes = 0
    for t in TABLES:
        key = f"{EMBEDDINGS_KEY}.{t}.weight"
        rows, scale, bias = int8[key], int8[f"{key}_qscale"], int8[f"{key}_qbias"]
        assert rows.dtype == torch.uint8 and scale.dtype == bias.dtype == torch.float16
        dequantized = rows.float() * scale.float().unsqueeze(1) + bias.float().unsqueeze(1)
        assert torch.equal(dequantized[ids[t]], lookup[t].values())
        assert (dequantized - float32[key]).abs().max() <= 0.5 * scale.float().max() + 1e-3
        float_bytes += float32[key].numel() * 4
        int8_bytes += rows.numel() + 2 * scale.numel() * 2
    assert f"int8 tables: {int8_bytes:,} bytes ({int8_bytes / float_bytes:.3f} of float32's {float_bytes:,}); validation AUC " in printed
    # the exported int8 program scores the validation split as the export measured it
    assert main(["predict", "--model", str(tmp_path / "int8"), "--out", str(tmp_path / "p.parquet")]) == 0
    assert prediction_metadata(tmp_path / "p.parquet")["metrics"]["auc"] == pytest.approx(export_info(tmp_path / "int8")["valid_auc"]["int8"], abs=1e-12)


def test_bad_input_is_one_line(run, tmp_path, capsys):
    _, exported, _ = run
    assert main(["predict", "--model", str(tmp_path), "--out", str(tmp_path / "p.parquet")]) == 2
    assert capsys.readouterr().err.strip() == f"mdaf predict: error: {tmp_path} is not a complete export: it has no manifest.json (written last, so its writer did not finish)"
    assert main(["predict", "--model", str(exported), "--out", str(tmp_path / "p.parquet"), "train.device=cpu"]) == 2
    assert capsys.readouterr().err.strip() == "mdaf predict: error: overrides ['train.device=cpu'] apply to a checkpoint's config, not to an export"
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip() == f"mdaf export: error: no checkpoint at {tmp_path / 'nope'}: the path does not exist"

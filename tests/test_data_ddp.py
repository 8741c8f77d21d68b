"""A real 2-process DDP run on CPU (gloo) over the FFCV loader.

The test runs this file as a script: Lightning's ``ddp`` strategy re-launches it for rank 1,
exactly as it does for ``python -m app fit``. Each sample has its own class, so the labels a rank
trains on identify the samples it saw.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
N = 64
EPOCHS = 3


def run(out: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from data.datamodule import FFCVImageDataModule
    from data.prepare import Preparation

    class Record(pl.LightningModule):
        def __init__(self, num_classes: int, side: int):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, num_classes))
            self.train_seen: dict[int, list[int]] = {}
            self.val_seen: dict[int, list[int]] = {}

        def training_step(self, batch, idx):
            x, y = batch
            self.train_seen.setdefault(self.current_epoch, []).extend(y.tolist())
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, idx):
            if not self.trainer.sanity_checking:
                self.val_seen.setdefault(self.current_epoch, []).extend(batch[1].tolist())

        def on_train_end(self):
            rank = self.trainer.global_rank
            (out / f"rank{rank}.json").write_text(json.dumps({
                "train": self.train_seen, "val": self.val_seen,
                "world": self.trainer.world_size,
                "sampler": type(self.trainer.train_dataloader).__name__}))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    # Rank 0 prepares the missing betons (prepare_data), the other rank waits at the barrier.
    dm = FFCVImageDataModule(source="synthetic", batch_size=8, num_workers=1,
                             prepare=Preparation(write_mode="raw"),
                             source_options={"num_classes": N, "num_samples": N,
                                             "image_size": 8})
    model = Record(dm.num_classes, dm.image_size)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=1)
    trainer.fit(model, dm)


@pytest.mark.slow
def test_ddp_ranks_split_each_epoch_and_reshuffle(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SELFNORM_DATA_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["sampler"] == "FFCVLoader" for r in ranks)
    epochs = [str(e) for e in range(EPOCHS)]
    for e in epochs:
        a, b = ranks[0]["train"][e], ranks[1]["train"][e]
        assert len(a) == len(b) == N // 2
        assert not set(a) & set(b), "ranks saw the same samples"
        assert sorted(a + b) == list(range(N)), "the ranks together did not cover the epoch"
        va, vb = ranks[0]["val"][e], ranks[1]["val"][e]
        assert not set(va) & set(vb) and sorted(va + vb) == list(range(N))
    for r in ranks:
        orders = [tuple(r["train"][e]) for e in epochs]
        assert len(set(orders)) == EPOCHS, "the order did not change between epochs"
        assert len({frozenset(o) for o in orders}) > 1, "each rank kept the same shard"


if __name__ == "__main__":
    run(Path(sys.argv[1]))

"""Training on GPUs (marked cuda, skipped without one): a training step without host syncs,
and NCCL DDP with equal λ gradients on every rank and no CUDA context of one rank on another's
GPU."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.cuda
@needs_gpu
def test_a_training_step_makes_no_host_sync(tmp_path):
    """Forward, the loss, the metrics, the logging, Mixup and backward of ImageClassifier on the
    GPU, in bf16 and channels_last as the ImageNet configs train: no host sync."""
    from models.training.mixup import Mixup
    from models.training.module import ImageClassifier

    class Strict(ImageClassifier):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step < 2:  # warm-up: lazy initialisations may sync once
                return super().training_step(batch, batch_idx)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return super().training_step(batch, batch_idx)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        def backward(self, loss, *args, **kwargs):
            if self.trainer.global_step >= 2:
                torch.cuda.set_sync_debug_mode("error")
            try:
                super().backward(loss, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    torch.manual_seed(0)
    model = Strict(model="conv_mobilenet_v1", num_classes=10, act="sselu", eps=0.06,
                   central=True, trainable_lambda=True, weight_centralization=True,
                   channels_last=True, model_kwargs={"width_mult": 0.25})
    x = torch.randn(64, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device="cuda")
    data = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=4,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Mixup(alpha=0.7)])
    trainer.fit(model, data)
    assert trainer.global_step == 4


DDP_SCRIPT = '''
import os, sys, torch, lightning as L
import torch.distributed as dist
from data.datamodule import FFCVImageDataModule
from data.prepare import Preparation
from models.training.module import ImageClassifier

class Check(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        lams = torch.stack([m.lam.grad for m in pl_module.modules() if hasattr(m, "lam")
                            and isinstance(m.lam, torch.nn.Parameter)])
        every = [torch.empty_like(lams) for _ in range(trainer.world_size)]
        dist.all_gather(every, lams)
        if trainer.is_global_zero:
            same = all(torch.equal(every[0], e) for e in every[1:])
            print(f"LAMBDA_GRADS_EQUAL {same}", flush=True)
    def on_train_end(self, trainer, pl_module):
        print(f"PID {trainer.global_rank} {os.getpid()} {torch.cuda.current_device()}",
              flush=True)
        dist.barrier()
        if trainer.is_global_zero:
            os.system("nvidia-smi --query-compute-apps=pid,gpu_uuid --format=csv,noheader "
                      "> apps.csv; nvidia-smi --query-gpu=index,uuid --format=csv,noheader "
                      "> gpus.csv")
        dist.barrier()

dm = FFCVImageDataModule(source="synthetic", batch_size=16, resolution=32,
                         source_options={"num_classes": 4, "num_samples": 256, "image_size": 32},
                         prepare=Preparation(write_mode="raw"))
model = ImageClassifier(model="conv_mobilenet_v1", num_classes=4, act="sselu", eps=0.06,
                        trainable_lambda=True, channels_last=True,
                        model_kwargs={"width_mult": 0.25})
trainer = L.Trainer(accelerator="gpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, use_distributed_sampler=False,
                    num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Check()])
trainer.fit(model, dm)
'''


@pytest.mark.cuda
@needs_two_gpus
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs nvidia-smi")
def test_nccl_ddp_has_equal_lambda_grads_and_no_context_on_the_other_gpu(tmp_path):
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SELFNORM_DATA_DIR": str(tmp_path / "data"),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0,1")}
    done = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.findall(r"LAMBDA_GRADS_EQUAL (\w+)", done.stdout) == ["True"] * 3, done.stdout
    ranks = {int(r): (int(pid), int(dev)) for r, pid, dev in
             re.findall(r"PID (\d) (\d+) (\d+)", done.stdout)}
    uuid_of = dict(line.split(", ") for line in
                   (tmp_path / "gpus.csv").read_text().strip().splitlines())
    apps = [line.split(", ") for line in (tmp_path / "apps.csv").read_text().strip().splitlines()]
    for rank, (pid, device) in ranks.items():
        gpus = {uuid for p, uuid in apps if int(p) == pid}
        assert gpus == {uuid_of[str(device)]}, (rank, gpus)  # its own GPU only

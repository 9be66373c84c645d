"""Trains the toy model with checkpoints; run twice after a SIGKILL, it must finish identically.

Usage: python _resume_script.py OUT_DIR RESULT_FILE [KILL_AT]

With ``KILL_AT`` the run prints that step and then waits (to be killed there), so the kill lands
at that step however late the killing process gets to run.
"""

from __future__ import annotations

import sys
import time

import torch
from _toy import ToyModel, ToyReader, make_optimizers

from recis_train import Hook, Trainer, TrainingArguments, seed_everything

NUM_ROWS, BATCH = 1_200, 20


class PrintStep(Hook):
    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at

    def on_step_end(self, trainer, logs):
        print(f"step {trainer.global_step}", flush=True)
        if trainer.global_step == self.kill_at:
            time.sleep(600)  # the test kills the process here


def main(out_dir: str, result_file: str, kill_at: int | None = None) -> None:
    seed_everything(0)
    model = ToyModel(NUM_ROWS)
    dense, sparse = make_optimizers(model)
    schedule = torch.optim.lr_scheduler.StepLR(dense, step_size=7, gamma=0.9)
    args = TrainingArguments(
        output_dir=out_dir,
        epochs=2,
        save_every=5,
        max_to_keep=2,
        gradient_accumulation_steps=2,
        grad_clip=1.0,
        device="cpu",
        deterministic=True,
    )
    trainer = Trainer(
        model,
        args,
        train_data=ToyReader(NUM_ROWS, BATCH),
        dense_optimizer=dense,
        sparse_optimizer=sparse,
        lr_schedulers=[schedule],
        hooks=[PrintStep(kill_at)],
    )
    trainer.train()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, result_file)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)

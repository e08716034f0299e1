"""Config blocks every experiment shares: the optimizer, evaluation and test hooks.

Each function returns an ml_collections.ConfigDict whose fields are commented here, once.
"""
import ml_collections


def optim(*, lr, warmup_steps, weight_decay, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
          clip_norm=1.0, grad_accum=1) -> ml_collections.ConfigDict:
    """AdamW with linear warm-up and cosine decay (train/optim.py: make_optimizer)."""
    c = ml_collections.ConfigDict()
    c.lr = lr                          # peak learning rate
    c.warmup_steps = warmup_steps      # linear warm-up steps (may be a FieldReference)
    c.min_lr_ratio = min_lr_ratio      # cosine decays to lr × this
    c.b1 = b1                          # AdamW β1
    c.b2 = b2                          # AdamW β2
    c.eps = eps                        # AdamW ε
    c.weight_decay = weight_decay      # decoupled weight decay
    c.clip_norm = clip_norm            # global-norm gradient clipping (None: off)
    c.grad_accum = grad_accum          # micro-batches per step (batch_size % it == 0)
    return c


def evaluation(num_batches: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_batches = num_batches        # validation batches per evaluation
    return c


def debug() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.sigkill_at_step = -1             # tests: SIGKILL the process after this step
    c.sigterm_at_step = -1             # tests: SIGTERM the process after this step
    c.signal_process = -1              # tests: the process both go to (-1: every process)
    c.nan_at_step = -1                 # tests: poison the loss at this step
    return c

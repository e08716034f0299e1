"""A small frozen encoder for DKVB (Träuble et al. 2023), fitted on a dataset other than the one
DKVB's values learn from, by the shared trainer.

    mnemax-train --config dkvb_encoder:ae --workdir runs/ae_mnist
    mnemax-train --config dkvb_encoder:cnn:cifar100 --workdir runs/cnn_cifar100 \
        --config.data.data_dir=/path/to/tfds

The variant is KIND[:DATASET]: KIND "ae" (a convolutional autoencoder fitted by reconstruction,
without labels: its data carry none) or "cnn" (a small CNN pre-trained with labels, the
ablation); DATASET one of train/data/images.py's ("mnist_8x8", the default, "cifar10",
"cifar100"). Adam at a constant 3e-3, batch 128, `epochs` passes over the data
(`num_steps` = epochs · N // batch_size). `eval/class_incremental.py` fits its encoders with this
config (`fit_encoder`) and embeds with the run's parameters (models/encoders.py).
"""
import ml_collections

from models import encoders
from train.configs import common
from train.data import images, pipeline

KINDS = ("ae", "cnn")
IMAGE_SHAPES = {"mnist_8x8": (8, 8), "cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}
NUM_CLASSES = {"mnist_8x8": 10, "cifar10": 10, "cifar100": 100}
TRAIN_IMAGES = {"mnist_8x8": 5000, "cifar10": 50_000, "cifar100": 50_000}


def get_config(arg: str = "ae") -> ml_collections.ConfigDict:
    kind, _, dataset = arg.partition(":")
    dataset = dataset or "mnist_8x8"
    if kind not in KINDS:
        raise ValueError(f"config variant {arg!r} is not allowed; the kind must be one of {KINDS}")
    if dataset not in images.DATASETS:
        raise ValueError(f"config variant {arg!r} is not allowed; the dataset must be one of "
                         f"{images.DATASETS}")
    c = ml_collections.ConfigDict()
    c.name = f"dkvb_encoder_{kind}_{dataset}"    # run name (logs, progress bar)
    c.seed = 0                                   # one seed → one run, bit for bit on CPU
    c.batch_size = 128                           # images per step
    c.num_steps = epochs_to_steps(15, dataset, c.batch_size)   # 15 passes over the data
    c.seq_len = 1                                # one row per image (tokens/s counts images)
    c.input_shape = IMAGE_SHAPES[dataset]        # the model's input [H, W(, C)] at init
    c.checkpoint_every = 0                       # 0: only at the end
    c.keep_checkpoints = 1
    c.eval_every = 0                             # 0: never
    c.log_every = 20                             # steps between metrics.jsonl rows
    c.progress = True
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})

    c.model = ml_collections.ConfigDict()        # models/encoders.py
    c.model.family = "autoencoder" if kind == "ae" else "cnn"   # key into trainer.MODELS
    c.model.embed_dim = 64                       # the embedding DKVB reads
    c.model.width = 32                           # conv channels (the second conv: twice)
    if kind == "ae":
        c.model.image_hw = IMAGE_SHAPES[dataset][:2]
        c.model.channels = (IMAGE_SHAPES[dataset] + (1,))[2]
    else:
        c.model.num_classes = NUM_CLASSES[dataset]   # the pre-training head (dropped after)

    c.data = pipeline.default_data_config("images")
    c.data.dataset = dataset
    # The autoencoder's records carry no labels at all (encoders.SUPERVISION).
    c.data.with_labels = encoders.SUPERVISION[kind] == "labels"
    c.data.shuffle = True

    c.optim = common.optim(lr=3e-3, warmup_steps=0, weight_decay=0.0, b2=0.999, clip_norm=None)
    c.optim.schedule = "constant"                # Adam at a constant rate
    c.objective = "reconstruct" if kind == "ae" else "classify"   # train/objectives/encoders.py
    c.eval = common.evaluation(1)
    c.debug = common.debug()
    c.profile_steps = ()                     # (FIRST, LAST): trace those steps (WORKDIR/profile)
    return c


def epochs_to_steps(epochs: int, dataset: str, batch_size: int, *, examples: int = 0) -> int:
    """Optimizer steps for `epochs` passes over `examples` images (0: the dataset's train
    split) in batches of `batch_size` (the last partial batch of a pass left out)."""
    n = examples or TRAIN_IMAGES[dataset]
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be a positive int")
    return epochs * max(1, n // batch_size)

"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", Section 3) as data.

One example is a token sequence x of length T + 1 (inputs = x[:T], targets = x[1:]):

    k_1 v_1 k_2 v_2 ... k_P v_P | f f k_a v_a f f f f k_b v_b f ... f
    \\_______ P pairs ________/   \\__ query region: Q (key, value) slots among fill tokens __/

* keys are P distinct ids drawn from `key_range` = [lo, hi), values P distinct ids from the
  disjoint `value_range`; `fill_token` pads the query region (Zoology uses 0 there too);
* the query region has (T + 1 - 2P) // 2 two-token slots; Q of them, chosen uniformly, hold a
  queried key followed by its value (the queried keys are Q distinct keys of the context, in a
  random order). Zoology draws the gaps from a power law; uniform slots keep every query
  distance equally likely;
* `targets` is `inputs` shifted by one (next-token prediction, like every other task here), and
  `weights` is 1 exactly at the answer positions: t where inputs[t] is a queried key, so that
  targets[t] is the value paired with that key earlier in the sequence. A causal model cannot
  copy the answer: the value sits at t + 1.

`mqar_example(rng, ...)` is the pure generator. Example i of split s under seed S is drawn with
`index_rng(S, s, i)`, so a TFDS build (`Mqar`, array_record) and the on-the-fly `MqarSource`
hold the same records, and any one example can be regenerated alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from train.data import catalog

SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 0, "test": 1}


def _check_range(field: str, r: Sequence[int]) -> tuple[int, int]:
    if len(r) != 2 or not 0 <= int(r[0]) < int(r[1]):
        raise ValueError(f"{field}={tuple(r)} must be a pair (lo, hi) with 0 <= lo < hi")
    return int(r[0]), int(r[1])


def validate(
    *,
    seq_len: int,
    num_pairs: int,
    num_queries: int,
    key_range: Sequence[int],
    value_range: Sequence[int],
    fill_token: int,
) -> None:
    """ValueError naming the field when an MQAR layout is impossible."""
    klo, khi = _check_range("key_range", key_range)
    vlo, vhi = _check_range("value_range", value_range)
    if num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs} must be >= 1")
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"num_queries={num_queries} must be in 1..num_pairs={num_pairs}")
    if khi - klo < num_pairs:
        raise ValueError(f"key_range={(klo, khi)} holds fewer than num_pairs={num_pairs} keys")
    if vhi - vlo < num_pairs:
        raise ValueError(f"value_range={(vlo, vhi)} holds fewer than num_pairs={num_pairs} values")
    if klo < vhi and vlo < khi:
        raise ValueError(f"key_range={(klo, khi)} and value_range={(vlo, vhi)} must be disjoint")
    if klo <= fill_token < khi or vlo <= fill_token < vhi:
        raise ValueError(f"fill_token={fill_token} must lie outside key_range and value_range")
    slots = (seq_len + 1 - 2 * num_pairs) // 2
    if slots < num_queries:
        raise ValueError(
            f"seq_len={seq_len} is too short for num_pairs={num_pairs} and "
            f"num_queries={num_queries}; need seq_len >= {2 * num_pairs + 2 * num_queries - 1}"
        )


def mqar_example(
    rng: np.random.Generator,
    *,
    seq_len: int,
    num_pairs: int,
    num_queries: int,
    key_range: Sequence[int] = (1, 128),
    value_range: Sequence[int] = (128, 256),
    fill_token: int = 0,
) -> dict[str, np.ndarray]:
    """One MQAR example: inputs int32 [T], targets int32 [T], weights float32 [T] (T = seq_len)."""
    validate(
        seq_len=seq_len,
        num_pairs=num_pairs,
        num_queries=num_queries,
        key_range=key_range,
        value_range=value_range,
        fill_token=fill_token,
    )
    P, Q = num_pairs, num_queries
    keys = rng.choice(np.arange(key_range[0], key_range[1]), size=P, replace=False)
    values = rng.choice(np.arange(value_range[0], value_range[1]), size=P, replace=False)
    x = np.full(seq_len + 1, fill_token, dtype=np.int32)
    x[0 : 2 * P : 2] = keys
    x[1 : 2 * P : 2] = values
    num_slots = (seq_len + 1 - 2 * P) // 2
    slots = np.sort(rng.choice(num_slots, size=Q, replace=False))
    which = rng.permutation(P)[:Q]  # queried pairs, in query order
    query_pos = 2 * P + 2 * slots
    x[query_pos] = keys[which]
    x[query_pos + 1] = values[which]
    weights = np.zeros(seq_len, dtype=np.float32)
    weights[query_pos] = 1.0
    return {"inputs": x[:-1], "targets": x[1:].copy(), "weights": weights}


def index_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split` under `seed` (independent streams)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"split={split!r} is not an MQAR split; allowed: {SPLITS}")
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), _SPLIT_CODE[split], int(index)])
    )


@dataclasses.dataclass(frozen=True)
class MqarSpec:
    """Everything that fixes an MQAR dataset's content (the TFDS config name is made from it)."""

    seq_len: int = 64  # T: tokens per example (inputs and targets)
    num_pairs: int = 8  # P: key-value pairs in the context
    num_queries: int = 8  # Q: queries after the context, Q <= P
    key_range: tuple[int, int] = (1, 128)  # keys are ids in [lo, hi)
    value_range: tuple[int, int] = (128, 256)  # values are ids in [lo, hi), disjoint from keys
    fill_token: int = 0  # id between queries, outside both ranges
    num_train: int = 2048  # examples in split "train"
    num_test: int = 256  # examples in split "test"
    seed: int = 0  # content seed (not the shuffle seed)

    def __post_init__(self):
        object.__setattr__(self, "key_range", tuple(int(v) for v in self.key_range))
        object.__setattr__(self, "value_range", tuple(int(v) for v in self.value_range))
        validate(
            seq_len=self.seq_len,
            num_pairs=self.num_pairs,
            num_queries=self.num_queries,
            key_range=self.key_range,
            value_range=self.value_range,
            fill_token=self.fill_token,
        )
        for field in ("num_train", "num_test"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be >= 1")

    @property
    def config_name(self) -> str:
        return (
            f"t{self.seq_len}_p{self.num_pairs}_q{self.num_queries}"
            f"_k{self.key_range[0]}-{self.key_range[1]}_v{self.value_range[0]}-{self.value_range[1]}"
            f"_f{self.fill_token}_n{self.num_train}-{self.num_test}_s{self.seed}"
        )

    def num_examples(self, split: str) -> int:
        if split not in _SPLIT_CODE:
            raise ValueError(f"split={split!r} is not an MQAR split; allowed: {SPLITS}")
        return self.num_train if split == "train" else self.num_test

    def example(self, split: str, index: int) -> dict[str, np.ndarray]:
        """Example `index` of `split`: the same record the TFDS build stores at that index."""
        if not 0 <= index < self.num_examples(split):
            raise IndexError(f"index={index} out of range for split {split!r}")
        return mqar_example(
            index_rng(self.seed, split, index),
            seq_len=self.seq_len,
            num_pairs=self.num_pairs,
            num_queries=self.num_queries,
            key_range=self.key_range,
            value_range=self.value_range,
            fill_token=self.fill_token,
        )


class MqarSource:
    """In-memory random-access MQAR source: example i is generated when read (picklable)."""

    def __init__(self, spec: MqarSpec, split: str):
        self._spec = spec
        self._split = split
        self._len = spec.num_examples(split)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._spec.example(self._split, int(index))

    def __repr__(self) -> str:
        return f"MqarSource({self._spec.config_name}, split={self._split!r})"


# ---------------------------------------------------------------------------------------------
# TFDS builder (array_record; TensorFlow not needed).


@dataclasses.dataclass(eq=False)
class MqarConfig(tfds.core.BuilderConfig):
    """TFDS config carrying an `MqarSpec`; its name is `spec.config_name`."""

    spec: MqarSpec = dataclasses.field(default_factory=MqarSpec)


class Mqar(catalog.LocalBuilder):
    """MQAR as a TFDS dataset "mqar": splits train/test, records {inputs, targets, weights}.

    Build with `build(spec, data_dir)`; any `MqarSpec` is accepted as a custom config (TFDS logs
    "Using custom data configuration"), stored under data_dir/mqar/CONFIG_NAME/1.0.0.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[MqarConfig]] = [
        MqarConfig(name=MqarSpec().config_name, spec=MqarSpec())
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        T = self.builder_config.spec.seq_len
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(T,), dtype=np.int32),
                    "targets": tfds.features.Tensor(shape=(T,), dtype=np.int32),
                    "weights": tfds.features.Tensor(shape=(T,), dtype=np.float32),
                }
            ),
            # Record i must be example i of index_rng(seed, split, i).
            disable_shuffling=True,
            citation="Arora et al. 2023, Zoology: Measuring and Improving Recall in Efficient "
            "Language Models, arXiv:2312.04927",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        spec = self.builder_config.spec
        for i in range(spec.num_examples(split)):
            yield i, spec.example(split, i)


def builder(spec: MqarSpec, data_dir: str | None = None) -> Mqar:
    """The (unbuilt) array_record builder of `spec` in `data_dir` (None -> default_data_dir())."""
    default = Mqar.BUILDER_CONFIGS[0]
    # TFDS refuses a second config object under a registered config's name.
    config = default.name if spec == default.spec else MqarConfig(name=spec.config_name, spec=spec)
    return Mqar(
        config=config,
        data_dir=catalog.resolve_data_dir(data_dir),
        file_format="array_record",
    )


def build(spec: MqarSpec, data_dir: str | None = None) -> Mqar:
    """Builds `spec` once into data_dir (reused afterwards); returns the prepared builder."""
    return catalog.prepare(lambda: builder(spec, data_dir))


def data_source(spec: MqarSpec, split: str, data_dir: str | None = None) -> Any:
    """Random-access array_record source of `split`, building first if needed."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"split={split!r} is not an MQAR split; allowed: {SPLITS}")
    built = build(spec, data_dir)
    return catalog.CheckedSource(built.as_data_source(split=split),
                                 f"the MQAR build in {built.data_dir}",
                                 f"delete {built.data_dir} and rerun (it is built again)")

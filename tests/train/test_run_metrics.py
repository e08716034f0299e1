"""train/metrics.py: metrics.jsonl and TensorBoard events on a local folder and on an object
store (an fsspec filesystem that, like GCS, cannot append, standing in for gs://)."""
import json

import fsspec
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from train import metrics as metrics_lib


class ObjectStore(MemoryFileSystem):
    """In-memory objects under gs://: whole-object writes only, as GCS (no appends)."""
    protocol = ("gcs", "gs")
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for p in ("gs://", "gcs://"):
            path = path.removeprefix(p)
        return "/" + path.strip("/")

    def __init__(self, *args, finalize_on_close=None, **kwargs):   # as gcsfs is opened
        super().__init__(*args, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError(f"{path}: an object store cannot append (mode {mode!r})")
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def bucket():
    saved = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")
             if p in fsspec.registry}
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, ObjectStore, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    yield epath.Path("gs://bucket/run")
    ObjectStore.store.clear()
    ObjectStore.pseudo_dirs[:] = [""]
    for p, cls in saved.items():
        fsspec.register_implementation(p, cls, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def test_the_fake_store_refuses_appends_as_gcs_does(bucket):
    bucket.mkdir(parents=True, exist_ok=True)
    (bucket / "x").write_text("a")
    with pytest.raises(OSError, match="cannot append"):
        with (bucket / "x").open("a") as f:
            f.write("b")


def _run(workdir, steps, **kwargs):
    w = metrics_lib.MetricsWriter(workdir, **kwargs)
    for s in steps:
        w.write(s, {"loss": float(s) / 10, "event": "x" if s == steps[0] else "y"})
    return w


def test_object_store_keeps_every_row_across_a_resume(bucket):
    w = _run(bucket, [1, 2, 3])
    w.flush()
    assert [r["step"] for r in metrics_lib.read_metrics(bucket)] == [1, 2, 3]
    w.write(4, {"loss": 0.4})
    w.close()
    # a resumed run opens the same workdir: the earlier rows stay, its rows follow
    w = _run(bucket, [3, 4, 5])
    w.close()
    rows = metrics_lib.read_metrics(bucket)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4, 5]
    assert rows[0] == {"step": 1, "loss": 0.1, "event": "x"}
    # TensorBoard events of both runs were copied up
    assert len([p for p in (bucket / "tb").iterdir() if "tfevents" in p.name]) == 2


def test_object_store_flushes_by_time_between_checkpoints(bucket):
    w = _run(bucket, [1], flush_every_s=0.0)   # every write is past the interval
    assert [r["step"] for r in metrics_lib.read_metrics(bucket)] == [1]
    w = metrics_lib.MetricsWriter(bucket, flush_every_s=3600.0, tensorboard=False)
    w.write(2, {"loss": 0.2})
    assert [r["step"] for r in metrics_lib.read_metrics(bucket)] == [1]   # not yet
    w.flush()
    assert [r["step"] for r in metrics_lib.read_metrics(bucket)] == [1, 2]
    w.close()


def test_local_rows_are_on_disk_as_soon_as_written(tmp_path):
    w = _run(tmp_path, [1, 2], flush_every_s=3600.0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2]   # before any flush
    w.close()
    w = _run(tmp_path, [2, 3])
    w.close()
    assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2, 2, 3]
    assert len([p for p in (tmp_path / "tb").iterdir() if "tfevents" in p.name]) == 2


def test_profile_steps_write_a_trace_of_those_steps(tmp_path):
    """config.profile_steps = (2, 3): a jax.profiler trace in WORKDIR/profile, its row in
    metrics.jsonl; a bad range is refused at start."""
    from train import trainer
    from train.configs import lm
    c = lm.get_config("tiny")
    c.num_steps, c.checkpoint_every, c.eval_every, c.progress = 4, 0, 0, False
    c.batch_size, c.seq_len, c.model.width = 8, 32, 32
    c.data.source = "memory"
    c.profile_steps = (2, 3)
    trainer.train(c, tmp_path / "run")
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    rows = metrics_lib.read_metrics(tmp_path / "run")
    assert [r for r in rows if r.get("event") == "profile"] == [
        {"step": 2, "event": "profile", "directory": str(tmp_path / "run" / "profile"),
         "steps": [2, 3]}]
    c.profile_steps = (3, 2)
    with pytest.raises(ValueError, match=r"profile_steps=\(3, 2\) is not allowed"):
        trainer.train(c, tmp_path / "bad")

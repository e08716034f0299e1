"""DKVB model + value training: the value gradient, one local SGD step of the trainer's
objective and optimizer, voting decoder check, encoders. (That values outside the fetched set
never move across the trainer's task phases is tested in tests/train/test_dkvb_objective.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memory import codebook as cb
from models import encoders
from models.kv_bottleneck import KVBottleneck
from train.objectives import dkvb as obj
from train.optim import make_optimizer

B, D, C, K, DK, V = 24, 10, 3, 16, 4, 5


@pytest.fixture(scope="module")
def setup():
    r = jax.random.split(jax.random.PRNGKey(0), 4)
    books = cb.init_codebooks(r[0], embed_dim=D, num_codebooks=C, num_keys=K, key_dim=DK,
                              value_dim=V)
    # Keys on projected data points (how they are learnt does not matter here).
    keys = jnp.swapaxes(cb.project(jax.random.normal(r[1], (K, D)), books.projection_CxDxDk), 0, 1)
    # Non-zero values so the softmax is not uniform and the gradient formula is exercised.
    books = books.replace(keys_CxKxDk=keys,
                          values_CxKxDv=0.5 * jax.random.normal(r[3], (C, K, V)))
    z = jax.random.normal(jax.random.PRNGKey(1), (B, D))
    y = jax.random.randint(jax.random.PRNGKey(2), (B,), 0, V)
    return books, z, y


def test_voting_decoder_dimension_check(setup):
    books, z, _ = setup
    with pytest.raises(ValueError, match="value_dim == num_classes"):
        KVBottleneck(num_classes=V + 1).init(jax.random.PRNGKey(0), z, books)
    with pytest.raises(ValueError, match="decoder"):
        KVBottleneck(num_classes=V, decoder="mlp").init(jax.random.PRNGKey(0), z, books)
    # The linear decoder accepts any value dim.
    model = KVBottleneck(num_classes=V + 1, decoder="linear")
    params = model.init(jax.random.PRNGKey(0), z, books)
    logits, idx = model.apply(params, z, books)
    assert logits.shape == (B, V + 1) and idx.shape == (B, C)


def test_vote_logits_are_mean_of_fetched_values(setup):
    books, z, _ = setup
    model = KVBottleneck(num_classes=V)
    logits, idx = model.apply({}, z, books)
    q = np.einsum("bd,cdk->bck", np.asarray(z), np.asarray(books.projection_CxDxDk))
    d = ((q[:, :, None] - np.asarray(books.keys_CxKxDk)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, d.argmin(-1))
    want = np.asarray(books.values_CxKxDv)[np.arange(C)[None], np.asarray(idx)].mean(1)
    np.testing.assert_allclose(logits, want, rtol=1e-6)


def test_value_gradient_is_the_scatter_of_softmax_minus_onehot(setup):
    """Grad of the loss w.r.t. the values: (1/C) sum_b (softmax_b - onehot_b) / B scattered onto
    the fetched keys. (Keys, projection and encoder reach the logits only through an argmin, so
    their gradient is zero with or without stop_gradient; nothing to test there.)"""
    books, z, y = setup
    model = KVBottleneck(num_classes=V)

    def loss(values):
        logits, _ = model.apply({}, z, books.replace(values_CxKxDv=values))
        return jnp.mean(obj.smoothed_cross_entropy(logits, y, 0.0))

    g_values = jax.grad(loss)(books.values_CxKxDv)
    logits, idx = model.apply({}, z, books)
    p = np.asarray(jax.nn.softmax(logits)) - np.eye(V)[np.asarray(y)]
    want = np.zeros((C, K, V))
    for b in range(B):
        for c in range(C):
            want[c, int(idx[b, c])] += p[b] / (C * B)
    np.testing.assert_allclose(g_values, want, atol=1e-7)


def test_one_sgd_step_is_local(setup):
    """One step of the trainer's DKVB objective and optimizer (plain SGD, no clipping triggered,
    no label smoothing): unfetched values, keys and projection are bitwise unchanged; fetched
    values move by -lr * (1/C) sum over the items that fetched them of (softmax - onehot) / B;
    usage counts every fetch; evaluation snaps each item to its nearest used key."""
    books, z, y = setup
    lr = 0.3
    model = obj.DKVBModel(num_classes=V, num_codebooks=C, num_keys=K)
    memory = {"dkvb_codebooks": {"projection": books.projection_CxDxDk,
                                 "keys": books.keys_CxKxDk, "usage": books.usage_CxK}}
    params = {"values": books.values_CxKxDv}
    batch = {"z": z, "y": y}
    tx, _ = make_optimizer({"name": "sgd", "lr": lr, "warmup_steps": 0, "schedule": "constant",
                            "clip_norm": 100.0})

    @jax.jit
    def step(params, memory):
        (loss, aux), g = jax.value_and_grad(
            lambda p: obj.dkvb_loss(model.apply, p, batch, None, step=0, memory=memory,
                                    label_smoothing=0.0), has_aux=True)(params)
        g = jax.tree_util.tree_map(lambda x: x / aux["weight"], g)    # the trainer's mean
        u, _ = tx.update(g, tx.init(params), params)
        return optax.apply_updates(params, u), aux["memory"]

    new, new_memory = step(params, memory)
    new_values, old_values = np.asarray(new["values"]), np.asarray(books.values_CxKxDv)
    _, idx = KVBottleneck(num_classes=V).apply({}, z, books)
    fetched = np.zeros((C, K), bool)
    fetched[np.arange(C)[None], np.asarray(idx)] = True
    assert 0 < fetched.sum() < C * K
    np.testing.assert_array_equal(new_values[~fetched], old_values[~fetched])  # bitwise
    got = new_memory["dkvb_codebooks"]
    np.testing.assert_array_equal(got["keys"], books.keys_CxKxDk)
    np.testing.assert_array_equal(got["projection"], books.projection_CxDxDk)
    # Usage counted once per item and codebook.
    assert int(got["usage"].sum()) == B * C
    np.testing.assert_array_equal(np.asarray(got["usage"]) > 0, fetched)
    logits = np.asarray(jax.nn.softmax(KVBottleneck(num_classes=V).apply(
        {}, None, books, idx_BxC=idx)[0]))
    grad = np.zeros((C, K, V))
    for b in range(B):
        for c in range(C):
            grad[c, int(idx[b, c])] += (logits[b] - np.eye(V)[int(y[b])]) / (C * B)
    # float32 rounding of values ~0.5 plus a ~1e-2 update: a few ulps.
    np.testing.assert_allclose(new_values[fetched], (old_values - lr * grad)[fetched], atol=1e-6)
    # Evaluation (step None): every item's key is a used one.
    _, eval_idx = model.apply({"params": new}, z, got, restrict_to_used=True,
                              method=obj.DKVBModel.logits)
    assert bool(jnp.all(got["usage"][jnp.arange(C)[None], eval_idx] > 0))


def test_pca_and_embedding_files(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 4, 3)).astype(np.float32)
    pca = encoders.fit_pca(x, 5)
    z = np.asarray(encoders.pca_embed(pca, jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(pca.components_DxP).T @ pca.components_DxP, np.eye(5),
                               atol=1e-5)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    assert np.all(np.diff(z.var(0)) <= 1e-6)  # components ordered by variance
    z2 = encoders.precompute_embeddings(lambda b: encoders.pca_embed(pca, b), x, batch_size=16)
    np.testing.assert_allclose(z2, z, rtol=1e-5, atol=1e-6)
    encoders.save_embeddings(tmp_path / "e.npz", z=z, y=np.arange(50))
    z3, y3 = encoders.load_embeddings(tmp_path / "e.npz")
    np.testing.assert_array_equal(z3, z)
    np.testing.assert_array_equal(y3, np.arange(50))
    with pytest.raises(ValueError, match="num_components"):
        encoders.fit_pca(x, 13)

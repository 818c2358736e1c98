"""The pure aggregation core and the cohort reply protocol, fed hand-made Flower messages."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from server.flower_patches import allow_messages_outside_a_run
from strategies import build_strategy
from proto.wire import ClientBatch, MalformedBatch, decode_batch, encode_batch, params_to_record
from strategies.aggregation import merge_batches, weighted_average

D = 3
REF = {"w": np.zeros(D)}


@pytest.fixture(autouse=True)
def task_identity():
    """Messages outside a running Flower app need an identity."""
    allow_messages_outside_a_run()
    yield


def batch(ids, seed=0, n=None):
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, dtype=np.int64)
    n = np.asarray(n if n is not None else rng.integers(1, 9, len(ids)), dtype=np.int64)
    return ClientBatch(ids, n, {"w": rng.standard_normal((len(ids), D))},
                       {"loss-before": rng.random(len(ids))})


def reply(content, node):
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content, reply_to=sent)


def test_weighted_average_weights_by_examples():
    b = ClientBatch(np.array([0, 1]), np.array([1, 3]), {"w": np.array([[1.0, 0, 0], [5.0, 4, 0]])}, {})
    assert np.allclose(weighted_average(b)["w"], [4.0, 3.0, 0.0])


def test_merge_is_independent_of_grouping_and_arrival_order():
    whole = batch(range(12), seed=1)
    parts = [ClientBatch(whole.client_ids[s], whole.num_examples[s], {"w": whole.params["w"][s]},
                         {"loss-before": whole.metrics["loss-before"][s]})
             for s in (slice(7, 12), slice(0, 3), slice(3, 7))]
    a = weighted_average(merge_batches(parts))["w"]
    b = weighted_average(merge_batches([whole]))["w"]
    assert np.array_equal(a, b)  # bit for bit


def test_round_trip_through_a_record():
    b = batch([4, 9, 2])
    back = decode_batch(encode_batch(b), REF)
    assert np.array_equal(back.client_ids, b.client_ids)
    assert np.array_equal(back.params["w"], b.params["w"])
    assert np.array_equal(back.metrics["loss-before"], b.metrics["loss-before"])


def corrupt(kind):
    b = batch([0, 1, 2])
    if kind == "nan":
        b.params["w"][1, 0] = np.nan
    elif kind == "inf-metric":
        b.metrics["loss-before"][0] = np.inf
    elif kind == "shape":
        b.params["w"] = np.zeros((3, D + 1))
    elif kind == "negative-count":
        b.num_examples[2] = -4
    elif kind == "duplicate":
        b.client_ids[1] = 0
    return encode_batch(b)


@pytest.mark.parametrize(
    "kind, reason",
    [("nan", "non-finite"), ("inf-metric", "non-finite"), ("shape", "shape (3, 4)"),
     ("negative-count", "non-positive num-examples"), ("duplicate", "duplicate client ids")],
)
def test_malformed_replies_are_dropped_named_and_the_round_goes_on(kind, reason):
    strategy = build_strategy("fedavg", num_nodes=3, proximal_mu=1.0)
    strategy.sent = params_to_record(REF)
    good = [batch([10, 11], seed=2), batch([20], seed=3)]
    replies = [reply(encode_batch(good[0]), 1), reply(corrupt(kind), 2), reply(encode_batch(good[1]), 3)]
    report = strategy.aggregate_round(1, replies)
    expected = weighted_average(merge_batches(good))["w"]
    assert np.array_equal(report.arrays["w"].numpy(), expected)  # the bad reply changed nothing
    assert report.clients == 3 and len(report.dropped) == 1
    assert report.dropped[0].startswith("node 2:") and reason in report.dropped[0]


def test_error_replies_missing_records_and_double_claims():
    strategy = build_strategy("fedprox", num_nodes=3, proximal_mu=1.0)
    strategy.sent = params_to_record(REF)
    sent = Message(RecordDict(), dst_node_id=7, message_type="train")
    replies = [
        Message(Error(code=0, reason="ValueError: data file truncated"), reply_to=sent),
        reply(RecordDict({"config": ConfigRecord({"x": 1})}), 8),
        reply(encode_batch(batch([1, 2])), 9),
    ]
    result = strategy.aggregate_round(1, replies)
    assert result.arrays is not None and result.clients == 2
    assert any("data file truncated" in d for d in result.dropped)
    assert any(d.startswith("node 8: missing or unreadable record") for d in result.dropped)
    # two nodes claim client 1: the server cannot tell which is right, so it keeps neither
    # report of it; client 2 of the same reply still counts
    both = batch([1, 2])
    replies = [reply(encode_batch(both), 1), reply(encode_batch(batch([1])), 2)]
    result = strategy.aggregate_round(2, replies)
    assert result.dropped == ["client 1 was reported 2 times, by nodes 1, 2: dropped from every reply"]
    assert result.clients == 1
    np.testing.assert_allclose(result.arrays["w"].numpy(), both.params["w"][1], rtol=1e-15)
    # nothing left at all: the round's model goes on
    result = strategy.aggregate_round(3, [reply(encode_batch(batch([1])), 1), reply(encode_batch(batch([1])), 2)])
    assert result.arrays is None and result.models["w"].shape == (1, D)


def test_bad_telemetry_is_named_but_never_changes_the_aggregate():
    """Outcome counts and placement records are telemetry: unreadable ones are ignored and
    named; the clients' results still count, and empty cohort replies are not errors."""
    from proto.wire import CohortResult, encode_result

    good, odd = batch([1, 2], seed=1), batch([3], seed=2)
    clean = [reply(encode_batch(good), 1), reply(encode_batch(odd), 2)]
    strategy = build_strategy("fedavg", num_nodes=3, proximal_mu=0.0)
    strategy.sent = params_to_record(REF)
    expected, _ = strategy.aggregate_train(1, clean)  # Flower's interface, derived from aggregate_round

    bad = encode_batch(odd)
    bad["stats"] = params_to_record({"outcomes": np.array([-1.5, 2.0])})
    bad["node"] = ConfigRecord({"partition": "not a number", "generated": "yes"})
    empty = encode_result(CohortResult(None, None, None, np.array([3, 0, 0, 0])))
    empty["node"] = ConfigRecord({"partition": 4, "ray-node": "n1", "generated": True})
    report = strategy.aggregate_round(1, [clean[0], reply(bad, 2), reply(empty, 3)])
    assert np.array_equal(report.arrays["w"].numpy(), expected["w"].numpy())
    assert report.clients == 3 and report.telemetry.outcomes.tolist() == [3, 0, 0, 0]
    assert len(report.dropped) == 1 and "node 2: outcome counts ignored" in report.dropped[0]

    from server.history import placement_summary

    summary = placement_summary(report.telemetry.placement)
    assert summary == {"cohort_nodes": {"n1": [4]}, "cohorts_generated": 1}


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(-3, 50), min_size=0, max_size=6),
    counts=st.lists(st.integers(-2, 5), min_size=0, max_size=6),
    rows=st.integers(0, 7),
    cols=st.integers(1, 4),
    fill=st.sampled_from([0.5, np.nan, np.inf, -np.inf, 1e308]),
)
def test_any_reply_either_decodes_to_a_valid_batch_or_is_rejected_by_name(ids, counts, rows, cols, fill):
    clients = {"client-id": np.array(ids, dtype=np.int64),
               "num-examples": np.array(counts, dtype=np.int64)}
    content = RecordDict({
        "clients": params_to_record(clients),
        "arrays": params_to_record({"w": np.full((rows, cols), fill)}),
    })
    try:
        b = decode_batch(content, REF)
    except MalformedBatch as err:
        assert str(err)  # a reason, never a crash of another kind
        return
    assert len(b) > 0 and (b.num_examples > 0).all() and np.isfinite(b.params["w"]).all()
    assert b.params["w"].shape == (len(b), D) and len(set(b.client_ids.tolist())) == len(b)


# ---- k-model (clustered) replies ---------------------------------------------------------

from proto.wire import ClusterSums, CohortResult, cluster_sums, encode_result  # noqa: E402

K = 3
MODELS = {"w": np.zeros((K, D))}


def clustered_strategy():
    from strategies.clustered_fl import ClusteredStrategy

    s = ClusteredStrategy(K, num_nodes=3)
    s.sent = params_to_record(MODELS)
    return s


def sums_reply(seed, **corrupt):
    rng = np.random.default_rng(seed)
    sums = cluster_sums(rng.integers(0, K, 6), rng.integers(1, 9, 6),
                        {"w": rng.standard_normal((6, D))}, rng.random(6), K)
    for field, value in corrupt.items():
        if field == "w":
            sums.weighted["w"] = (value, sums.weighted["w"][1])
        else:
            setattr(sums, field, value)
    return encode_result(CohortResult(None, sums, np.ones((K, K, 4), np.int64)))


@pytest.mark.parametrize(
    "corrupt, reason",
    [({"examples": np.array([1, -2, 3])}, "negative cluster counts"),
     ({"examples": np.array([1.5, 2, 3])}, "must be integers"),
     ({"w": np.full((K, D), np.nan)}, "non-finite"),
     ({"w": np.zeros((K, D + 2))}, "shape"),
     ({"clients": np.array([50, 0, 0])}, "more clients than examples")],
)
def test_malformed_partial_sums_are_dropped_and_named(corrupt, reason):
    strategy = clustered_strategy()
    good = [sums_reply(1), sums_reply(2)]
    result = strategy.aggregate_round(1, [reply(good[0], 1), reply(sums_reply(3, **corrupt), 2), reply(good[1], 3)])
    alone = clustered_strategy()
    expected, _ = alone.aggregate_train(1, [reply(g, n) for g, n in zip(good, (1, 3))])
    assert np.array_equal(result.arrays["w"].numpy(), expected["w"].numpy())
    assert len(result.dropped) == 1 and reason in result.dropped[0]
    assert result.dropped[0].startswith("node 2:")


def normal_equations_reply(seed, matrix=None):
    """A cohort's second-order sums: per client a positive definite X'X/n and X'y/n."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 4, D))
    params = {"normal-matrix": np.einsum("cpd,cpe->cde", x, x) / 4, "normal-vector": rng.standard_normal((6, D))}
    sums = cluster_sums(np.arange(6) % K, rng.integers(1, 9, 6), params, rng.random(6), K)
    if matrix is not None:
        sums.weighted["normal-matrix"] = (matrix, np.zeros_like(matrix))
    return encode_result(CohortResult(None, sums, None))


@pytest.mark.parametrize(
    "bad, reason",
    [(lambda: normal_equations_reply(3, np.full((K, D, D), np.nan)), "non-finite"),
     (lambda: normal_equations_reply(3, np.zeros((K, D, D + 1))), "shape"),
     (lambda: sums_reply(3), "normal-matrix")],  # a first-order reply: a model, no normal equations
)
def test_malformed_second_order_sums_are_dropped_and_named(bad, reason):
    """A second-order round takes the cohorts' normal equations; one that sends broken or
    first-order sums is dropped, named, and the models are those of the others alone."""
    from strategies.clustered_fl import ClusteredStrategy

    def strategy():
        s = ClusteredStrategy(K, num_nodes=3, refine="second-order")
        s.sent = params_to_record(MODELS)
        return s

    good = [normal_equations_reply(1), normal_equations_reply(2)]
    result = strategy().aggregate_round(1, [reply(good[0], 1), reply(bad(), 2), reply(good[1], 3)])
    expected = strategy().aggregate_round(1, [reply(g, n) for g, n in zip(good, (1, 3))])
    assert np.array_equal(result.arrays["w"].numpy(), expected.arrays["w"].numpy())
    assert not np.array_equal(expected.arrays["w"].numpy(), MODELS["w"])  # the good sums moved the models
    assert len(result.dropped) == 1 and result.dropped[0].startswith("node 2:") and reason in result.dropped[0]


def test_a_soft_assignment_round_drops_a_cohort_that_sent_sums():
    """Soft assignments weigh every client under every model, so they need per-client normal
    equations; a cohort's per-cluster sums cannot be split back and are dropped, named."""
    from strategies.clustered_fl import ClusteredStrategy

    def strategy():
        s = ClusteredStrategy(K, num_nodes=2, refine="second-order", assignment="soft")
        s.sent = params_to_record({"w": np.eye(K, D)})
        return s

    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 2, D))
    y = rng.standard_normal((8, 2))
    clients = ClientBatch(np.arange(8), np.full(8, 2), {
        "normal-matrix": np.einsum("cpd,cpe->cde", x, x) / 2, "normal-vector": np.einsum("cpd,cp->cd", x, y) / 2,
        "normal-constant": (y * y).mean(axis=1)}, {"loss-before": rng.random(8), "cluster": np.arange(8.0) % K})
    good = encode_result(CohortResult(clients, None, None))
    result = strategy().aggregate_round(1, [reply(good, 1), reply(normal_equations_reply(2), 2)])
    alone = strategy().aggregate_round(1, [reply(good, 1)])
    assert len(result.dropped) == 1 and "sent sums" in result.dropped[0] and result.dropped[0].startswith("node 2:")
    assert np.array_equal(result.arrays["w"].numpy(), alone.arrays["w"].numpy())
    assert not np.array_equal(alone.arrays["w"].numpy(), np.eye(K, D))


@settings(max_examples=100, deadline=None)
@given(
    examples=st.lists(st.integers(-3, 20), min_size=1, max_size=5),
    hi=st.sampled_from([0.0, 1.0, np.nan, np.inf]),
    k=st.integers(1, 4),
    cluster=st.integers(-2, 5),
)
def test_any_clustered_reply_is_aggregated_or_dropped_never_a_crash(examples, hi, k, cluster):
    strategy = clustered_strategy()
    ex = np.array(examples[:k] + [0] * (k - len(examples[:k])), dtype=np.int64)
    bad = ClusterSums({"w": (np.full((k, D), hi), np.zeros((k, D)))}, ex, np.zeros(k, np.int64),
                      (np.zeros(k), np.zeros(k)))
    per_client = batch([5, 6])
    per_client.metrics["cluster"] = np.array([cluster, 0], dtype=np.float64)
    replies = [reply(encode_result(CohortResult(None, bad, None)), 1),
               reply(encode_batch(per_client), 2), reply(sums_reply(4), 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and np.isfinite(arrays["w"].numpy()).all()  # the good reply landed
    assert arrays["w"].numpy().shape == (K, D)


def test_replies_without_confusion_counts_are_aggregated_as_with_them():
    """Device data carry no labels: a cohort then sends its outcome counts but no confusion
    counts. The part is absent, not malformed: the same models, nothing dropped, and no
    confusion in the result (so the record has no misclustering)."""

    def clustered_reply(seed, confusion):
        b = batch([10 * seed, 10 * seed + 1], seed=seed)
        b.metrics["cluster"] = np.array([seed % K, 0], dtype=np.float64)
        return encode_result(CohortResult(b, None, confusion, np.array([0, 1, 0, 0])))

    labelled = clustered_strategy().aggregate_round(1, [reply(clustered_reply(s, np.ones((K, K, 4), np.int64)), s)
                                                        for s in (1, 2)])
    unlabelled = clustered_strategy().aggregate_round(1, [reply(clustered_reply(s, None), s) for s in (1, 2)])
    assert unlabelled.dropped == [] and unlabelled.clients == 4
    assert np.array_equal(unlabelled.arrays["w"].numpy(), labelled.arrays["w"].numpy())
    assert unlabelled.telemetry.confusion is None and labelled.telemetry.confusion.sum() == 2 * K * K * 4
    assert unlabelled.telemetry.outcomes.tolist() == [0, 2, 0, 0]


def test_strategies_and_models_that_went_over_the_network_still_checkpoint():
    """Flower's network grid leaves memoryviews cached in the arrays it sent (a deployment's
    checkpoint once died on `cannot pickle memoryview objects`): they pickle fresh."""
    import pickle

    from flwr.app import Array, ArrayRecord

    from strategies.result import fresh

    sent = ArrayRecord({"w": Array(np.arange(6.0).reshape(2, 3))})
    _ = sent["w"].children  # what serialising for the network leaves behind
    with pytest.raises(TypeError, match="memoryview"):
        pickle.dumps(sent)
    strategy = clustered_strategy()
    strategy.sent = sent
    clone = pickle.loads(pickle.dumps(strategy))
    assert np.array_equal(clone.sent["w"].numpy(), sent["w"].numpy())
    assert np.array_equal(pickle.loads(pickle.dumps(fresh(sent)))["w"].numpy(), sent["w"].numpy())

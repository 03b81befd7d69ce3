"""GlobalFingerprintIndex: catches one attack spread over many sessions, ignores benign traffic, stays bounded."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.trackers import GlobalFingerprintIndex, SessionTrackers

from .conftest import Digits
from .streams import benign_stream, hsj_like


def observe_stream(index: GlobalFingerprintIndex, trackers: SessionTrackers, rows: np.ndarray,
                   sessions: list[str], t0: float = 0.0, answers: np.ndarray | None = None) -> list[float]:
    """One row per request, the sessions taking turns; one second between requests. ``answers``: the class
    the model answered for each row, learned by the index after each request (as the guard does)."""
    fps, digests = trackers.fingerprints(rows), trackers.row_keys(rows)
    scores = []
    for i in range(rows.shape[0]):
        scores.append(index.observe(sessions[i % len(sessions)], fps[i : i + 1], digests[i : i + 1], t0 + i))
        if answers is not None:
            index.learn(fps[i : i + 1], answers[i : i + 1], t0 + i)
    return scores


def boundary_search(digits: Digits, i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A HopSkipJump-shaped search on the model's decision boundary from held-out image ``i``, and the model's
    answers to it."""
    rows = hsj_like(digits.X_held[i], np.random.default_rng(i), n, hi=16.0, predict=digits.model.predict)
    return rows, digits.model.predict(rows)


class TestGlobalIndex:
    def test_attack_spread_over_10_sessions(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A HopSkipJump-shaped stream sent round-robin from 10 session ids crosses 0.5 within 60 queries,
        while no single session sees more than 6 of those queries."""
        index = GlobalFingerprintIndex(max_entries=10_000)
        rows, answers = boundary_search(digits, 3, 60)
        scores = observe_stream(index, trackers, rows, [f"attacker-{i}" for i in range(10)], answers=answers)
        assert max(scores) >= 0.5
        assert min(scores) >= 0.0 and max(scores) <= 1.0

    def test_distinct_inputs_with_one_fingerprint_all_count(self, trackers: SessionTrackers,
                                                            digits: Digits) -> None:
        """Perturbations far below a quantisation step share one fingerprint (as many HopSkipJump probes do);
        once the cluster is answered with two classes (it lies on the boundary), each distinct input counts,
        so 50 keys sending one each push a 51st key's probe past 0.95."""
        index = GlobalFingerprintIndex(max_entries=10_000)
        rng = np.random.default_rng(11)
        x = digits.X_held[7]
        rows = np.stack([x + rng.normal(0, 1e-6, x.shape) for _ in range(51)])
        fps = trackers.fingerprints(rows)
        assert len({r.tobytes() for r in fps}) <= 3  # essentially one fingerprint
        scores = observe_stream(index, trackers, rows, [f"sybil-{i}" for i in range(51)],
                                answers=np.arange(51) % 2)
        assert scores[-1] >= 0.95
        assert len(index) <= 3  # stored once, with a weight

    def test_exact_repeats_from_many_sessions_count_once(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A popular public input sent verbatim by 200 clients is one input: it is stored once and nobody
        scores for sending it."""
        index = GlobalFingerprintIndex(max_entries=10_000)
        rows = np.repeat(digits.X_held[:1], 201, axis=0)
        scores = observe_stream(index, trackers, rows, [f"user-{i}" for i in range(201)])
        assert scores == [0.0] * 201
        assert len(index) == 1 and index.volume(300.0) == 1.0

    def test_a_popular_input_answered_alike_never_counts(self, trackers: SessionTrackers, digits: Digits) -> None:
        """300 clients each sending their own slightly edited copy of one popular input, all answered with one
        class, score 0 however many there are; one copy answered with another class (a popular input near the
        boundary) keeps the next copy below the alert level; once a search gets the other answer about as
        often as a boundary search does, the next copy from another key scores at the block level."""
        index = GlobalFingerprintIndex(max_entries=10_000)
        rng = np.random.default_rng(15)
        x = digits.X_held[4]
        rows = np.stack([x + rng.normal(0, 1e-6, x.shape) for _ in range(342)])
        scores = observe_stream(index, trackers, rows[:300], [f"user-{i}" for i in range(300)],
                                answers=np.full(300, 7))
        assert max(scores) == 0.0
        observe_stream(index, trackers, rows[300:301], ["prober"], t0=300.0, answers=np.array([3]))
        assert observe_stream(index, trackers, rows[301:302], ["user-301"], t0=301.0, answers=np.array([7]))[0] < 0.5
        observe_stream(index, trackers, rows[302:341], ["prober"], t0=302.0, answers=np.where(np.arange(39) % 4, 7, 3))
        assert observe_stream(index, trackers, rows[341:], ["prober-2"], t0=341.0)[0] >= 0.95

    def test_mixed_clusters_count_by_their_share_of_other_answers(self, trackers: SessionTrackers,
                                                                  digits: Digits) -> None:
        """Of two equally large clusters answered with two classes, the one whose answers are split (a boundary
        search) scores more than the one answered with one class but for a few flips (popular edits), and the
        score grows with the share of other answers up to ``flip_share``, whichever class came first."""
        rng = np.random.default_rng(16)
        x = digits.X_held[5]
        rows = np.stack([x + rng.normal(0, 1e-6, x.shape) for _ in range(41)])
        out = {}
        for flips in (0, 1, 4, 10, 20):
            index = GlobalFingerprintIndex(max_entries=1000, flip_share=0.25)
            answers = np.full(40, 2)
            answers[:flips] = 5  # the flips first: the main class is still the one answered most
            observe_stream(index, trackers, rows[:40], [f"user-{i}" for i in range(40)], answers=answers)
            out[flips] = observe_stream(index, trackers, rows[40:], ["next"], t0=40.0)[0]
        assert out[0] == 0.0
        assert out[0] < out[1] < out[4] < out[10]
        assert out[10] == out[20] >= 0.95
    def test_new_key_of_a_blocked_attacker_is_recognised(self, trackers: SessionTrackers, digits: Digits) -> None:
        """After one key sent an attack's queries, a fresh key continuing the attack reaches 0.95 (the default
        policy's block) within its first 3 queries, and on most of its next 10 (the per-session trackers
        know nothing of the new key)."""
        index = GlobalFingerprintIndex(max_entries=10_000)
        rows, answers = boundary_search(digits, 9, 110)  # the new key continues the current batch of probes
        observe_stream(index, trackers, rows[:100], ["attacker-key-1"], answers=answers[:100])
        fresh = np.array(observe_stream(index, trackers, rows[100:], ["attacker-key-2"], t0=200.0,
                                        answers=answers[100:]))
        assert fresh[:3].max() >= 0.95
        assert np.mean(fresh >= 0.95) >= 0.5

    def test_exact_repeats_of_a_seeded_input_score_nothing(self, trackers: SessionTrackers,
                                                              digits: Digits) -> None:
        """An attacker seeding 36 near-copies of a popular input from 4 keys cannot get the clients who then
        send that input verbatim blocked: an exact repeat scores 0."""
        index = GlobalFingerprintIndex(max_entries=10_000)
        x = digits.X_held[11]
        rng = np.random.default_rng(13)
        observe_stream(index, trackers, x[None, :], ["first-user"])
        seeds = np.stack([x + rng.normal(0, 1e-6, x.shape) for _ in range(36)])
        observe_stream(index, trackers, seeds, [f"seeder-{i}" for i in range(4)], t0=1.0, answers=np.arange(36) % 2)
        victims = observe_stream(index, trackers, np.repeat(x[None, :], 3, axis=0), ["u1", "u2", "u3"], t0=50.0)
        assert victims == [0.0, 0.0, 0.0]
        fresh = x + rng.normal(0, 1e-6, x.shape)  # a new near-copy is still seen as part of the cluster
        assert observe_stream(index, trackers, fresh[None, :], ["u4"], t0=60.0)[0] >= 0.95

    def test_a_slow_steady_trickle_does_not_add_up(self, trackers: SessionTrackers, digits: Digits) -> None:
        """A popular input edited by a new client every 5 minutes has at most 2 copies in any 10-minute
        window: over 3 hours (36 copies) its score stays where 2 copies put it."""
        index = GlobalFingerprintIndex(max_entries=10_000, window_s=600.0)
        rng = np.random.default_rng(14)
        x = digits.X_held[12]
        rows = np.stack([x + rng.normal(0, 1e-6, x.shape) for _ in range(36)])
        fps, digests = trackers.fingerprints(rows), trackers.row_keys(rows)
        scores = [index.observe(f"client-{i}", fps[i : i + 1], digests[i : i + 1], 300.0 * i) for i in range(36)]
        assert max(scores) <= index.score(2.0)

    def test_benign_sessions_do_not_match(self, trackers: SessionTrackers, digits: Digits) -> None:
        """300 benign sessions (held-out digits with retries, noise near-duplicates and shifts, all drawn from
        the same 500 images) never reach 0.8, the level at which the global score counts as evidence."""
        index = GlobalFingerprintIndex(max_entries=20_000)
        rng = np.random.default_rng(12)
        worst, t = 0.0, 0.0
        for s in range(300):
            rows = benign_stream(digits.X_held[:500], rng, 24, hi=16.0, image_shape=(8, 8))
            scores = observe_stream(index, trackers, rows, [f"user-{s}"], t0=t)
            t += len(scores)
            worst = max(worst, *scores)
        assert worst < 0.8

    def test_own_session_and_old_entries_do_not_count(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Near-duplicates from the same session, or older than the window, do not raise the global score."""
        index = GlobalFingerprintIndex(max_entries=1000, window_s=100.0)
        rows, answers = boundary_search(digits, 5, 60)
        assert max(observe_stream(index, trackers, rows[:40], ["one"], answers=answers[:40])) == 0.0
        assert observe_stream(index, trackers, rows[40:41], ["late"], t0=1000.0, answers=np.array([0]))[0] == 0.0
        observe_stream(index, trackers, rows[41:42], ["late-2"], t0=1000.5, answers=np.array([1]))
        assert observe_stream(index, trackers, rows[42:43], ["fresh"], t0=1001.0)[0] > 0.0

    def test_bounded_entries_and_digests(self, trackers: SessionTrackers) -> None:
        """The index never holds more than max_entries fingerprints, nor more than max_entries digests."""
        index = GlobalFingerprintIndex(max_entries=50)
        rows = np.random.default_rng(0).uniform(0, 16, size=(200, 64))
        observe_stream(index, trackers, rows, ["s"])
        assert len(index) == 50
        assert len(index._digests) <= 50

    def test_rejects_bad_parameters_and_widths(self, trackers: SessionTrackers) -> None:
        """Invalid parameters, a fingerprint width change or missing digests raise ValueError."""
        with pytest.raises(ValueError, match="invalid"):
            GlobalFingerprintIndex(max_entries=0)
        with pytest.raises(ValueError, match="invalid"):
            GlobalFingerprintIndex(match_threshold=1.5)
        with pytest.raises(ValueError, match="invalid"):
            GlobalFingerprintIndex(flip_share=0.0)
        index = GlobalFingerprintIndex(max_entries=10)
        one = np.ones(1, dtype=np.uint64)
        index.observe("s", np.ones((1, 20), dtype=np.uint64), one, 0.0)
        with pytest.raises(ValueError, match="width"):
            index.observe("s", np.ones((1, 8), dtype=np.uint64), one, 1.0)
        with pytest.raises(ValueError, match="digest"):
            index.observe("s", np.ones((2, 20), dtype=np.uint64), one, 1.0)

    def test_row_keys_are_salted_and_exact(self, config: object, digits: Digits) -> None:
        """Equal rows share a key, a one-ulp change does not, and another salt gives other keys."""
        from detectors.trackers import TrackerConfig

        assert isinstance(config, TrackerConfig)
        a, b = SessionTrackers(config, salt=b"salt-one-123"), SessionTrackers(config, salt=b"salt-two-456")
        x = digits.X_held[:2].astype(np.float64)
        y = x.copy()
        y[1, 0] = np.nextafter(y[1, 0], np.inf)
        ka = a.row_keys(np.vstack([x, y]))
        assert ka[0] == ka[2] and ka[1] != ka[3]
        assert not np.any(a.row_keys(x) == b.row_keys(x))

    def test_global_score_feeds_risk(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Passing global_fingerprint >= 0.5 to update raises session.risk without other evidence."""
        state = trackers.new_state()
        x = digits.X_held[:1]
        for t in range(12):
            state, scores = trackers.update(state, x, None, None, float(t), global_fingerprint=0.9)
        assert scores["session.risk"] >= 0.5
        assert scores["session.fingerprint"] == 0.0

    def test_update_with_precomputed_fingerprints_is_identical(self, trackers: SessionTrackers,
                                                                digits: Digits) -> None:
        """Passing the fingerprints the caller already computed changes nothing but the work done."""
        rows = hsj_like(digits.X_held[2], np.random.default_rng(2), 30, hi=16.0)
        s1, s2 = trackers.new_state(), trackers.new_state()
        for i in range(rows.shape[0]):
            x = rows[i : i + 1]
            s1, a = trackers.update(s1, x, None, None, float(i))
            s2, b = trackers.update(s2, x, None, None, float(i), fingerprints=trackers.fingerprints(x))
            assert a == b
        with pytest.raises(ValueError, match="fingerprints"):
            trackers.update(s1, rows[:2], None, None, 99.0, fingerprints=trackers.fingerprints(rows[:1]))


@pytest.fixture(scope="module")
def dense() -> tuple[SessionTrackers, np.ndarray]:
    """A reference where half the rows crowd around one point (as smooth image patches or coarse
    tabular values do) and half are spread out; trackers fitted on it."""
    from detectors.trackers import fit_tracker_config

    rng = np.random.default_rng(21)
    crowd = 5.0 + rng.normal(0, 0.01, size=(1500, 16))
    spread = rng.uniform(0, 10, size=(1500, 16))
    X = np.vstack([crowd, spread])[rng.permutation(3000)]
    return SessionTrackers(fit_tracker_config(X, seed=0), salt=b"density-salt"), crowd


class TestReferenceDensity:
    def test_density_is_high_in_the_crowd_and_zero_far_away(self, dense: tuple[SessionTrackers, np.ndarray]) -> None:
        """A row in the crowded region is near a large share of the reference sample; a row far from every
        reference row is near none of it."""
        trackers, crowd = dense
        fps = trackers.fingerprints(np.vstack([crowd[:1], np.full((1, 16), 50.0)]))
        density = trackers.reference_density(fps)
        assert density[0] >= 0.2
        assert density[1] == 0.0

    def test_benign_crowd_is_discounted(self, dense: tuple[SessionTrackers, np.ndarray]) -> None:
        """1,000 clients sending distinct rows from the crowded region, answered with two classes (the crowd
        lies on the boundary): with the density discount the global score stays below 0.8; without it
        (density 0) the same traffic looks like a spread attack."""
        trackers, _ = dense
        rng = np.random.default_rng(22)
        rows = 5.0 + rng.normal(0, 0.01, size=(1000, 16))
        fps, digests = trackers.fingerprints(rows), trackers.row_keys(rows)
        density = trackers.reference_density(fps)
        with_density, without = GlobalFingerprintIndex(), GlobalFingerprintIndex()
        scored, naive = [], []
        for i in range(1000):
            fp, dg, answer = fps[i : i + 1], digests[i : i + 1], np.array([i % 2])
            scored.append(with_density.observe(f"u{i}", fp, dg, float(i), density[i : i + 1]))
            naive.append(without.observe(f"u{i}", fp, dg, float(i)))
            with_density.learn(fp, answer, float(i))
            without.learn(fp, answer, float(i))
        assert max(scored) < 0.8
        assert max(naive) >= 0.95

    def test_volume_counts_distinct_inputs_in_the_window(self, trackers: SessionTrackers, digits: Digits) -> None:
        """W counts each distinct input once and forgets inputs older than the window."""
        index = GlobalFingerprintIndex(window_s=64.0)
        rows = digits.X_held[:10]
        fps, digests = trackers.fingerprints(rows), trackers.row_keys(rows)
        for i in range(10):
            index.observe("s", fps[i : i + 1], digests[i : i + 1], float(i))
            index.observe("t", fps[i : i + 1], digests[i : i + 1], float(i))  # an exact repeat
        assert index.volume(10.0) == 10.0
        assert index.volume(200.0) == 0.0

    def test_density_function_is_asked_only_for_rows_with_matches(self, dense: tuple[SessionTrackers, np.ndarray]
                                                                  ) -> None:
        """Given as a function of the row index, the density is computed only for rows that have near-duplicates
        from other sessions, and the scores equal those from a precomputed array."""
        trackers, _ = dense
        rng = np.random.default_rng(23)
        rows = np.vstack([5.0 + rng.normal(0, 0.01, size=(40, 16)), rng.uniform(20, 30, size=(40, 16))])
        rows = rows[rng.permutation(80)]
        fps, digests = trackers.fingerprints(rows), trackers.row_keys(rows)
        eager, lazy = GlobalFingerprintIndex(), GlobalFingerprintIndex()
        asked: list[int] = []
        for i in range(80):
            fp, dg = fps[i : i + 1], digests[i : i + 1]

            def density(j: int, fp: np.ndarray = fp) -> float:
                asked.append(j)
                return float(trackers.reference_density(fp[j : j + 1])[0])

            assert lazy.observe(f"u{i}", fp, dg, float(i), density) == eager.observe(
                f"u{i}", fp, dg, float(i), trackers.reference_density(fp))
            lazy.learn(fp, np.array([i % 2]), float(i))  # answered with two classes: the rows count
            eager.learn(fp, np.array([i % 2]), float(i))
        assert 0 < len(asked) < 80


class TestAnswerHandOff:
    """``learn`` given the rows' digests files each answer with the entry ``observe`` chose, without a lookup."""

    def test_same_scores_with_and_without_digests(self, trackers: SessionTrackers, digits: Digits) -> None:
        """Boundary searches, benign rows and exact repeats from several sessions: an index learning by digest
        scores every request as one that looks each row up again."""
        search, _ = boundary_search(digits, 4, 80)
        benign = digits.X_held[:40]
        rows = np.concatenate([search[:40], benign, search[:10], search[40:]])  # search[:10] again: exact repeats
        labels = digits.model.predict(rows)
        fps, digests = trackers.fingerprints(rows), trackers.row_keys(rows)
        by_digest, by_lookup = GlobalFingerprintIndex(max_entries=5000), GlobalFingerprintIndex(max_entries=5000)
        for i in range(rows.shape[0]):
            session, t = f"s{i % 7}", float(i)
            a = by_digest.observe(session, fps[i : i + 1], digests[i : i + 1], t)
            b = by_lookup.observe(session, fps[i : i + 1], digests[i : i + 1], t)
            assert a == b, i
            by_digest.learn(fps[i : i + 1], labels[i : i + 1], t, digests[i : i + 1])
            by_lookup.learn(fps[i : i + 1], labels[i : i + 1], t)
        assert len(by_digest._filed) == len(np.unique(digests))  # every distinct row found by its digest
        np.testing.assert_array_equal(by_digest._same, by_lookup._same)
        np.testing.assert_array_equal(by_digest._flips, by_lookup._flips)

    def test_an_overwritten_entry_is_not_answered_for(self, trackers: SessionTrackers) -> None:
        """When the ring overwrote the entry between ``observe`` and ``learn``, the answer does not land on the
        entry now in that slot (another input)."""
        index = GlobalFingerprintIndex(max_entries=3)
        rows = np.random.default_rng(1).uniform(0, 16, size=(4, 64))
        fps, digests = trackers.fingerprints(rows), trackers.row_keys(rows)
        for i in range(4):  # row 3 overwrites row 0's slot
            index.observe("s", fps[i : i + 1], digests[i : i + 1], float(i))
        index.learn(fps[:1], np.array([7]), 4.0, digests[:1])
        assert index._label.tolist().count(7) == 0

    def test_filed_rows_are_bounded(self, trackers: SessionTrackers) -> None:
        """The digests ``learn`` can use are the most recent distinct rows', a bounded number, oldest forgotten
        first (an answer for a forgotten row is filed by lookup)."""
        from detectors.trackers._global import _FILED_MAX

        index = GlobalFingerprintIndex(max_entries=10_000)
        rows = np.random.default_rng(2).uniform(0, 16, size=(_FILED_MAX + 50, 64))
        digests = trackers.row_keys(rows)
        index.observe("s", trackers.fingerprints(rows), digests, 0.0)
        assert len(index._filed) == _FILED_MAX
        assert int(digests[0]) not in index._filed and int(digests[-1]) in index._filed

import pytest
from scipy.stats import binomtest

from ticketguard.core.evidence import Evidence, Verdict
from ticketguard.core.stats import binomial_p_value


def test_binomial_p_value_matches_an_exact_binomial_test() -> None:
    for k, n, p in ((91, 100, 0.1), (16, 100, 0.1), (50, 100, 0.5), (0, 10, 0.3)):
        assert binomial_p_value(k, n, p) == pytest.approx(binomtest(k, n, p, alternative="greater").pvalue)
    assert binomial_p_value(0, 0, 0.1) == 1.0


def test_verdict_corrects_for_several_checks() -> None:
    strong = Evidence("trigger", 0.91, 0.3, True, p_value=1e-9)
    borderline = Evidence("qr", 0.7, 0.6, True, p_value=8e-7)
    assert Verdict((borderline,)).owned
    assert not Verdict((borderline, Evidence("x", 0.1, 0.3, False, p_value=0.5))).owned
    verdict = Verdict((strong, borderline))
    assert verdict.owned and verdict.false_claim_probability == pytest.approx(2e-9)
    assert verdict.to_json()["decision"] == "ownership shown"


def test_evidence_without_p_value_decides_by_threshold() -> None:
    kept = Evidence("fidelity", 0.905, 0.90, True)
    assert Verdict((kept,)).owned
    assert not Verdict((Evidence("fidelity", 0.89, 0.90, False),)).owned
    assert Verdict((kept,)).false_claim_probability is None

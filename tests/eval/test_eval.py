"""Evaluation: the honest estimators against exact enumeration, the lm-eval model `ft-ray`, the
offline task suite and the `arith` synthetic task. No Ray."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before lm-eval imports datasets: no hub here
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ft_ray.bundle import write_bundle  # noqa: E402
from ft_ray.config import ModelConfig  # noqa: E402
from ft_ray.data import arith, letters  # noqa: E402
from ft_ray.data.synthetic import TASKS, generate  # noqa: E402
from ft_ray.data.tokenizer import letter_tokenizer  # noqa: E402
from ft_ray.eval import EvalError  # noqa: E402
from ft_ray.eval.lm import FtRayLM  # noqa: E402
from ft_ray.eval.scoring import (  # noqa: E402
    ScoreItem,
    exact_log_likelihood,
    fit_window,
    iwae_log_likelihood,
    make_items,
    prior_codes,
    rolling_windows,
    score,
    token_logprobs,
)
from ft_ray.eval.tasks import (  # noqa: E402
    TASK_NAMES,
    check_tasks,
    evaluate_tasks,
    letters_results,
    task_manager,
    write_task_data,
)
from ft_ray.model import build_model  # noqa: E402

H = 2  # 4 codes per position: T <= 4 inputs gives <= 256 plans to enumerate


def tiny(arch: str = "free_transformer", seed: int = 0, **kw):
    """A random tiny model; W ~ N(0, 1) so Z changes the logits a lot (a hard case)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(arch=arch, vocab_size=64, hidden_dim=32, num_layers=2, num_heads=2,
                                max_seq_len=96, latent_bits=H), **kw})
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def ft():
    return tiny()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{"ft": path, "baseline": path}: tiny random bundles with the letter tokenizer."""
    root = tmp_path_factory.mktemp("bundles")
    letter_tokenizer().save(str(root / "tokenizer.json"))
    out = {}
    for name, arch in (("ft", "free_transformer"), ("baseline", "baseline")):
        model = tiny(arch)
        out[name] = write_bundle(root / name, model.state_dict(), model.cfg, {}, root / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("suite"), seed=0)


def req(*args):
    """A stand-in for lm-eval's Instance: the model reads only `.args`."""
    return type("Req", (), {"args": args})()


def brute_force_log_prob(model, tokens: list[int], num_scored: int) -> float:
    """log p(last num_scored | rest) by looping over every plan: the mean of p(x | z)."""
    T = len(tokens) - 1
    x = torch.tensor([tokens])
    joint, ctx = [], []
    for plan in itertools.product(range(1 << H), repeat=T):
        logits = model(x[:, :-1], z=torch.tensor([plan])).logits.double()
        lp = F.log_softmax(logits, -1)[0, torch.arange(T), x[0, 1:]]  # (T,)
        joint.append(lp.sum())
        ctx.append(lp[:T - num_scored].sum())
    lme = lambda v: torch.logsumexp(torch.stack(v), 0) - math.log(len(v))  # noqa: E731
    return float(lme(joint) - lme(ctx))


def all_plans(T: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(1 << H), repeat=T)))  # (4^T, T)


def delta_method_std(log_a: torch.Tensor, log_b: torch.Tensor) -> float:
    """Std of log mean(a) - log mean(b) over K samples (a_k, b_k), from the sample variance."""
    a, b = torch.exp(log_a - log_a.max()), torch.exp(log_b - log_b.max())
    g = a / a.mean() - b / b.mean()
    return float(g.std() / math.sqrt(len(g)))


# ------------------------------------------------------------------------------- exact values
@torch.no_grad()
def test_exact_log_likelihood_matches_brute_force(ft):
    tokens = [letters.BOS_ID, 10, 20, 30, 40]  # T = 4 inputs: 256 plans
    for num_scored in (4, 2, 1):
        assert exact_log_likelihood(ft, tokens, num_scored) == pytest.approx(
            brute_force_log_prob(ft, tokens, num_scored), abs=1e-5)
    with pytest.raises(ValueError, match="max_plans"):
        exact_log_likelihood(ft, tokens, max_plans=100)


@torch.no_grad()
def test_estimator_over_every_plan_once_is_exact(ft):
    tokens, num_scored = [letters.BOS_ID, 7, 8, 9, 11], 2
    item = ScoreItem(tokens, num_scored, codes=all_plans(4))
    (s,) = score(ft, [item])
    assert s.logprob == pytest.approx(exact_log_likelihood(ft, tokens, num_scored), abs=1e-5)
    assert sum(s.token_logprobs) == pytest.approx(s.logprob, abs=1e-9)
    # per-token logprobs are differences of exact prefix likelihoods
    assert s.token_logprobs[0] == pytest.approx(exact_log_likelihood(ft, tokens[:-1], 1), abs=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("proposal", ["prior", "encoder"])
def test_estimator_converges_to_exact_enumeration(ft, proposal):
    ctx, cont = [letters.BOS_ID, 12, 13], [14, 15]  # 4 inputs
    K = 2000
    (item,) = make_items(ft, [(ctx, cont)], [123], num_plans=K, proposal=proposal)
    (s,) = score(ft, [item])
    lp = token_logprobs(ft, torch.tensor([ctx + cont]).expand(K, -1), item.codes).double()  # (K, 4)
    w = torch.zeros(K, dtype=torch.float64) if item.log_weight is None else item.log_weight
    std = delta_method_std(w + lp.sum(-1), w + lp[:, :len(ctx) - 1].sum(-1))
    exact = exact_log_likelihood(ft, ctx + cont, len(cont))
    assert 0 < std < 0.1  # the check below means something
    assert abs(s.logprob - exact) < 5 * std + 1e-6
    assert sum(s.token_logprobs) == pytest.approx(s.logprob, abs=1e-9)


@torch.no_grad()
def test_iwae_bound_tightens_towards_the_exact_value():
    ft = tiny()
    ft.encoder.readout.weight.mul_(20)  # a sharp, wrong posterior: the ELBO is visibly loose
    window = [letters.BOS_ID, 21, 22, 23, 24]
    exact = exact_log_likelihood(ft, window)
    gaps = {}
    for K, n in ((1, 200), (10, 100), (100, 20)):
        bounds = np.array(iwae_log_likelihood(ft, [window] * n, num_samples=K, seeds=list(range(n))))
        gaps[K] = (bounds.mean() - exact, bounds.std() / math.sqrt(n))  # (mean gap, its std error)
        assert gaps[K][0] < 3 * gaps[K][1]  # a lower bound, in expectation
    assert gaps[1][0] < -0.5 and gaps[1][0] < gaps[10][0] < gaps[100][0]  # tightens as K grows
    assert abs(gaps[100][0]) < 3 * gaps[100][1] + 0.05


@torch.no_grad()
def test_baseline_scores_are_exact_and_ignore_num_plans():
    base = tiny("baseline")
    tokens = [letters.BOS_ID, 5, 6, 7, 8, 9]
    logits = base(torch.tensor([tokens[:-1]])).logits.double()
    direct = F.log_softmax(logits, -1)[0, torch.arange(5), torch.tensor(tokens[1:])]
    items = make_items(base, [(tokens[:3], tokens[3:])] * 2, [0, 1], num_plans=8)
    for s in score(base, items):
        assert s.logprob == pytest.approx(float(direct[2:].sum()), abs=1e-5)
        assert s.token_logprobs == pytest.approx(direct[2:].tolist(), abs=1e-5)
        assert s.is_greedy == bool((logits[0, 2:].argmax(-1) == torch.tensor(tokens[3:])).all())
    assert iwae_log_likelihood(base, [tokens], num_samples=3)[0] == pytest.approx(float(direct.sum()), abs=1e-5)
    assert exact_log_likelihood(base, tokens, 3) == pytest.approx(float(direct[2:].sum()), abs=1e-5)


@torch.no_grad()
def test_batching_requests_of_different_lengths_gives_the_same_numbers(ft):
    rng = np.random.default_rng(0)
    pairs = [([letters.BOS_ID, *rng.integers(3, 58, n).tolist()], rng.integers(3, 58, m).tolist())
             for n, m in [(1, 1), (5, 3), (2, 7), (9, 1), (4, 4), (1, 12)]]
    items = make_items(ft, pairs, list(range(len(pairs))), num_plans=6)
    together = score(ft, items, batch_size=16)
    alone = [score(ft, [it], batch_size=1)[0] for it in items]
    for a, b in zip(together, alone):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)
        assert a.is_greedy == b.is_greedy
    windows = [p[0] + p[1] for p in pairs] + [pairs[1][0] + pairs[1][1]]
    batched = iwae_log_likelihood(ft, windows, num_samples=4, seeds=list(range(len(windows))), batch_size=8)
    single = [iwae_log_likelihood(ft, [w], 4, [i], batch_size=1)[0] for i, w in enumerate(windows)]
    assert batched == pytest.approx(single, abs=1e-5)


@torch.no_grad()
def test_score_of_a_continuation_ignores_the_tokens_after_it(ft):
    ctx, cont = [letters.BOS_ID, 30, 31], [32, 33]
    (short,) = score(ft, make_items(ft, [(ctx, cont)], [5], num_plans=8))
    for tail in ([40, 41, 42], [50, 3, 9]):
        (long,) = score(ft, make_items(ft, [(ctx, cont + tail)], [5], num_plans=8))
        assert long.token_logprobs[:2] == pytest.approx(short.token_logprobs, abs=1e-6)


def test_prior_codes_are_prefix_stable_and_seeded():
    long, short = prior_codes(8, 50, H, seed=3), prior_codes(8, 7, H, seed=3)
    assert torch.equal(long[:, :7], short)
    assert not torch.equal(prior_codes(8, 7, H, seed=4), short)
    assert int(long.min()) >= 0 and int(long.max()) < 1 << H


def test_windows_fit_and_cover_every_token_once():
    ctx, cont, cut = fit_window([1, *range(3, 13)], [20, 21, 22], max_seq_len=8)
    assert cut and ctx + cont == [*range(7, 13), 20, 21, 22] and cont == [20, 21, 22]
    ctx, cont, cut = fit_window([1], list(range(3, 20)), max_seq_len=8)
    assert cut and len(ctx) == 1 and cont == list(range(12, 20))
    assert fit_window([1, 3], [4], 8) == ([1, 3], [4], False)
    windows = rolling_windows(list(range(3, 23)), 1, max_seq_len=8)
    assert [w[0] for w in windows] == [1, 10, 18] and sum(len(w) - 1 for w in windows) == 20
    assert all(len(w) <= 9 for w in windows) and windows[1][1:] == list(range(11, 19))


# ------------------------------------------------------------------------------- the lm-eval model
def test_model_args_and_registration(bundles):
    from lm_eval.api.registry import get_model

    lm = get_model("ft-ray").create_from_arg_string(
        f"bundle={bundles['ft']},num_plans=3,plan_seed=9,plan_mode=shared,batch_size=4", {"device": "cpu"})
    assert (lm.num_plans, lm.plan_seed, lm.plan_mode, lm.batch_size) == (3, 9, "shared", 4)
    assert lm.max_length == 96 and lm.bos_id == letters.BOS_ID


def test_prior_scoring_never_calls_the_encoder(bundles, monkeypatch):
    lm = FtRayLM(bundle=str(bundles["ft"]), num_plans=4)

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder ran during prior-mode scoring")

    monkeypatch.setattr(lm.model.encoder, "forward", refuse)
    out = lm.loglikelihood([req("K>", "__KK"), req("", "abc")])
    assert all(math.isfinite(lp) for lp, _ in out)


def test_proposal_mode_runs_the_encoder_on_the_context_alone(bundles, monkeypatch):
    lm = FtRayLM(bundle=str(bundles["ft"]), num_plans=4, proposal="encoder")
    seen, forward = [], lm.model.encoder.forward

    def record(x, cos, sin):
        seen.append(x.shape[1])
        return forward(x, cos, sin)

    monkeypatch.setattr(lm.model.encoder, "forward", record)
    out = lm.loglikelihood([req("ab_cd>", "efg"), req("K>", "KKKK")])
    assert seen == [7, 3] and all(math.isfinite(lp) for lp, _ in out)  # BOS + context, never more


def test_loglikelihood_is_reproducible_and_shares_a_contexts_plans(bundles):
    requests = [req("two_plus_two>", "four"), req("two_plus_two>", "five"), req("one>", "one")]
    first = FtRayLM(bundle=str(bundles["ft"]), num_plans=4, plan_seed=1).loglikelihood(requests)
    again = FtRayLM(bundle=str(bundles["ft"]), num_plans=4, plan_seed=1, batch_size=1).loglikelihood(requests)
    other = FtRayLM(bundle=str(bundles["ft"]), num_plans=4, plan_seed=2).loglikelihood(requests)
    assert [x[0] for x in first] == pytest.approx([x[0] for x in again], abs=1e-5)
    assert first != other


def test_over_long_inputs_are_left_truncated_with_a_warning(bundles, caplog):
    lm = FtRayLM(bundle=str(bundles["ft"]), num_plans=2)
    with caplog.at_level(logging.WARNING, logger="ft_ray.eval.lm"):
        ((lp, _),) = lm.loglikelihood([req("ab" * 100, "cd")])
        (text,) = lm.generate_until([req("ab" * 100, {"until": ["\n"], "max_gen_toks": 500})])
    assert math.isfinite(lp) and len(text) <= 95
    assert sum("truncated from the left" in r.message for r in caplog.records) == 2


def test_generation_honours_the_plan_seed_and_stops(bundles):
    lm = FtRayLM(bundle=str(bundles["ft"]), plan_seed=4, plan_mode="shared")
    gen = {"until": ["\n"], "max_gen_toks": 40, "do_sample": False}
    texts = lm.generate_until([req("K>", gen), req("AB>", gen), req("CD>", gen)])  # AB, CD batched
    # the same plan (seed 4: the prompt's Z from the encoder, then the prior) in one model call
    for prompt, text in zip(("K>", "AB>", "CD>"), texts):
        ids = [letters.BOS_ID, *letters.encode(prompt)]
        out = lm.model.generate(torch.tensor([ids]), 40, temperature=0.0, plan=4)[0, len(ids):].tolist()
        out = out[:out.index(letters.EOS_ID)] if letters.EOS_ID in out else out
        assert text == letter_tokenizer().decode(out, skip_special_tokens=True)
    fresh = FtRayLM(bundle=str(bundles["ft"]), plan_seed=4)
    repeats = fresh.generate_until([req("K>", gen)] * 3)  # lm-eval's repeats: plans 0, 1, 2
    assert repeats == fresh.generate_until([req("K>", gen)] * 3) and len(set(repeats)) > 1
    assert lm._finish(letters.encode("ab_cd") + [letters.EOS_ID, 5], []) == ("ab_cd", True)
    assert lm._finish(letters.encode("ab_cd_e"), ["_c", "d"]) == ("ab", True)
    assert lm._finish(letters.encode("abc"), ["x"]) == ("abc", False)


@torch.no_grad()
def test_baseline_bundle_through_the_model(bundles):
    lm = FtRayLM(bundle=str(bundles["baseline"]), num_plans=5)
    (lp, greedy), = lm.loglikelihood([req("ab", "cd")])
    logits = lm.model(torch.tensor([[letters.BOS_ID, *letters.encode("abc")]])).logits.double()
    direct = F.log_softmax(logits, -1)[0, [2, 3], letters.encode("cd")].sum()
    assert lp == pytest.approx(float(direct), abs=1e-5)


# ------------------------------------------------------------------------------- the task suite
def test_shipped_tasks_run_through_simple_evaluate(bundles, suite):
    lm = FtRayLM(bundle=str(bundles["ft"]), num_plans=2, batch_size=8)
    results = evaluate_tasks(lm, list(TASK_NAMES), suite, limit=3, bootstrap_iters=0, log_samples=False)
    metrics = {"ftray_arith_gen": ["exact_match,none"], "ftray_arith_choice": ["acc,none", "acc_norm,none"],
               "ftray_arith_ppl": ["byte_perplexity,none", "bits_per_byte,none"],
               "ftray_letters": ["valid,none"]}
    for task, names in metrics.items():
        for name in names:
            assert math.isfinite(float(results["results"][task][name])), (task, name)


def test_model_by_name_through_simple_evaluate(bundles, suite):
    import lm_eval

    out = lm_eval.simple_evaluate(model="ft-ray", model_args=f"bundle={bundles['baseline']},num_plans=2",
                                  tasks=["ftray_arith_choice"], task_manager=task_manager(suite), limit=2,
                                  bootstrap_iters=0, log_samples=False)
    assert 0.0 <= out["results"]["ftray_arith_choice"]["acc,none"] <= 1.0


def test_task_data_is_deterministic_and_held_out(tmp_path):
    a, b = write_task_data(tmp_path / "a", seed=3), write_task_data(tmp_path / "b", seed=3)
    for name in ("arith", "arith_choice", "arith_text", "letters"):
        assert (a / "data" / f"{name}.jsonl").read_text() == (b / "data" / f"{name}.jsonl").read_text()
    docs = [json.loads(line) for line in (a / "data" / "arith_choice.jsonl").read_text().splitlines()]
    assert len(docs) == len(arith.heldout_problems()) and all(arith.is_heldout(d["prompt"]) for d in docs)
    for d in docs:
        assert len(set(d["choices"])) == 4 and d["choices"][d["label"]] == json.loads(
            (a / "data" / "arith.jsonl").read_text().splitlines()[docs.index(d)])["answer"]
    assert len({d["label"] for d in docs}) == 4
    assert str(a / "data") in (a / "ftray_arith_gen.yaml").read_text()
    tok = letter_tokenizer()  # every string a task can send to the model is encodable
    for f in (a / "data").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            for text in _strings(json.loads(line)):
                assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def _strings(doc: dict) -> list[str]:
    return [s for v in doc.values() for s in (v if isinstance(v, list) else [v]) if isinstance(s, str)]


def test_letters_metric_is_validity():
    body = "_" * 10 + "K" * 8 + "_" * 46
    assert letters_results({"letter": "K"}, [body]) == {"valid": 1.0}
    assert letters_results({"letter": "K"}, [body.replace("K", "J")]) == {"valid": 0.0}
    assert letters_results({"letter": "K"}, [body[:30]]) == {"valid": 0.0}


# ------------------------------------------------------------------------------- bad input
def test_unknown_task_is_named(bundles, suite):
    with pytest.raises(EvalError, match="'ftray_nope'"):
        check_tasks(["ftray_arith_gen", "ftray_nope"], task_manager(suite))
    with pytest.raises(EvalError, match=r"unknown task\(s\) 'arith'.*ftray_arith_gen"):
        evaluate_tasks(FtRayLM(bundle=str(bundles["ft"])), ["arith"], suite, limit=1)


def test_bad_model_args_are_named(bundles, tmp_path):
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_plans"):
            FtRayLM(bundle=str(bundles["ft"]), num_plans=bad)
    with pytest.raises(EvalError, match="plan_mode"):
        FtRayLM(bundle=str(bundles["ft"]), plan_mode="sometimes")
    with pytest.raises(EvalError, match=str(tmp_path / "missing")):
        FtRayLM(bundle=str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("model.safetensors", "config.json", "metrics.json", "tokenizer.json"):
        (broken / f).write_text("not what it should be")
    with pytest.raises(EvalError, match=str(broken)):
        FtRayLM(bundle=str(broken))
    lm = FtRayLM(bundle=str(bundles["ft"]))
    with pytest.raises(EvalError, match=r"cannot encode \('1', '\+', '2', '='\)"):
        lm.loglikelihood([req("1+2=", "3"), req("x", "7")])


# ------------------------------------------------------------------------------- the arith task
def test_arith_words_and_precedence():
    assert arith.number_words(729) == "seven_hundred_twenty_nine"
    assert [arith.number_words(n) for n in (0, 13, 40, 100, 105)] == [
        "zero", "thirteen", "forty", "one_hundred", "one_hundred_five"]
    assert arith.evaluate((7, 3, 2), ("plus", "times")) == 13
    assert arith.evaluate((7, 3, 2), ("times", "plus")) == 23


def test_arith_training_rows_never_hold_a_heldout_problem():
    assert "arith" in TASKS
    rows = generate("arith", 300, seed=1)
    assert rows.shape == (300, 68) and np.array_equal(rows, generate("arith", 300, seed=1))
    assert rows.min() >= 0 and rows.max() < len(letters.VOCAB) and (rows[:, 0] == letters.BOS_ID).all()
    heldout = {p for p, *_ in arith.heldout_problems()}
    answers = {p: arith.number_words(v) for n in arith.NUM_OPERANDS for p, v, *_ in arith.problems(n)}
    complete = 0
    for row in rows.tolist():
        for doc in _split_docs(row)[:-1]:  # the last document of a row may be cut
            prompt, answer = letters.decode(doc).split(">")  # decode drops the EOS
            assert prompt + ">" not in heldout and answers[prompt + ">"] == answer
            complete += 1
    assert complete >= 300


def _split_docs(row: list[int]) -> list[list[int]]:
    """A packed row -> the ids between each BOS and its EOS (or the row's end)."""
    starts = [i for i, t in enumerate(row) if t == letters.BOS_ID] + [len(row)]
    return [row[a + 1:b] for a, b in zip(starts, starts[1:])]


def test_models_named_arm_at_tag_are_pooled_over_training_seeds():
    from ft_ray.eval.summary import interval95, markdown, pool_training_seeds

    def cell(*plan_seed_values):
        return {"seeds": dict(enumerate(plan_seed_values)), "mean": sum(plan_seed_values) / len(plan_seed_values)}

    results = {"ftray_arith_choice": {"acc": {"base@s0": cell(0.5), "base@s1": cell(0.6), "ft@s0": cell(0.4, 0.5),
                                              "ft@s1": cell(0.3, 0.3), "lone": cell(0.9)}}}
    pooled = pool_training_seeds(results)["ftray_arith_choice"]["acc"]
    assert set(pooled) == {"base", "ft"}  # a name without @ is not an arm of several seeds
    assert pooled["ft"]["models"] == ["ft@s0", "ft@s1"] and pooled["ft"]["num_training_seeds"] == 2
    assert pooled["ft"]["mean"] == pytest.approx((0.45 + 0.3) / 2)
    assert pooled["ft"]["ci95"] == pytest.approx(interval95([0.45, 0.3]))
    summary = {"settings": {"limit": None, "num_plans": 8, "proposal": "prior", "plan_mode": "fresh", "seeds": [0, 1]},
               "models": {n: {"arch": "free_transformer"} for n in results["ftray_arith_choice"]["acc"]},
               "results": results, "higher_is_better": {}, "chance": {}, "missing": [],
               "pooled": pool_training_seeds(results)}
    for cells in results["ftray_arith_choice"].values():
        for c in cells.values():
            c.update(ci95=None, num_seeds=len(c["seeds"]))
    text = markdown(summary)
    assert "Pooled over training seeds" in text and "| ftray_arith_choice | acc | 0.55 [" in text

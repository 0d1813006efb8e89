"""Scoring over HTTP: `logprobs` + `echo` on /v1/completions, the tokenizer routes, served scores
equal to the native lm-eval model's, and lm-eval's `local-completions` client against a real
local Ray Serve instance (loopback only). The engine-level checks at the top run without Ray."""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before lm-eval imports datasets: no hub here
os.environ["HF_DATASETS_OFFLINE"] = "1"

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ft_ray.bundle import write_bundle  # noqa: E402
from ft_ray.cluster import free_port  # noqa: E402
from ft_ray.config import ModelConfig  # noqa: E402
from ft_ray.data.tokenizer import byte_tokenizer  # noqa: E402
from ft_ray.model import BaselineTransformer, FreeTransformer  # noqa: E402
from ft_ray.serve import Engine, GenerationRequest, SchedulerConfig  # noqa: E402

pytestmark = pytest.mark.timeout(300)
CONTEXT = 96


def tiny(arch: str):
    cfg = ModelConfig(arch=arch, vocab_size=259, hidden_dim=32, num_layers=2, num_heads=2, max_seq_len=CONTEXT,
                      latent_bits=4, init_std=0.2)  # larger than default: peaked predictions, plans that matter
    torch.manual_seed(0)
    return (FreeTransformer(cfg) if arch == "free_transformer" else BaselineTransformer(cfg)).eval()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = root.parent / "tokenizer.json"
    byte_tokenizer().save(str(tok))
    for name, arch in (("ft", "free_transformer"), ("base", "baseline")):
        model = tiny(arch)
        write_bundle(root / name, model.state_dict(), model.cfg, {"step": 0}, tok)
    return root


@pytest.fixture(scope="module")
def server(ray_cluster, models_dir):
    from ray import serve

    from serve_apps.app import app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"models_dir": str(models_dir)}), name="ft-ray", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    yield client
    client.close()
    serve.shutdown()


def _post(server, body: dict) -> dict:
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def native(models_dir, name: str, **kw):
    from ft_ray.eval.lm import FtRayLM

    return FtRayLM(bundle=str(models_dir / name), **kw)


def req(*args):
    return type("Req", (), {"args": args})()


# ------------------------------------------------------------------------------- engine, no Ray
def test_scoring_runs_between_decode_steps_and_matches_the_scorer():
    """A K=16 scoring job on a small token budget takes several steps, and a generation running
    at the same time decodes a token in every one of them, its output unchanged."""
    from ft_ray.eval.scoring import prompt_item, score

    model = tiny("free_transformer")
    engine = Engine(model, byte_tokenizer(), model.cfg, "ft", SchedulerConfig(max_num_batched_tokens=CONTEXT))
    gen = GenerationRequest(prompt="abc", max_tokens=40, seed=1, temperature=0.7, plan={"seed": 2})
    alone = engine.generate([gen])[0].choices[0].text
    scoring = GenerationRequest(prompt="x" * 80, max_tokens=0, echo=True, logprobs=1, plan={"samples": 16, "seed": 3})
    g, s = engine.submit(gen), engine.submit_score(scoring)
    start, steps = engine.stats.decode_steps, 0
    while not s.done:
        engine.step()
        steps += 1
    assert steps >= 16  # one plan of 80 tokens per step within the budget of 96 ...
    assert engine.stats.decode_steps - start >= steps - 1  # ... and the generation decoded in each
    while not g.done:
        engine.step()
    (*_, g_end), (*_, s_end) = engine._items(g), engine._items(s)
    assert g_end.unwrap().choices[0].text == alone
    ids = engine.encode(scoring.prompt)
    (ref,) = score(model, [prompt_item(model, ids, 16, 3)])
    assert [t.logprob for t in s_end.unwrap().tokens] == pytest.approx(ref.token_logprobs, abs=1e-9)


def test_generated_logprobs_are_the_model_distribution():
    """A generated token's logprob and alternatives are the model's log-softmax at its position
    (temperature and filters aside), the same as a full forward recomputes."""
    model = tiny("baseline")
    engine = Engine(model, byte_tokenizer(), model.cfg, "base")
    (choice,) = engine.generate([GenerationRequest(prompt="abc", max_tokens=4, temperature=0.9, seed=3,
                                                   top_k=5, logprobs=3)])[0].choices
    ids = engine.encode("abc") + choice.token_ids
    ref = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0, 3:].double(), -1)  # (4, V)
    for t, entry in enumerate(choice.logprobs):
        assert entry.token_id == choice.token_ids[t]
        assert entry.logprob == pytest.approx(float(ref[t, entry.token_id]), abs=1e-5)
        best = ref[t].topk(3).indices.tolist()
        assert [i for i, _ in entry.top][:3] == best  # the chosen token follows when it is not among them


# ------------------------------------------------------------------------------- HTTP
def test_echo_and_logprobs_shapes(server):
    body = {"model": "ft", "prompt": "ab cd", "max_tokens": 0, "echo": True, "logprobs": 2,
            "plan": {"samples": 3, "seed": 5}}
    out = _post(server, body)
    (c,) = out["choices"]
    lp = c["logprobs"]
    assert c["text"] == "ab cd" and lp["tokens"] == list("ab cd") and lp["text_offset"] == [0, 1, 2, 3, 4]
    assert all(isinstance(v, float) and v < 0 for v in lp["token_logprobs"])  # BOS added: every token scored
    assert all(1 <= len(top) <= 3 and tok in top for tok, top in zip(lp["tokens"], lp["top_logprobs"]))
    assert c["score_plan"] == {"samples": 3, "seed": 5} and out["usage"]["completion_tokens"] == 0
    assert _post(server, body)["choices"][0]["logprobs"] == lp  # same plan seed, same numbers
    ids = server.post("/tokenize", json={"prompt": "ab cd", "add_special_tokens": True}).json()["tokens"]
    same = _post(server, {**body, "prompt": ids})["choices"][0]  # BOS first, as given: its logprob is null
    assert same["logprobs"]["token_logprobs"][0] is None and same["logprobs"]["top_logprobs"][0] is None
    assert same["logprobs"]["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"], abs=1e-9)
    gen = _post(server, {**body, "max_tokens": 4, "temperature": 0, "seed": 1})["choices"][0]
    assert len(gen["logprobs"]["tokens"]) == 5 + 4 and gen["text"].startswith("ab cd")
    assert gen["logprobs"]["token_logprobs"][:5] == pytest.approx(lp["token_logprobs"], abs=1e-9)
    plain = _post(server, {"model": "base", "prompt": "xy", "max_tokens": 3, "logprobs": 0, "seed": 1})
    p = plain["choices"][0]["logprobs"]  # generated tokens only; N=0: the chosen token alone
    assert len(p["token_logprobs"]) == 3 and all(len(t) == 1 for t in p["top_logprobs"])
    assert "score_plan" not in plain["choices"][0]
    echo_only = _post(server, {"model": "base", "prompt": "xy", "max_tokens": 2, "echo": True, "seed": 1})
    assert echo_only["choices"][0]["text"].startswith("xy") and echo_only["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a" * (CONTEXT + 1), "max_tokens": 0, "echo": True, "logprobs": 1}, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 0, "echo": True, "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "max_tokens": 0, "echo": True, "logprobs": 1, "plan": {"samples": 65}}, "plan.samples"),
    ({"prompt": "a", "max_tokens": 2, "plan": {"samples": 4}}, "plan.samples"),
    ({"prompt": "a", "max_tokens": 1, "logprobs": 1, "stream": True}, "logprobs"),
    ({"prompt": "a", "max_tokens": 0, "echo": True, "logprobs": 1, "plan": {"codes": [1]}}, "plan.codes"),
    ({"model": "base", "prompt": "a", "max_tokens": 0, "echo": True, "logprobs": 1, "plan": {"samples": 2}}, "plan"),
])
def test_scoring_bad_input_is_a_400_naming_the_field(server, body, param):
    r = server.post("/v1/completions", json={"model": "ft", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenizer_routes(server):
    info = server.get("/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["model_max_length"]) == ("<eos>", "<bos>", CONTEXT)
    tok = server.post("/tokenize", json={"prompt": "hi <eos>", "add_special_tokens": False}).json()
    assert tok["count"] == 8 and tok["tokens"][0] == ord("h") + 3  # special-token text inside is text
    assert server.post("/tokenize", json={"prompt": "<eos>", "add_special_tokens": False}).json()["tokens"] == [2]
    assert server.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "hi <eos>"}
    r = server.post("/detokenize", json={"tokens": [1, 999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[1]"
    r = server.post("/tokenize", json={"prompt": "a", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


@pytest.mark.parametrize("name, plans", [("base", None), ("ft", 4)])
def test_served_scores_equal_native_ones(server, models_dir, name, plans):
    """The continuation's logprobs summed from an echo equal the lm-eval model `ft-ray`'s score
    with the same plan seed and K (plan_mode=shared: one seed for every context)."""
    pairs = [("two_plus_two>", "four"), ("two_plus_two>", "five"), ("seven>", "seven")]
    kw = {} if plans is None else {"num_plans": plans, "plan_seed": 11, "plan_mode": "shared"}
    lm = native(models_dir, name, **kw)
    expected = lm.loglikelihood([req(*p) for p in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, expected, strict=True):
        ctx, cont = lm.encode_pair(context, continuation)
        body = {"model": name, "prompt": ctx[1:] + cont, "max_tokens": 0, "echo": True, "logprobs": 1}
        if plans is not None:
            body["plan"] = {"samples": plans, "seed": 11}
        lp = _post(server, body)["choices"][0]["logprobs"]
        scored = lp["token_logprobs"][len(ctx) - 1:]
        assert sum(scored) == pytest.approx(logprob, abs=1e-5)
        tops = lp["top_logprobs"][len(ctx) - 1:]
        assert all(v == max(t.values()) for v, t in zip(scored, tops)) == greedy  # lm-eval's is_greedy
        if plans is not None:  # the plans matter: another seed gives another estimate
            body["plan"]["seed"] = 12
            other = _post(server, body)["choices"][0]["logprobs"]["token_logprobs"][len(ctx) - 1:]
            assert abs(sum(other) - logprob) > 1e-4


def test_lm_eval_local_completions_against_the_server(server, models_dir, tmp_path):
    """lm-eval's own OpenAI client runs a loglikelihood and a generate_until task through the
    server; per document, the log-likelihoods equal the native model's (baseline: exact; FT: K=8
    plans from lm-eval's request seed, 1234), hence the same accuracy."""
    import lm_eval

    from ft_ray.eval.tasks import task_manager, write_task_data

    suite = write_task_data(tmp_path / "suite", seed=0)
    url = f"{str(server.base_url).rstrip('/')}/v1/completions"
    for name in ("base", "ft"):
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=["ftray_arith_choice", "ftray_arith_gen"],
            model_args=f"model={name},base_url={url},tokenizer_backend=remote,max_length={CONTEXT - 1},"
                       "max_retries=1,timeout=60",
            task_manager=task_manager(suite), limit=4, bootstrap_iters=0, log_samples=True)
        lm = native(models_dir, name, num_plans=8, plan_seed=1234, plan_mode="shared")
        ref = lm_eval.simple_evaluate(model=lm, tasks=["ftray_arith_choice"], task_manager=task_manager(suite),
                                      limit=4, bootstrap_iters=0, log_samples=True)
        got = served["results"]["ftray_arith_choice"]["acc,none"]
        print(f"{name}: served acc {got}, native {ref['results']['ftray_arith_choice']['acc,none']}")
        assert got == ref["results"]["ftray_arith_choice"]["acc,none"], name
        assert math.isfinite(served["results"]["ftray_arith_gen"]["exact_match,none"])
        for a, b in zip(served["samples"]["ftray_arith_choice"], ref["samples"]["ftray_arith_choice"], strict=True):
            assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-5)
            assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]  # is_greedy
        assert all(isinstance(s["resps"][0][0], str) for s in served["samples"]["ftray_arith_gen"])

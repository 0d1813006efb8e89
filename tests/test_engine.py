"""The serving engine: batched == unbatched, parity with `model.generate`, plans and seeds,
stop/EOS/length, streaming (UTF-8, stop hold-back, cancellation) and request validation.

Tiny random-init models are written as real bundles (safetensors + config + tokenizer.json) and
loaded with `Engine.from_bundle`. The EOS row of the LM head is zeroed: EOS then has logit 0 while
the best of the other tokens is positive, so greedy runs reach max_tokens and parity compares
whole sequences (tests that need EOS force it with a hook).
"""

from __future__ import annotations

import json

import pytest
import torch

import ft_ray.serve.engine as engine_module
from ft_ray.config import ModelConfig
from ft_ray.data.tokenizer import byte_tokenizer, letter_tokenizer
from ft_ray.model import build_model
from ft_ray.model.latent import sample_codes, uniform_codes
from ft_ray.serve import Engine, GenerationRequest, PlanSpec, RequestError
from ft_ray.train.checkpoint import write_bundle

EOS = 2



def make_bundle(root, name: str, arch: str, tokenizer, seed: int = 0):
    tok_file = root / f"{name}-tokenizer.json"
    tokenizer.save(str(tok_file))
    cfg = ModelConfig(arch=arch, vocab_size=tokenizer.get_vocab_size(), hidden_dim=32, num_layers=4,
                      num_heads=4, num_key_value_heads=2, latent_bits=4, max_seq_len=64, init_std=0.1)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        model.lm_head.weight[EOS] = 0
    return write_bundle(root / name, model.state_dict(), cfg, {"step": 0}, tok_file)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {"ft": make_bundle(root, "ft", "free_transformer", letter_tokenizer()),
            "baseline": make_bundle(root, "baseline", "baseline", letter_tokenizer(), seed=1),
            "ft-bytes": make_bundle(root, "ft-bytes", "free_transformer", byte_tokenizer(), seed=2)}


@pytest.fixture(scope="module")
def engines(bundles):
    return {k: Engine.from_bundle(p) for k, p in bundles.items()}


def texts(result):
    return [c.text for c in result.choices]


def force_tokens(engine: Engine, pick):
    """Make the LM head emit `pick(call_index)` (None: leave the logits alone) on every call."""
    calls = []

    def hook(module, inputs, out):
        token = pick(len(calls))
        calls.append(token)
        if token is None:
            return out
        forced = torch.full_like(out, -30.0)
        forced[..., token] = 30.0
        return forced

    return engine.model.lm_head.register_forward_hook(hook)


# ---------------------------------------------------------------------------------------------
# batched == unbatched, and parity with the model's own generate()
def mixed_requests(ft: bool) -> list[GenerationRequest]:
    plan = (lambda **kw: PlanSpec(**kw)) if ft else (lambda **kw: None)
    return [
        GenerationRequest("K>", max_tokens=20, temperature=0, seed=1, plan=plan(seed=3)),
        GenerationRequest("AB>__!", max_tokens=15, temperature=0.8, top_k=5, seed=2, n=2),
        GenerationRequest("", max_tokens=10, temperature=1.0, top_p=0.9, seed=3, n=3, plan=plan(shared=True)),
        GenerationRequest("Z>", max_tokens=12, temperature=1.3, seed=4,
                          plan=plan(codes=[i % 16 for i in range(12)])),
        GenerationRequest("Q>___", max_tokens=25, temperature=0.7, top_k=8, top_p=0.8, seed=5, n=3,
                          plan=plan(seed=9, shared=True)),
        GenerationRequest("M>", max_tokens=6, temperature=0, n=2, seed=6, stop=["A"]),
    ]


@pytest.mark.parametrize("kind", ["ft", "baseline"])
def test_batched_equals_unbatched(engines, kind):
    engine = engines[kind]
    requests = mixed_requests(kind == "ft")
    batched = engine.generate(requests)
    assert len(batched) == len(requests)
    for req, together in zip(requests, batched, strict=True):
        alone = engine.generate([req])[0]
        assert len(together.choices) == req.n
        for a, b in zip(alone.choices, together.choices, strict=True):
            assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
            assert a.codes == b.codes and a.seed == b.seed
        assert alone.usage == together.usage
    # the batch is not degenerate: the requests' outputs differ from one another
    assert len({tuple(r.choices[0].token_ids) for r in batched}) == len(requests)


@pytest.mark.parametrize("kind", ["ft", "baseline"])
def test_engine_matches_model_generate(engines, kind):
    engine, n_new = engines[kind], 30
    prompt = torch.tensor(engine.encode("K>__"))[None]  # (1, 5)
    for temperature, kw in ((0.0, {}), (0.9, {"top_k": 12, "top_p": 0.95})):
        plan = {"seed": 5} if kind == "ft" else None
        req = GenerationRequest("K>__", max_tokens=n_new, temperature=temperature, seed=11, plan=plan, **kw)
        choice = engine.generate([req])[0].choices[0]
        codes = None
        if kind == "ft":
            codes = torch.tensor(choice.codes.prompt + choice.codes.new)
            assert codes.shape == (prompt.shape[1] + n_new,)
        # n=1: the sample's token generator is seeded with the request seed itself
        ref, z = engine.model.generate(prompt, n_new, temperature=temperature, plan=codes,
                                       generator=torch.Generator().manual_seed(11), return_plan=True, **kw)
        assert choice.token_ids == ref[0, prompt.shape[1]:].tolist()
        assert choice.finish_reason == "length" and len(choice.token_ids) == n_new
        if kind == "ft":
            assert torch.equal(z[0], codes)


def test_plan_draws_prompt_z_from_the_encoder_then_new_z_from_the_prior(engines):
    engine = engines["ft"]
    model, n_new = engine.model, 9
    choice = engine.generate([GenerationRequest("K>_", max_tokens=n_new, plan={"seed": 77})])[0].choices[0]
    assert choice.codes.seed == 77
    gen = torch.Generator().manual_seed(77)
    with torch.no_grad():
        tokens = torch.tensor(engine.encode("K>_"))[None]
        x = model.embed(tokens)
        cos, sin = model._rope(0, tokens.shape[1])
        for block in model.blocks[:model.cfg.inject_layer]:
            x = block(x, cos, sin)
        prompt_z = sample_codes(model.encoder(x, cos, sin), gen)[0]
    new_z = uniform_codes((1, n_new), model.cfg.latent_bits, gen)[0]
    assert choice.codes.prompt == prompt_z.tolist()
    assert choice.codes.new == new_z.tolist()


# ---------------------------------------------------------------------------------------------
# seeds and plans
def test_seeds_plans_and_reproduction(engines):
    engine = engines["ft"]

    def run(**kw):
        return engine.generate([GenerationRequest("K>", **{"max_tokens": 20, **kw})])[0]

    a, b, c = run(seed=1, plan={"seed": 2}), run(seed=1, plan={"seed": 2}), run(seed=3, plan={"seed": 2})
    assert texts(a) == texts(b) and a.choices[0].codes == b.choices[0].codes
    assert texts(a) != texts(c)  # a different token seed, same plan
    assert a.choices[0].codes == c.choices[0].codes
    d = run(seed=1, plan={"seed": 4})
    assert d.choices[0].codes != a.choices[0].codes and texts(d) != texts(a)

    # shared plan: one whole plan for the n samples; without it the plans differ
    shared = run(seed=5, n=3, plan={"seed": 6, "shared": True})
    assert len({json.dumps(vars(ch.codes)) for ch in shared.choices}) == 1
    assert len(set(texts(shared))) > 1  # the samples still differ (their token generators do)
    fresh = run(seed=5, n=3, plan={"seed": 6})
    assert len({tuple(ch.codes.prompt + ch.codes.new) for ch in fresh.choices}) == 3

    # explicit codes are honoured
    given = [(3 * i + 1) % 16 for i in range(20)]
    explicit = run(seed=7, temperature=0, plan={"codes": given})
    assert explicit.choices[0].codes.new == given
    other = run(seed=7, temperature=0, plan={"codes": [(c + 5) % 16 for c in given]})
    assert texts(other) != texts(explicit)  # the codes matter

    # reproduction: the same seed with the returned new codes gives the same text
    for kw in ({}, {"plan": {"shared": True}}):
        first = run(seed=None, temperature=1.0, **kw)
        ch = first.choices[0]
        assert isinstance(ch.seed, int)
        again = run(seed=ch.seed, temperature=1.0, plan={"codes": ch.codes.new, **kw.get("plan", {})})
        assert again.choices[0].token_ids == ch.token_ids and again.choices[0].codes == ch.codes
    # any sample of n alone: its own seed, n=1, its whole plan (prompt + new codes)
    for ch in shared.choices[1:] + fresh.choices[1:]:
        alone = run(seed=ch.seed, plan={"codes": ch.codes.prompt + ch.codes.new}).choices[0]
        assert alone.token_ids == ch.token_ids
        assert run(seed=ch.seed, plan={"seed": ch.codes.seed}).choices[0].token_ids == ch.token_ids


def test_baseline_seeds(engines):
    engine = engines["baseline"]
    run = lambda seed: engine.generate([GenerationRequest("K>", max_tokens=20, seed=seed, n=2)])[0]  # noqa: E731
    a, b, c = run(8), run(8), run(9)
    assert texts(a) == texts(b) and texts(a) != texts(c) and texts(a)[0] != texts(a)[1]
    assert all(ch.codes is None for ch in a.choices)


# ---------------------------------------------------------------------------------------------
# stop strings, EOS, length, usage
def test_stop_string_length_and_usage(engines):
    engine = engines["ft"]
    base = dict(prompt="A>", max_tokens=24, temperature=0, seed=0, plan={"seed": 1})
    full = engine.generate([GenerationRequest(**base)])[0]
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and len(full.choices[0].token_ids) == 24
    assert full.usage.prompt_tokens == 3 and full.usage.completion_tokens == 24
    stop = text[5:7]
    cut = text.find(stop)
    stopped = engine.generate([GenerationRequest(**base, stop=["never", stop])])[0].choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:cut]
    assert len(stopped.token_ids) == cut + len(stop) < 24  # generation ended there
    two = engine.generate([GenerationRequest(**{**base, "n": 2, "temperature": 1.0})])[0]
    assert two.usage.prompt_tokens == 3  # once per request, whatever n
    assert two.usage.completion_tokens == sum(len(c.token_ids) for c in two.choices) > 2
    for c in two.choices:  # sampling may draw EOS (logit 0)
        ended = (c.finish_reason == "length" and len(c.token_ids) == 24) or (
            c.finish_reason == "stop" and c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1])
        assert ended and c.text == engine.decode(c.token_ids)


def test_eos_ends_a_sample(bundles):
    engine = Engine.from_bundle(bundles["ft"])
    handle = force_tokens(engine, lambda i: EOS if i == 3 else None)  # 4th token is EOS
    try:
        result = engine.generate([GenerationRequest("K>", max_tokens=20, temperature=0, seed=0)])[0]
    finally:
        handle.remove()
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and choice.token_ids[-1] == EOS and len(choice.token_ids) == 4
    assert choice.text == engine.decode(choice.token_ids[:3]) and len(choice.text) == 3
    assert result.usage.completion_tokens == 4


def test_finished_rows_leave_the_batch(engines, monkeypatch):
    engine = engines["baseline"]
    sizes = []
    real = engine_module.decode_step

    def counting(model, cache, tokens, positions, *rest):
        sizes.append(tokens.shape[0])
        return real(model, cache, tokens, positions, *rest)

    monkeypatch.setattr(engine_module, "decode_step", counting)
    engine.generate([GenerationRequest("K>", max_tokens=3, temperature=0, n=2),
                     GenerationRequest("AB>", max_tokens=8, temperature=0)])
    assert sizes == [3, 3] + [1] * 5  # the n=2 request is done after 3 tokens


# ---------------------------------------------------------------------------------------------
# streaming
def test_stream_deltas_concatenate_to_the_text(engines):
    engine = engines["ft"]
    base = dict(prompt="A>", max_tokens=24, temperature=0, seed=0, plan={"seed": 1})
    text = engine.generate([GenerationRequest(**base)])[0].choices[0].text
    stop = text[5:7]  # its first character is streamed only once we know it does not start `stop`
    for kw in ({}, {"stop": [stop]}, {"n": 3, "temperature": 0.9, "stop": ["A_", "!!"]}):
        req = GenerationRequest(**{**base, **kw})
        expected = engine.generate([req])[0]
        events = list(engine.stream(req))
        for ch in expected.choices:
            mine = [e for e in events if e.index == ch.index]
            assert "".join(e.text for e in mine) == ch.text
            assert [e.finish_reason for e in mine][-1] == ch.finish_reason
            assert all(e.finish_reason is None for e in mine[:-1])
            assert mine[-1].choice == ch
        assert events[-1].usage == expected.usage
        assert all(e.usage is None for e in events[:-1])


def test_stream_never_splits_a_utf8_character(bundles):
    engine = Engine.from_bundle(bundles["ft-bytes"])
    target = "é€😀".encode()  # 2 + 3 + 4 bytes
    ids = [3 + b for b in target]  # the byte tokenizer's id of byte b is 3 + b
    assert engine.decode(ids) == "é€😀"
    handle = force_tokens(engine, lambda i: ids[i])
    try:
        events = list(engine.stream(GenerationRequest("x", max_tokens=len(ids), temperature=0)))
    finally:
        handle.remove()
    deltas = [e.text for e in events if e.text]
    assert deltas == ["é", "€", "😀"]
    assert events[-1].finish_reason == "length" and events[-1].choice.text == "é€😀"
    assert events[-1].usage.completion_tokens == len(ids)


def test_closing_a_stream_stops_generation(engines):
    engine = engines["baseline"]
    req = GenerationRequest("K>", max_tokens=40, temperature=0)
    before = engine.stats.decode_steps
    stream = engine.stream(req)
    first, second = next(stream), next(stream)
    assert first.text and second.text and second.finish_reason is None
    stream.close()
    assert engine.stats.decode_steps - before <= 2  # not the 39 steps of the whole request
    with pytest.raises(StopIteration):
        next(stream)
    assert engine.stats.decode_steps - before <= 2
    full = list(engine.stream(req))
    assert full[-1].finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# bundles and validation
def test_from_bundle_and_info(bundles, engines, tmp_path):
    ft, base = engines["ft"].info(), engines["baseline"].info()
    assert (ft.name, ft.arch, ft.latent_bits, ft.max_seq_len, ft.vocab_size) == ("ft", "free_transformer", 4, 64, 58)
    assert (base.arch, base.latent_bits) == ("baseline", None)
    assert ft.params == engines["ft"].model.num_params() > base.params
    (tmp_path / "no-tok").mkdir()
    for f in ("model.safetensors", "config.json", "metrics.json"):
        (tmp_path / "no-tok" / f).write_bytes((bundles["ft"] / f).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Engine.from_bundle(tmp_path / "no-tok")


OK = {"prompt": "K>", "max_tokens": 8}
BAD = [  # (body, field)
    ([1, 2], "body"),
    ({"max_tokens": 8}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["K>"]}, "prompt"),
    ({"prompt": "K>" * 40}, "prompt"),  # 81 tokens > 64
    ({"prompt": "Ké>"}, "prompt"),  # a character the letter tokenizer lacks
    ({**OK, "max_tokens": 0}, "max_tokens"),
    ({**OK, "max_tokens": -3}, "max_tokens"),
    ({**OK, "max_tokens": "8"}, "max_tokens"),
    ({**OK, "max_tokens": 8.0}, "max_tokens"),
    ({**OK, "max_tokens": True}, "max_tokens"),
    ({**OK, "max_tokens": 10**12}, "max_tokens"),
    ({"prompt": "K>" + "_" * 50, "max_tokens": 20}, "max_tokens"),  # 53 + 20 > 64
    ({**OK, "temperature": -0.5}, "temperature"),
    ({**OK, "temperature": float("nan")}, "temperature"),
    ({**OK, "temperature": float("inf")}, "temperature"),
    ({**OK, "temperature": 10**400}, "temperature"),
    ({**OK, "temperature": 1e-9}, "temperature"),
    ({**OK, "temperature": "hot"}, "temperature"),
    ({**OK, "top_p": 0}, "top_p"),
    ({**OK, "top_p": 1.5}, "top_p"),
    ({**OK, "top_p": float("nan")}, "top_p"),
    ({**OK, "top_k": 0}, "top_k"),
    ({**OK, "top_k": 2.5}, "top_k"),
    ({**OK, "n": 0}, "n"),
    ({**OK, "n": 17}, "n"),
    ({**OK, "n": "2"}, "n"),
    ({**OK, "stop": 5}, "stop"),
    ({**OK, "stop": [""]}, "stop[0]"),
    ({**OK, "stop": ["a", 1]}, "stop[1]"),
    ({**OK, "seed": -1}, "seed"),
    ({**OK, "seed": 2**64}, "seed"),
    ({**OK, "seed": "x"}, "seed"),
    ({**OK, "stream": True}, "stream"),  # unknown unless the caller allows it
    ({**OK, "plan": 5}, "plan"),
    ({**OK, "plan": {"sed": 1}}, "plan.sed"),
    ({**OK, "plan": {"seed": -2}}, "plan.seed"),
    ({**OK, "plan": {"shared": "yes"}}, "plan.shared"),
    ({**OK, "plan": {"codes": "0123"}}, "plan.codes"),
    ({**OK, "plan": {"codes": [0] * 7}}, "plan.codes"),  # neither 8 (new) nor 11 (all)
    ({**OK, "plan": {"codes": [0] * 7 + [16]}}, "plan.codes[7]"),  # 2^4 = 16 codes
    ({**OK, "plan": {"codes": [0] * 7 + [-1]}}, "plan.codes[7]"),
    ({**OK, "plan": {"codes": [0] * 7 + [1.0]}}, "plan.codes[7]"),
]


@pytest.mark.parametrize(("body", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_requests_name_the_field(engines, body, field):
    with pytest.raises(RequestError) as info:
        engines["ft"].validate(body)
    assert info.value.field == field and info.value.status == 400
    assert info.value.to_dict()["error"]["param"] == field


def test_a_huge_prompt_is_refused_before_tokenising(engines, monkeypatch):
    engine = engines["ft"]
    monkeypatch.setattr(engine, "encode", lambda text: pytest.fail("tokenised a huge prompt"))
    with pytest.raises(RequestError) as info:
        engine.validate({"prompt": "K" * 100_000})
    assert (info.value.field, info.value.status) == ("prompt", 413)


def test_validation_edge_cases(engines):
    ft, base = engines["ft"], engines["baseline"]
    # NaN straight from a JSON parser
    with pytest.raises(RequestError) as info:
        ft.validate(json.loads('{"prompt": "K>", "temperature": NaN}'))
    assert info.value.field == "temperature"
    # a plan on a baseline model
    for plan in ({"seed": 1}, {"shared": True}, {"codes": [0] * 8}):
        with pytest.raises(RequestError) as info:
            base.validate({**OK, "plan": plan})
        assert info.value.field == "plan"
    # checks also guard requests built in Python and passed to generate()
    with pytest.raises(RequestError) as info:
        ft.generate([GenerationRequest("K>", max_tokens=62)])
    assert info.value.field == "max_tokens"
    with pytest.raises(RequestError):
        GenerationRequest("K>", top_p=0.0)
    # what is accepted: extra keys the caller handles, null defaults, a string stop, both plan forms
    req = ft.validate({**OK, "model": "ft", "stop": "A", "n": None, "plan": {"codes": [1] * 11}},
                      allowed_extra={"model"})
    assert req.stop == ["A"] and req.n == 1 and req.plan.codes == [1] * 11
    assert ft.validate({**OK, "plan": {"seed": 3, "codes": [15] * 8, "shared": True}}).plan.shared
    # an empty prompt means "start from BOS alone"
    empty = ft.validate({"prompt": "", "max_tokens": 5, "seed": 0})
    result = ft.generate([empty])[0]
    assert result.usage.prompt_tokens == 1 and len(result.choices[0].codes.prompt) == 1
    assert len(result.choices[0].token_ids) == 5

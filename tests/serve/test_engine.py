"""The serving engine: batched == unbatched, parity with `model.generate`, plans and seeds,
stop/EOS/length, streaming (UTF-8, stop hold-back, cancellation), request validation, and the
continuous-batching loop (staggered arrivals == solo runs, early returns, slot reuse, refusals,
cancellation, isolation of a failing request, the async API).

Tiny random-init models are written as real bundles (safetensors + config + tokenizer.json) and
loaded with `Engine.from_bundle`. The EOS row of the LM head is zeroed: EOS then has logit 0 while
the best of the other tokens is positive, so greedy runs reach max_tokens and parity compares
whole sequences (tests that need EOS force it with a hook).
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time

import pytest
import torch

import ft_ray.serve.scheduler as scheduler_module
from ft_ray.bundle import write_bundle
from ft_ray.config import ModelConfig
from ft_ray.data.tokenizer import byte_tokenizer, letter_tokenizer
from ft_ray.model import build_model
from ft_ray.model.latent import sample_codes, uniform_codes
from ft_ray.model.sampling import sample_rows
from ft_ray.serve import (
    Engine,
    GenerationRequest,
    GenerationResult,
    PlanSpec,
    RequestError,
    StreamEvent,
)
from ft_ray.serve.engine import GenerationError, RequestCancelled
from ft_ray.serve.handle import End
from ft_ray.serve.requests import MIN_TEMPERATURE
from ft_ray.serve.scheduler import SchedulerConfig
from ft_ray.serve.sequence import Row

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

    a, b, c = run(seed=2, plan={"seed": 2}), run(seed=2, plan={"seed": 2}), run(seed=5, plan={"seed": 2})
    assert texts(a) == texts(b) and a.choices[0].codes == b.choices[0].codes
    assert texts(a) != texts(c)  # a different token seed, same plan
    assert a.choices[0].codes == c.choices[0].codes
    d = run(seed=2, plan={"seed": 4})
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


def record_decode_batches(engine: Engine, monkeypatch) -> list[int]:
    """Record the batch size of every one-token forward the engine runs."""
    sizes: list[int] = []
    real = engine.model.forward_tokens

    def counting(tokens, *args, **kwargs):
        if tokens.shape[1] == 1:
            sizes.append(tokens.shape[0])
        return real(tokens, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward_tokens", counting)
    return sizes


def test_finished_rows_leave_the_batch(engines, monkeypatch):
    engine = engines["baseline"]
    sizes = record_decode_batches(engine, monkeypatch)
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
    ({"prompt": ["K>"]}, "prompt[0]"),  # a list is token ids (the HTTP layer splits lists of strings)
    ({"prompt": [3, 9999]}, "prompt[1]"),  # outside the vocabulary
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


# ---------------------------------------------------------------------------------------------
# continuous batching: requests arrive at any step and still equal their solo runs
def drain(handle) -> list:
    """The items a synchronous handle has received so far."""
    items = []
    while True:
        try:
            items.append(handle.get(0))
        except queue.Empty:
            return items


def run_arrivals(engine: Engine, arrivals: list[tuple[int, GenerationRequest, bool]]):
    """Submit (step, request, stream) before that step of a loop this test drives; step until all
    are done. Returns the handles and the items each received (events, then its End)."""
    handles, items = [None] * len(arrivals), [[] for _ in arrivals]
    step = 0
    while any(h is None or not h.done for h in handles):
        for i, (at, req, stream) in enumerate(arrivals):
            if at == step:
                handles[i] = engine.submit(req, stream=stream)
        engine.step()
        for i, h in enumerate(handles):
            if h is not None:
                items[i] += drain(h)
        step += 1
    return handles, items


def assert_same(result: GenerationResult, solo: GenerationResult) -> None:
    assert len(result.choices) == len(solo.choices)
    for a, b in zip(result.choices, solo.choices, strict=True):
        assert (a.token_ids, a.text, a.finish_reason, a.seed, a.codes) == (
            b.token_ids, b.text, b.finish_reason, b.seed, b.codes)
    assert result.usage == solo.usage


def assert_stream_matches(events: list[StreamEvent], solo: GenerationResult) -> None:
    for ch in solo.choices:
        mine = [e for e in events if e.index == ch.index]
        assert "".join(e.text for e in mine) == ch.text and mine[-1].choice == ch
    assert events[-1].usage == solo.usage


@pytest.fixture(scope="module")
def small(bundles):
    """Engines with 6 slots and a budget of one slot length: requests wait, slots are reused and
    rows change slots (compaction) while others decode, and prefills are split across steps."""
    cfg = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64)
    return {k: Engine.from_bundle(bundles[k], scheduler=cfg) for k in ("ft", "baseline")}


@pytest.mark.parametrize("kind", ["ft", "baseline"])
def test_staggered_arrivals_equal_solo_runs(engines, small, kind, monkeypatch):
    requests = mixed_requests(kind == "ft")  # n > 1, shared plan, explicit codes, stop strings
    solo = [engines[kind].generate([req])[0] for req in requests]
    for engine in (engines[kind], small[kind]):
        sizes = record_decode_batches(engine, monkeypatch)
        arrivals = [(3 * i, req, i % 2 == 1) for i, req in enumerate(requests)]  # streams and not, mixed
        handles, items = run_arrivals(engine, arrivals)
        for (_, _, stream), its, alone in zip(arrivals, items, solo, strict=True):
            assert isinstance(its[-1], End)
            assert_same(its[-1].unwrap(), alone)
            if stream:
                assert_stream_matches(its[:-1], alone)
            else:
                assert len(its) == 1
        # the arrivals really were staggered into a running batch: the first request (20 tokens)
        # was still decoding when the last one arrived, and decode steps mixed requests' rows
        assert handles[0].finished_step > handles[-1].finished_step - handles[-1].request.max_tokens
        assert max(sizes) > max(req.n for req in requests)
        assert engine._scheduler.num_running == 0 and sorted(engine._scheduler._free) == list(
            range(engine._scheduler.cfg.max_num_seqs))
        monkeypatch.undo()


def test_a_short_request_returns_while_long_ones_decode(engines):
    engine = engines["ft"]
    long = [GenerationRequest(p, max_tokens=30, temperature=0, seed=1) for p in ("K>", "AB>")]  # greedy: no EOS
    a, b = (engine.submit(r) for r in long)
    start = engine.stats.steps + 1  # the step that prefills them
    for _ in range(5):
        engine.step()
    short = engine.submit(GenerationRequest("Q>", max_tokens=3, temperature=0.9, seed=3))
    arrival = engine.stats.steps + 1
    while not short.done:
        engine.step()
    assert short.finished_step == arrival + 2  # prefill (token 1), then two decode steps
    (end,) = drain(short)  # its result is there at once...
    assert not a.done and not b.done  # ...while the long ones are still decoding
    while not (a.done and b.done):
        engine.step()
    assert a.finished_step == b.finished_step == start + 29
    assert_same(end.unwrap(), engine.generate([short.request])[0])


def test_slots_are_reused_and_the_cache_is_allocated_once(bundles, engines, monkeypatch):
    engine = Engine.from_bundle(bundles["ft"], scheduler=SchedulerConfig(max_num_seqs=2))
    sched = engine._scheduler
    cfg = engine.cfg
    assert engine.kv_cache_bytes == 2 * cfg.num_layers * 2 * cfg.num_key_value_heads * 64 * cfg.head_dim * 4
    ptrs = [t.data_ptr() for c in sched.caches for t in (c.k, c.v)] + [sched.slot_codes.data_ptr()]
    sizes = record_decode_batches(engine, monkeypatch)
    requests = [GenerationRequest(p, max_tokens=m, temperature=0.8, seed=i, n=n, plan=plan)
                for i, (p, m, n, plan) in enumerate([("K>", 9, 1, None), ("AB>", 4, 2, {"shared": True}),
                                                     ("Z>", 12, 1, {"seed": 4}), ("", 6, 2, None),
                                                     ("M>_", 7, 1, None), ("Q>", 5, 2, {"seed": 1})])]
    results = engine.generate(requests)  # 9 rows through 2 slots
    for req, result in zip(requests, results, strict=True):
        assert_same(result, engines["ft"].generate([req])[0])
    assert max(sizes) == 2 and len(sizes) > sum(r.max_tokens for r in requests) // 2 - len(requests)
    assert [t.data_ptr() for c in sched.caches for t in (c.k, c.v)] + [sched.slot_codes.data_ptr()] == ptrs
    assert sorted(sched._free) == [0, 1] and sched.num_running == 0


def test_requests_that_can_never_fit_or_must_not_wait(bundles):
    engine = Engine.from_bundle(bundles["ft"], scheduler=SchedulerConfig(
        max_num_seqs=2, max_len=16, max_num_batched_tokens=16, max_waiting=2))
    assert engine.info().max_seq_len == 16 and engine.info().max_n == 2
    for body, field in (({"prompt": "K>", "n": 3, "max_tokens": 4}, "n"), ({"prompt": "K>" + "_" * 20}, "prompt"),
                        ({"prompt": "K>", "max_tokens": 14}, "max_tokens")):  # 3 + 14 > 16
        with pytest.raises(RequestError) as info:
            engine.validate(body)
        assert (info.value.field, info.value.status) == (field, 400)
        with pytest.raises(RequestError) as info:
            engine.submit(GenerationRequest(**body))
        assert (info.value.field, info.value.status) == (field, 400)
    ok = GenerationRequest("K>", max_tokens=4, n=2)
    first, second = engine.submit(ok), engine.submit(ok)  # the queue holds 2
    with pytest.raises(RequestError) as info:
        engine.submit(ok)
    assert info.value.status == 503 and info.value.retry_after > 0 and "retry" in info.value.message
    engine.step()  # the first takes both slots: one place in the queue again
    third = engine.submit(ok)
    engine.generate([])  # nothing; the in-process API is never refused for a full queue
    while not (first.done and second.done and third.done):
        engine.step()
    for bad in (dict(max_num_seqs=0), dict(max_len=1), dict(max_waiting=-1), dict(max_num_batched_tokens=1.5)):
        with pytest.raises(ValueError):
            SchedulerConfig(**bad)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine.from_bundle(bundles["ft"], scheduler=SchedulerConfig(max_num_batched_tokens=32))


def test_cancel_frees_the_slots_at_the_next_step(bundles, engines):
    engine = Engine.from_bundle(bundles["baseline"], scheduler=SchedulerConfig(max_num_seqs=2))
    sched = engine._scheduler
    a = engine.submit(GenerationRequest("K>", max_tokens=40, n=2, seed=1), stream=True)
    waiting = GenerationRequest("AB>", max_tokens=6, seed=2)
    b = engine.submit(waiting)
    for _ in range(3):
        engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1 and len(drain(a)) > 0
    engine.cancel(a)
    engine.step()  # frees a's slots, admits b
    assert isinstance(drain(a)[-1].error, RequestCancelled) and a.done
    while not b.done:
        engine.step()
    assert_same(drain(b)[-1].unwrap(), engines["baseline"].generate([waiting])[0])
    # a synchronous stream that is closed early frees its slots at once
    stream = engine.stream(GenerationRequest("K>", max_tokens=40, n=2))
    next(stream)
    assert sched.num_running == 2
    stream.close()
    assert sched.num_running == 0 and sorted(sched._free) == [0, 1]


# ---------------------------------------------------------------------------------------------
# isolation: one failing request fails alone
def inject_failures(engine: Engine, monkeypatch) -> None:
    """Seed 666: its row's draw raises at its 3rd token (an exception in its sampling). Seed 667:
    the model's logits for its row turn NaN at its 5th token (bad numerics in one batch row)."""
    sched, real_draw, real_forward = engine._scheduler, Row.draw, engine.model.forward_tokens

    def draw(row):
        if row.seq.seed == 666 and len(row.token_ids) == 3:
            raise RuntimeError("injected sampling failure")
        return real_draw(row)

    def forward(tokens, latent_fn=None, caches=None, rows=None, *args, **kwargs):
        out = real_forward(tokens, latent_fn, caches, rows, *args, **kwargs)
        if rows is not None and tokens.shape[1] == 1:
            slots = (list(range(rows.first, rows.first + tokens.shape[0])) if rows.first is not None
                     else rows.slots.tolist())
            for seq in sched._admitted:
                for row in seq.rows:
                    if seq.seed == 667 and len(row.token_ids) == 5 and row.slot in slots:
                        out[slots.index(row.slot)] = float("nan")
        return out

    monkeypatch.setattr(Row, "draw", draw)
    monkeypatch.setattr(engine.model, "forward_tokens", forward)


@pytest.mark.parametrize("kind", ["ft", "baseline"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched-sampling", "per-row-fallback"])
def test_a_failing_request_fails_alone(engines, kind, batched, monkeypatch):
    engine = engines[kind]
    requests = mixed_requests(kind == "ft")
    solo = [engine.generate([req])[0] for req in requests]
    boom = GenerationRequest("B>", max_tokens=20, temperature=0.8, seed=666, n=2)
    nan = GenerationRequest("N>", max_tokens=20, temperature=0, seed=667)
    inject_failures(engine, monkeypatch)
    if not batched:  # the batched sampler itself fails: every row is sampled alone, same draws
        def broken(logits, *args):
            if logits.shape[0] > 1:
                raise RuntimeError("batched sampler bug")
            return sample_rows(logits, *args)
        monkeypatch.setattr(scheduler_module, "sample_rows", broken)
    failed_before = engine.stats.failed_requests
    arrivals = [(2 * i, req, i % 2 == 0) for i, req in enumerate(requests)]
    arrivals[2:2] = [(3, boom, True), (4, nan, False)]
    handles, items = run_arrivals(engine, arrivals)
    outcome = [its[-1] for its in items]
    assert "injected sampling failure" in str(outcome[2].error) and isinstance(outcome[2].error, GenerationError)
    assert "NaN" in str(outcome[3].error)
    assert len(items[2]) > 1  # the failed stream had sent events before its error
    for end, alone in zip(outcome[:2] + outcome[4:], solo, strict=True):
        assert_same(end.unwrap(), alone)  # its batch-mates finished, exactly as alone
    assert engine.stats.failed_requests == failed_before + 2
    assert engine._scheduler.num_running == 0
    with pytest.raises(GenerationError, match="injected"):  # the sync API raises it too
        list(engine.stream(boom))
    with pytest.raises(GenerationError, match="NaN"):
        engine.generate([nan])


def test_extreme_sampling_settings_run_and_equal_greedy(engines):
    engine = engines["ft"]
    base = dict(prompt="K>_", max_tokens=12, seed=4, plan={"seed": 2})
    greedy = engine.generate([GenerationRequest(**base, temperature=0)])[0].choices[0]
    for kw in ({"temperature": MIN_TEMPERATURE}, {"top_p": 1e-300}, {"temperature": 1.5, "top_p": 1e-300},
               {"temperature": MIN_TEMPERATURE, "top_k": 3, "top_p": 1e-300}):
        req = engine.validate({**base, **kw})
        assert engine.generate([req])[0].choices[0].token_ids == greedy.token_ids


def test_unencodable_characters_are_named(engines):
    with pytest.raises(RequestError) as info:
        engines["ft"].validate({"prompt": "Ké€>é"})
    assert info.value.field == "prompt" and info.value.status == 400
    assert info.value.message == "characters the model cannot encode: 'é', '€'"


# ---------------------------------------------------------------------------------------------
# one plan: model.generate and the engine draw the same codes for the same seed
def test_model_generate_equals_engine_for_the_same_plan_seed(engines):
    engine = engines["ft"]
    prompt = torch.tensor(engine.encode("K>__"))[None]  # (1, 5)
    n_new = 14
    for plan in ({"seed": 31}, {"seed": 31, "shared": True}):
        request = GenerationRequest("K>__", max_tokens=n_new, temperature=0, n=3, plan=plan)
        choices = engine.generate([request])[0].choices
        seq, z = engine.model.generate(prompt.expand(3, -1), n_new, temperature=0, plan=31,
                                       shared_plan=plan.get("shared", False), return_plan=True)
        for j, ch in enumerate(choices):
            assert ch.codes.prompt + ch.codes.new == z[j].tolist()
            assert ch.token_ids == seq[j, 5:].tolist()
        assert len({tuple(c.codes.new) for c in choices}) == (1 if plan.get("shared") else 3)
    # sampled tokens too, with n = 1 (one token generator, seeded with the request seed)
    choice = engine.generate([GenerationRequest("K>__", max_tokens=n_new, temperature=0.9, top_k=10, seed=8,
                                                plan={"seed": 31})])[0].choices[0]
    seq, z = engine.model.generate(prompt, n_new, temperature=0.9, top_k=10, plan=31,
                                   generator=torch.Generator().manual_seed(8), return_plan=True)
    assert choice.token_ids == seq[0, 5:].tolist() and choice.codes.prompt + choice.codes.new == z[0].tolist()


# ---------------------------------------------------------------------------------------------
# the async API (a loop thread, handles awaited in an event loop) and concurrent sync callers
def test_async_submit_await_stream_cancel_and_close(bundles, engines):
    engine = Engine.from_bundle(bundles["ft"])
    requests = mixed_requests(True)
    solo = [engines["ft"].generate([req])[0] for req in requests]

    async def main():
        handles = []  # the first submit inside the event loop starts the loop thread
        for i, req in enumerate(requests):
            handles.append(engine.submit(req, stream=i % 2 == 0))
            await asyncio.sleep(0.002 * i)  # arrivals while others decode
        for i, handle in enumerate(handles):
            if handle.stream:
                assert_stream_matches([e async for e in handle], solo[i])
            else:
                assert_same(await handle, solo[i])
        # from here decode steps take >= 20 ms, so the loop thread cannot finish these 60-token
        # requests before the test cancels or closes (the tiny model alone does 60 in ~20 ms)
        real_forward = engine.model.forward_tokens

        def slow_forward(tokens, *args, **kwargs):
            if tokens.shape[1] == 1:
                time.sleep(0.02)
            return real_forward(tokens, *args, **kwargs)

        engine.model.forward_tokens = slow_forward
        # a client that goes away: cancel after its first event
        gone = engine.submit(GenerationRequest("K>", max_tokens=60, temperature=0), stream=True)  # no early EOS
        seen = 0
        with pytest.raises(RequestCancelled):  # the stream ends with the cancellation
            async for _ in gone:
                seen += 1
                engine.cancel(gone)
        assert 1 <= seen < 60
        # closing the engine (e.g. the model is unloaded) fails what is still running
        pending = engine.submit(GenerationRequest("K>", max_tokens=60, temperature=0))
        await asyncio.sleep(0.01)
        engine.close()
        with pytest.raises(GenerationError, match="unloaded") as info:
            await pending
        assert info.value.status == 503
        with pytest.raises(RequestError) as info:
            engine.submit(GenerationRequest("K>"))
        assert info.value.status == 503

    try:
        asyncio.run(main())
    finally:
        engine.model.__dict__.pop("forward_tokens", None)
    assert engine._scheduler.num_running == 0 and not engine._threaded


def test_concurrent_sync_callers_share_the_loop(engines):
    """Threads calling generate/stream at once (as the current app does, via to_thread) step one
    shared loop in turn; each gets its own output."""
    engine = engines["baseline"]
    requests = mixed_requests(False)
    solo = [engine.generate([req])[0] for req in requests]
    out: dict[int, object] = {}

    def worker(i):
        if i % 2:
            out[i] = engine.generate([requests[i]])[0]
        else:
            out[i] = list(engine.stream(requests[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, alone in enumerate(solo):
        if i % 2:
            assert_same(out[i], alone)
        else:
            assert_stream_matches(out[i], alone)


def test_a_broken_step_fails_what_runs_and_the_loop_goes_on(bundles, monkeypatch):
    engine = Engine.from_bundle(bundles["baseline"])
    sched, calls = engine._scheduler, []
    real = sched._compact

    def broken():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("scheduler bug")
        real()

    monkeypatch.setattr(sched, "_compact", broken)

    async def main():
        first = engine.submit(GenerationRequest("K>", max_tokens=20, seed=1))
        with pytest.raises(GenerationError, match="scheduler bug"):
            await first
        again = await engine.submit(GenerationRequest("K>", max_tokens=5, seed=1))
        assert len(again.choices[0].token_ids) == 5
        engine.close()

    asyncio.run(main())
    assert sched.num_running == 0 and sorted(sched._free) == list(range(sched.cfg.max_num_seqs))


def test_event_batches_of_a_slow_consumer_hold_every_event_once(bundles, engines):
    """A stream read after the engine ran ahead: its events come in a few lists, in order, equal
    to the request's own stream (what the Serve app writes as one SSE message per list)."""
    engine = Engine.from_bundle(bundles["ft"])
    req = GenerationRequest("K>", max_tokens=30, temperature=0.8, seed=3, plan=PlanSpec(seed=4))
    solo = engines["ft"].generate([req])[0]

    async def main():
        handle = engine.submit(req, stream=True)
        while not handle.done:  # the consumer lags: everything is queued before it reads
            await asyncio.sleep(0.01)
        return [batch async for batch in handle.event_batches()]

    try:
        batches = asyncio.run(main())
    finally:
        engine.close()
    assert len(batches) == 1 and len(batches[0]) >= 2  # one write instead of one per token
    assert_stream_matches([e for b in batches for e in b], solo)


def test_event_batches_with_a_stream_interval_send_the_first_event_alone_then_groups():
    """min_events (the app's stream_interval): the first event at once, then lists of at least
    min_events until the end, which flushes whatever is left; nothing lost, nothing reordered."""
    from ft_ray.serve.handle import End, RequestHandle
    from ft_ray.serve.results import StreamEvent

    async def main(num_events: int, min_events: int):
        handle = RequestHandle(GenerationRequest("K>", max_tokens=num_events), True, asyncio.get_running_loop())
        events = [StreamEvent(index=0, text=str(i), finish_reason=None) for i in range(num_events)]

        async def produce():  # one event per "decode step", as the loop thread puts them
            for event in events:
                handle.put(event)
                await asyncio.sleep(0.002)
            handle.put(End(result="done"))  # type: ignore[arg-type]  (the result is not read here)

        task = asyncio.create_task(produce())
        batches = [batch async for batch in handle.event_batches(min_events)]
        await task
        return events, batches

    for num_events, min_events in ((10, 4), (3, 4), (7, 1)):
        events, batches = asyncio.run(main(num_events, min_events))
        assert [e for b in batches for e in b] == events
        assert len(batches[0]) == 1  # time to first token is not delayed
        assert all(len(b) >= min_events for b in batches[1:-1])

"""`ft-ray export hf`: the exported transformers model against ft-ray's (logits, generation, the
FT's honest default Z), the save/load round trip, lm-eval's `hf` backend, and refused input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from ft_ray.bundle import load_bundle, write_bundle
from ft_ray.cli import main
from ft_ray.config import ModelConfig
from ft_ray.data.tokenizer import letter_tokenizer
from ft_ray.model import build_model

transformers = pytest.importorskip("transformers")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # no hub here: fail fast, never wait

MAX_LEN = 40
# (arch, tie_embeddings): both architectures, tied and untied, all with GQA (4 query / 2 KV heads)
KINDS = [("baseline", True), ("baseline", False), ("free_transformer", False), ("free_transformer", True)]


def _bundle(root: Path, arch: str, tie: bool, with_tokenizer: bool = True) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=64, hidden_dim=32, num_layers=4, num_heads=4,
                      num_key_value_heads=2, max_seq_len=MAX_LEN, latent_bits=4, tie_embeddings=tie,
                      init_std=0.3)  # large weights: greedy tokens vary, and Z matters
    tok = root / "tokenizer.json"
    if not tok.exists():
        letter_tokenizer().save(str(tok))
    name = f"{arch}-{'tied' if tie else 'untied'}{'' if with_tokenizer else '-notok'}"
    return write_bundle(root / name, build_model(cfg).state_dict(), cfg, {"step": 0},
                        tok if with_tokenizer else None)


def _ref(bundle: Path):
    loaded = load_bundle(bundle)
    return loaded[0] if isinstance(loaded, tuple) else loaded


def _export(bundle: Path, out: Path, *extra: str) -> int:
    return main(["export", "hf", str(bundle), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(arch, tie): (bundle dir, export dir)}."""
    root = tmp_path_factory.mktemp("export")
    result = {}
    for arch, tie in KINDS:
        bundle = _bundle(root, arch, tie)
        out = root / f"{bundle.name}-hf"
        assert _export(bundle, out) == 0
        result[(arch, tie)] = (bundle, out)
    return result


def _load(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()


def _tokens(seed: int, shape) -> torch.Tensor:
    return torch.randint(3, 58, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# files

def test_export_writes_a_self_contained_transformers_directory(exported):
    _, out = exported[("free_transformer", False)]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "configuration_ft_ray.py", "modeling_ft_ray.py", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ft_ray.FtRayForCausalLM"
    assert config["arch"] == "free_transformer" and config["max_position_embeddings"] == MAX_LEN
    for name in ("modeling_ft_ray.py", "configuration_ft_ray.py"):
        lines = (out / name).read_text().splitlines()
        assert not [line for line in lines if re.match(r"\s*(from|import)\s+ft_ray\b", line)]
        assert len(lines) < 400
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # the temporary sibling is gone


def test_tokenizer_is_a_fast_tokenizer_with_ft_ray_ids_and_specials(exported):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, out = exported[("baseline", True)]
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "K>__KKKK!_"
    assert tok(text).input_ids == letter_tokenizer().encode(text, add_special_tokens=False).ids
    assert tok.decode(tok(text).input_ids) == text and tok.model_max_length == MAX_LEN


# ----------------------------------------------------------------------------------------------
# parity with ft-ray

@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k[0]}-{'tied' if k[1] else 'untied'}")
def test_logits_equal_ft_ray(exported, kind):
    bundle, out = exported[kind]
    ref, hf = _ref(bundle), _load(out)
    x = _tokens(0, (2, 17))
    with torch.no_grad():
        if kind[0] == "baseline":
            want, got = ref(x).logits, hf(x).logits
        else:
            codes = torch.randint(0, 16, (2, 17), generator=torch.Generator().manual_seed(1))
            want, got = ref(x, z=codes).logits, hf(x, latent_codes=codes).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert hf.lm_head.weight is hf.embed.weight if kind[1] else hf.lm_head.weight is not hf.embed.weight


def test_ft_default_forward_scores_with_prior_plans_never_the_encoder(exported):
    """lm-eval's loglikelihood calls the forward without codes: its Z must not read the tokens."""
    bundle, out = exported[("free_transformer", False)]
    ref, hf = _ref(bundle), _load(out)
    x = _tokens(2, (1, 12))
    y = x.clone()
    y[0, -1] = 3 if int(x[0, -1]) != 3 else 4  # another last token
    with torch.no_grad():
        for num_plans in (1, 3):
            a, b = hf(x, num_plans=num_plans).logits, hf(y, num_plans=num_plans).logits
            torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)  # no future token leaks in
            assert torch.equal(a, hf(x, num_plans=num_plans).logits)  # seeded: the same every call
        # the plan is documented: codes drawn uniformly by a generator seeded `plan_seed`, by position
        for seed in (0, 5):
            prior = torch.randint(0, 16, (1, MAX_LEN), generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(hf(x, plan_seed=seed).logits, ref(x, z=prior[:, :12]).logits,
                                       rtol=0, atol=1e-5)
        assert not torch.allclose(hf(x, plan_seed=0).logits, hf(x, plan_seed=5).logits)


def test_ft_several_plans_score_the_mixture(exported):
    """With K plans the per-token log-probs sum to log (1/K) sum_k p(x | Z_k)."""
    _, out = exported[("free_transformer", True)]
    hf, K = _load(out), 3
    x = _tokens(3, (1, 10))
    prior = torch.randint(0, 16, (K, MAX_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = hf(x, num_plans=K).logits.log_softmax(-1)[0, :-1].gather(-1, x[0, 1:, None]).sum()
        per_plan = torch.stack([hf(x, latent_codes=prior[k:k + 1, :10]).logits.log_softmax(-1)[0, :-1]
                                .gather(-1, x[0, 1:, None]).sum() for k in range(K)])
    torch.testing.assert_close(mixed, torch.logsumexp(per_plan, 0) - math.log(K), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", [("baseline", True), ("free_transformer", False)], ids=["baseline", "ft"])
def test_generate_with_kv_cache_equals_ft_ray(exported, kind):
    bundle, out = exported[kind]
    ref, hf = _ref(bundle), _load(out)
    prompt, num_new = _tokens(4, (2, 5)), 9
    plans = [{}]
    if kind[0] == "free_transformer":  # explicit codes (the robust check), then ft-ray's seeded plan
        codes = torch.randint(0, 16, (2, 5 + num_new), generator=torch.Generator().manual_seed(2))
        plans = [{"plan": codes, "latent_codes": codes}, {"plan": 7, "plan_seed": 7}]
    for plan in plans:
        want = ref.generate(prompt, num_new, temperature=0, **{k: v for k, v in plan.items() if k == "plan"})
        hf_kw = {k: v for k, v in plan.items() if k != "plan"}
        got = hf.generate(prompt, max_new_tokens=num_new, do_sample=False, **hf_kw)
        assert torch.equal(got, want), plan.keys()
        assert torch.equal(hf.generate(prompt, max_new_tokens=num_new, do_sample=False, use_cache=False,
                                       **hf_kw), got)


def test_ft_generation_samples_the_prompt_z_from_the_encoder(exported):
    """The seeded plan is ft-ray's: prompt Z sampled from the encoder, new Z from the prior."""
    bundle, out = exported[("free_transformer", False)]
    ref, hf = _ref(bundle), _load(out)
    prompt = _tokens(5, (1, 6))
    _, codes = ref.generate(prompt, 4, temperature=0, plan=11, return_plan=True)
    with torch.no_grad():
        encoded = hf(prompt, plan_seed=11, encode_prompt=True)  # generate's prefill
    assert torch.equal(encoded.latent_codes[:, :10], codes)


@pytest.mark.parametrize("kind", [("baseline", False), ("free_transformer", True)], ids=["baseline", "ft"])
def test_left_padded_batch_generates_like_unpadded_prompts(exported, kind):
    """Row j's plan is seeded `row_seed(plan_seed, j)` whatever its padding (the baseline has none)."""
    hf = _load(exported[kind][1])
    short, long = _tokens(6, (1, 4)), _tokens(7, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :2] = 0

    def greedy(prompt, **kw):
        return hf.generate(prompt, max_new_tokens=5, do_sample=False, plan_seed=3, **kw)[:, -5:]

    got = greedy(batch, attention_mask=mask)
    assert torch.equal(got[0], greedy(short)[0])
    assert torch.equal(got[1], greedy(long.expand(2, -1))[1])


@pytest.mark.parametrize("kind", [("baseline", True), ("free_transformer", False)], ids=["baseline", "ft"])
def test_save_pretrained_round_trips(exported, kind, tmp_path):
    _, out = exported[kind]
    hf = _load(out)
    hf.save_pretrained(str(tmp_path / "again"))
    again = _load(tmp_path / "again")
    x = _tokens(8, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(x).logits, hf(x).logits)


# ----------------------------------------------------------------------------------------------
# lm-eval's hf backend

def test_lm_eval_hf_backend_scores_an_exported_free_transformer(exported, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval's hf backend imports it
    from lm_eval.tasks import TaskManager

    _, out = exported[("free_transformer", False)]
    rows = [{"context": f"{c}>", "choices": [c * 4, "____"], "label": 0} for c in "ABCDEF"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the letter tokenizer knows no space: target_delimiter ""
    (tmp_path / "ftray_tiny.yaml").write_text(
        "task: ftray_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n  cache_dir: {tmp_path / 'cache'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n')
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={out},trust_remote_code=True", tasks=["ftray_tiny"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), device="cpu",
        batch_size=2)
    acc = results["results"]["ftray_tiny"]["acc,none"]
    assert math.isfinite(acc) and 0.0 <= acc <= 1.0


# ----------------------------------------------------------------------------------------------
# refused input: one line on stderr, exit 2, nothing written

def _refused(capsys, argv_bundle: Path, out: Path, *extra: str) -> str:
    assert _export(argv_bundle, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ft-ray export hf: error:"), err
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    return err


def test_a_bundle_without_tokenizer_is_refused(tmp_path, capsys):
    bundle = _bundle(tmp_path, "baseline", False, with_tokenizer=False)
    assert "no tokenizer.json" in _refused(capsys, bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unknown_architecture_is_refused(tmp_path, capsys):
    bundle = _bundle(tmp_path, "baseline", False)
    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps(dict(config, arch="mamba")))
    assert "unknown architecture 'mamba'" in _refused(capsys, bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_refused_unless_overwrite(exported, tmp_path, capsys):
    bundle, first = exported[("baseline", True)]
    out = tmp_path / "out"
    shutil.copytree(first, out)
    (out / "config.json").write_text("{}")  # a stale export: must survive a refused run
    assert "--overwrite" in _refused(capsys, bundle, out)
    assert (out / "config.json").read_text() == "{}"
    assert _export(bundle, out, "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["arch"] == "baseline"
    (out / "notes.md").write_text("mine")  # a file an export does not write: never deleted
    assert "notes.md" in _refused(capsys, bundle, out, "--overwrite")
    assert (out / "notes.md").read_text() == "mine"
